"""diff: a patch from two checkpoints of the same model, streamed tensor by tensor.

The patch reproduces the edited checkpoint bit for bit when applied to the base: rows are stored
as float32 deltas when adding them back gives exactly the edited bytes, and as replacement values
in the tensor's dtype otherwise. The deltas are factored (one vector, scaled per row or not) when
one vector reproduces every row: exactly, or through the rounding of the checkpoint's dtype, which
is how an edit `w + alpha * v` saved in bf16 comes back as the small patch that made it. Otherwise a
tensor whose change is close to rank r <= `max_rank` (abliteration, projections, ROME/MEMIT-style
edits) is stored `lowrank` (format v1.1) with exceptions for the elements the factors do not round
to, when that is at most LOWRANK_MAX_FRACTION of the dense deltas' bytes (`lowrank.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BaseMismatchError, PatchkitError, TooDenseError, UnsupportedError
from .checkpoint import Checkpoint
from .dtypes import FLOAT_DTYPES, STORAGE, to_float
from .lowrank import DEFAULT_MAX_RANK, fit_lowrank
from .parallel import map_ordered
from .patchfile import Patch, TensorEdit, make_edit, rows_hash
from .tensorio import read_rows

CHUNK_BYTES = 16 * 1024 * 1024  # per thread
BOUNDS_BLOCK_ELEMENTS = 1 << 16
DEFAULT_MAX_CHANGED = 0.5


def _changed_rows(info_a, info_b) -> np.ndarray:
    """Indices of rows whose bytes differ, read in chunks so memory stays bounded."""
    per = max(1, CHUNK_BYTES // max(1, info_a.row_bytes))
    changed = []
    with open(info_a.file, "rb") as fa, open(info_b.file, "rb") as fb:
        for start in range(0, info_a.n_rows, per):
            rows = np.arange(start, min(start + per, info_a.n_rows), dtype=np.int64)
            a, b = read_rows(info_a, rows, fa), read_rows(info_b, rows, fb)
            changed.append(rows[np.any(a != b, axis=1)])
    return np.concatenate(changed) if changed else np.zeros(0, dtype=np.int64)


def _edit_for(name, info, rows, old, new, max_rank=DEFAULT_MAX_RANK) -> TensorEdit:
    """The most compact encoding that reproduces `new` exactly from `old`."""
    edit = _edit_v1(name, info, rows, old, new)
    if max_rank and edit.encoding in ("dense", "replace") and info.dtype in FLOAT_DTYPES:
        low = fit_lowrank(name, tuple(info.shape), info.dtype, rows, old, new, max_rank, _rounding_bounds)
        if low is not None:
            return low
    return edit


def _edit_v1(name, info, rows, old, new) -> TensorEdit:
    """The most compact format v1 encoding that reproduces `new` exactly from `old`."""
    shape, dtype = tuple(info.shape), info.dtype
    elems = np.ascontiguousarray(new).view(STORAGE[dtype]).reshape(len(rows), -1)
    if dtype in FLOAT_DTYPES and dtype != "F64":
        with np.errstate(invalid="ignore", over="ignore"):
            delta = (to_float(new, dtype) - to_float(old, dtype)).astype(np.float32)
        if np.all(np.isfinite(delta)):
            for factor in (True, False):
                edit = make_edit(name, shape, dtype, rows, old, delta=delta, factor=factor)
                if factor and edit.encoding == "dense":
                    found = (_shared_delta(name, shape, dtype, rows, old, new)
                             or _loose_factored(name, shape, dtype, rows, old, new, delta))
                    if found is not None:
                        return found  # already checked to reproduce `new`
                if np.array_equal(edit.new_rows(old), new):
                    return edit
    return make_edit(name, shape, dtype, rows, old, values=elems.copy())


def _rounding_bounds(raw: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, low, high) in float64 for each element: the values that round to it in `dtype` lie
    between low and high, half-way to its neighbours (whether the half-way points themselves do
    depends on ties to even; callers check the result exactly). NaN where it is not finite."""
    elems = np.ascontiguousarray(raw).view(STORAGE[dtype])
    if dtype == "BF16":  # no numpy bf16: neighbours by the bits (sign and magnitude)
        bits = elems.astype(np.int64)
        neg, mag = bits >= 0x8000, bits & 0x7FFF
        up = np.where(neg, np.where(mag == 0, 0x0001, bits - 1), bits + 1)
        down = np.where(neg, bits + 1, np.where(mag == 0, 0x8001, bits - 1))
        as_f = lambda b: ((b.astype(np.uint32) & 0xFFFF) << 16).view(np.float32).astype(np.float64)  # noqa: E731
        y, y_up, y_down = as_f(bits), as_f(up), as_f(down)
    else:
        native = elems
        y = native.astype(np.float64)
        y_up = np.nextafter(native, np.array(np.inf, dtype=native.dtype)).astype(np.float64)
        y_down = np.nextafter(native, np.array(-np.inf, dtype=native.dtype)).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        # past the largest finite value, the rounding interval is as wide as below it
        y_up = np.where(np.isinf(y_up) & np.isfinite(y), 2 * y - y_down, y_up)
        y_down = np.where(np.isinf(y_down) & np.isfinite(y), 2 * y - y_up, y_down)
        bad = ~np.isfinite(y)
        lo, hi = (y + y_down) / 2, (y + y_up) / 2
    y[bad] = lo[bad] = hi[bad] = np.nan
    return y, lo, hi


def _shared_delta(name, shape, dtype, rows, old, new) -> TensorEdit | None:
    """A factored edit adding one float32 vector to every changed row, found through the rounding.

    An edit made as `w + alpha * v` on some rows (the paper's) and saved in bf16 or fp16 diffs to
    deltas that differ from row to row by rounding. For each column, the value added must lie in
    the intersection over the rows of the intervals that round each base value to its edited one;
    when every column's intersection holds a float32, its middle is a vector that reproduces the
    edited bytes (checked by the caller's exact comparison), stored as direction with scale [1].
    """
    if dtype not in ("BF16", "F16", "F32"):
        return None
    cols = old.shape[1] // STORAGE[dtype].itemsize
    low, high = np.full(cols, -np.inf), np.full(cols, np.inf)
    step = max(1, BOUNDS_BLOCK_ELEMENTS // max(1, cols))  # float64 temporaries for a block of rows only
    for r0 in range(0, len(rows), step):
        w = _rounding_bounds(old[r0 : r0 + step], dtype)[0]
        _, lo, hi = _rounding_bounds(new[r0 : r0 + step], dtype)
        with np.errstate(invalid="ignore"):
            np.maximum(low, np.max(lo - w, axis=0), out=low)
            np.minimum(high, np.min(hi - w, axis=0), out=high)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low <= high)):
            return None  # rows that got different deltas show it within the first rows
    # the float32 nearest the middle, or a neighbour of it when the intersection is narrower than
    # the float32 spacing there (fp32 checkpoints: the intervals are one float32 ulp wide)
    mid = ((low + high) / 2).astype(np.float32)
    v = np.full(mid.shape, np.nan, dtype=np.float32)
    for c in (np.nextafter(mid, np.float32(-np.inf)), np.nextafter(mid, np.float32(np.inf)), mid):  # last wins
        v = np.where((c >= low) & (c <= high), c, v)
    if np.any(np.isnan(v)):
        return None
    return _exact_factored(name, shape, dtype, rows, old, new, v, np.ones(1, np.float32))


def _loose_factored(name, shape, dtype, rows, old, new, delta):
    """A factored edit whose rows, once rounded to the checkpoint's dtype, equal `new` exactly.

    An edit made as `w + s * v` and saved in bf16 diffs to deltas that are only approximately a
    multiple of `v`; the factored form still reproduces the edited bytes, at a fraction of the size.
    """
    d64 = delta.astype(np.float64)
    v = d64[int(np.argmax(np.einsum("ij,ij->i", d64, d64)))]
    vv = float(v @ v)
    if vv == 0:
        return None
    direction = v.astype(np.float32)
    scale = (d64 @ v / vv).astype(np.float32)
    if np.all(scale == scale[0]):
        scale = scale[:1]
    return _exact_factored(name, shape, dtype, rows, old, new, direction, scale)


def _exact_factored(name, shape, dtype, rows, old, new, direction, scale) -> TensorEdit | None:
    """The factored edit (direction, scale), if it is valid and reproduces `new` from `old` exactly."""
    return TensorEdit(name, shape, dtype, rows, "factored", rows_hash(old), direction=direction, scale=scale).if_exact(old, new)


def diff(base, edited, output=None, *, max_changed=DEFAULT_MAX_CHANGED, full=False, description=None,
         max_rank: int = DEFAULT_MAX_RANK) -> Patch:
    """Compare two checkpoints and return (and with `output`, save) the patch from base to edited.

    `max_rank` bounds the `lowrank` search (0: format v1 encodings only, as before v1.1)."""
    a, b = Checkpoint(base), Checkpoint(edited)
    only_a, only_b = sorted(set(a.tensors) - set(b.tensors)), sorted(set(b.tensors) - set(a.tensors))
    if only_a or only_b:
        which, name = ("base", only_a[0]) if only_a else ("edited checkpoint", only_b[0])
        raise BaseMismatchError(f"the checkpoints hold different tensors: only the {which} has {name}", tensor=name)
    names = sorted(a.tensors)
    for name in names:
        ia, ib = a.tensors[name], b.tensors[name]
        if ia.shape != ib.shape or ia.dtype != ib.dtype:
            raise BaseMismatchError(
                f"tensor {name} is {ia.dtype} {list(ia.shape)} in the base but {ib.dtype} {list(ib.shape)} in the edited checkpoint",
                tensor=name,
            )

    def compare(name: str):
        """None (unchanged), the fraction of rows changed (too many, without --full), or the edit."""
        ia, ib = a.tensors[name], b.tensors[name]
        rows = _changed_rows(ia, ib)
        if len(rows) == 0:
            return None
        if not ia.known:
            raise UnsupportedError(f"tensor {name} changed, and its dtype {ia.dtype} is one this version of patchkit "
                                   "cannot put in a patch", tensor=name)
        frac = len(rows) / ia.n_rows
        if frac > max_changed:
            if not full:
                # a change of most rows may still be a compact low-rank one (a projection, an abliteration)
                low = (fit_lowrank(name, tuple(ia.shape), ia.dtype, rows, read_rows(ia, rows), read_rows(ib, rows), max_rank,
                                   _rounding_bounds) if max_rank and ia.dtype in FLOAT_DTYPES else None)
                return frac if low is None else low
            rows = np.arange(ia.n_rows, dtype=np.int64)
        return _edit_for(name, ia, rows, read_rows(ia, rows), read_rows(ib, rows), max_rank)

    edits, dense = {}, []
    for name, r in zip(names, map_ordered(compare, names)):  # tensors side by side, on every core
        if isinstance(r, TensorEdit):
            edits[name] = r
        elif r is not None:
            dense.append((name, r))
    if dense:
        listed = ", ".join(f"{n} ({f:.0%})" for n, f in dense[:3]) + (f" and {len(dense) - 3} more" if len(dense) > 3 else "")
        raise TooDenseError(
            f"{len(dense)} tensor(s) changed in more than {max_changed:.0%} of their rows: {listed}; "
            "pass --full to include them as whole-tensor replacements",
            tensors=[n for n, _ in dense],
        )
    if not edits:
        raise PatchkitError("the checkpoints are identical: there is nothing to put in a patch")
    patch = Patch(
        edits=edits,
        base_model=a.config.get("_name_or_path") or None,
        provenance={"method": "diff", "params": {"base": Path(base).name, "edited": Path(edited).name}},
        description=description,
    )
    if output is not None:
        patch.save(output)
    return patch
