"""The arithmetic of the format v1.1 encodings (docs/format.md): `lowrank`, `scale` and exceptions.

Every result is defined bit for bit, so that two implementations agree:

- lowrank: the delta of edited row i is `sum_k U[i, k] * V[k]`, in float32, accumulated in order
  k = 0, 1, ..., r-1: `d = U[:, 0] * V[0]`, then `d = d + U[:, k] * V[k]`, every product and every
  sum rounded to float32 on its own (no fused multiply-add). The row is then `round(old + d)` exactly
  as for `dense` (`dtypes.add_to_rows`). With r = 1 it is the `factored` product `scale[i] * direction`.
- scale: `round(gamma[i] * old)`: the old row converted to float32 (float64 for F64 tensors),
  multiplied by gamma[i] there, and rounded once to the tensor's dtype, to nearest even.
- exceptions: after the arithmetic, element `index[j]` of the edited rows (flat, row-major over the
  n edited rows in patch order) is set to `values[j]`, exact bits in the tensor's dtype.

numpy only.
"""

from __future__ import annotations

import numpy as np

from ..errors import PatchFormatError
from .dtypes import BLOCK_ELEMENTS, FLOAT_DTYPES, STORAGE, add_to_rows, compute_dtype, from_float, is_finite, named, to_float

V11_ENCODINGS = ("lowrank", "scale")  # encodings that need format v1.1


def lowrank_delta(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float32 `sum_k u[:, k, None] * v[k, None, :]`, accumulated in order k = 0..r-1 (see the module doc)."""
    u = np.asarray(u, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        d = u[:, 0, None] * v[0, None, :]
        for k in range(1, u.shape[1]):
            d += u[:, k, None] * v[k, None, :]
    return d


def apply_lowrank(old_raw: np.ndarray, dtype: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, bool]:
    """round(old + U @ V) row block by row block, the delta never materialised for all rows."""
    old_raw = np.ascontiguousarray(old_raw)
    n = old_raw.shape[0]
    cols = v.shape[1]
    out = np.empty(old_raw.shape, dtype=np.uint8)
    bad = False
    step = max(1, (4 * BLOCK_ELEMENTS) // max(1, cols))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        new, b = add_to_rows(old_raw[r0:r1], dtype, delta=lowrank_delta(u[r0:r1], v))
        out[r0:r1] = new
        bad = bad or b
    return out, bad


def apply_scale(old_raw: np.ndarray, dtype: str, gamma: np.ndarray) -> tuple[np.ndarray, bool]:
    """round(gamma[i] * old) in the compute dtype (float32; float64 for F64), rounded once."""
    old_raw = np.ascontiguousarray(old_raw)
    n = old_raw.shape[0]
    gamma = np.asarray(gamma, dtype=np.float32).reshape(-1)
    g = (gamma if len(gamma) == n else np.repeat(gamma[:1], n)).astype(compute_dtype(dtype))
    with np.errstate(over="ignore", invalid="ignore"):
        f = to_float(old_raw, dtype).reshape(n, -1)
        new = np.ascontiguousarray(from_float(f * g[:, None], dtype))
    return new.view(np.uint8).reshape(old_raw.shape), not bool(is_finite(new, dtype).all())


def apply_exceptions(new_raw: np.ndarray, dtype: str, index: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, bool]:
    """The rows with their exception elements set; and whether any element is inf or NaN."""
    out = np.array(new_raw, dtype=np.uint8, copy=True, order="C")
    elems = out.view(STORAGE[dtype]).reshape(-1)
    elems[index] = values
    return out, not bool(is_finite(elems, dtype).all())


def exceptions_for(computed_raw: np.ndarray, target_raw: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices int64, target values in the storage dtype) of the elements where two sets of rows
    differ in their bits (not in value: -0.0 and 0.0 differ, so do two NaNs of different payloads)."""
    st = STORAGE[dtype]
    bits = np.dtype(f"<u{st.itemsize}")
    a = np.ascontiguousarray(computed_raw).view(bits).reshape(-1)
    b = np.ascontiguousarray(target_raw).view(bits).reshape(-1)
    index = np.flatnonzero(a != b).astype(np.int64)
    values = np.ascontiguousarray(target_raw).view(st).reshape(-1)[index].copy()
    return index, values


def encoded_bytes(edit) -> int:
    """Bytes of an edit's arrays in a patch file (the data, not the header)."""
    return sum(int(a.nbytes) for _, a in edit.arrays().values())


# ---- checks ---------------------------------------------------------------------------------------
ENCODINGS = ("dense", "factored", "replace", "lowrank", "scale")


def validate_edit(e, rows_cols: tuple[int, int]) -> None:
    """Every check of one edit's arrays against its encoding, shape and dtype (PatchFormatError)."""
    n_rows, n_cols = rows_cols
    where = f"tensor {named(e.name)}"
    if e.encoding not in ENCODINGS:
        raise PatchFormatError(f"{where}: unknown encoding {e.encoding!r}")
    if e.dtype not in STORAGE:
        raise PatchFormatError(f"{where}: unknown dtype {e.dtype!r}")
    if e.encoding != "replace" and e.dtype not in FLOAT_DTYPES:
        raise PatchFormatError(f"{where}: deltas need a float tensor, base dtype is {e.dtype}")
    r = e.rows
    if r.ndim != 1 or r.dtype != np.int64:
        raise PatchFormatError(f"{where}: row indices must be a 1-d int64 array")
    if len(r) == 0:
        raise PatchFormatError(f"{where}: the edit touches no rows")
    if np.any(np.diff(r) <= 0):
        dup = bool(np.any(np.diff(r) == 0))
        raise PatchFormatError(f"{where}: row indices are {'duplicated' if dup else 'not sorted'}")
    if r[0] < 0 or r[-1] >= n_rows:
        raise PatchFormatError(f"{where}: row index {int(r[-1] if r[-1] >= n_rows else r[0])} is out of range 0..{n_rows - 1}")
    n = len(r)
    if e.encoding == "dense":
        _check_array(e.delta, (n, n_cols), np.float32, f"{where} delta")
    elif e.encoding == "factored":
        _check_array(e.direction, (n_cols,), np.float32, f"{where} direction")
        if e.scale is None or e.scale.shape not in ((n,), (1,)):
            raise PatchFormatError(f"{where}: scale must have {n} entries or 1")
        _check_array(e.scale, e.scale.shape, np.float32, f"{where} scale")
    elif e.encoding == "lowrank":
        r = e.u.shape[1] if e.u is not None and e.u.ndim == 2 and e.u.shape[1] >= 1 else 1
        _check_array(e.u, (n, r), np.float32, f"{where} U")
        _check_array(e.v, (r, n_cols), np.float32, f"{where} V")
    elif e.encoding == "scale":
        if e.gamma is None or e.gamma.shape not in ((n,), (1,)):
            raise PatchFormatError(f"{where}: gamma must have {n} entries or 1")
        _check_array(e.gamma, e.gamma.shape, np.float32, f"{where} gamma")
    else:
        if e.values is None or e.values.shape != (n, n_cols) or e.values.dtype != STORAGE[e.dtype]:
            raise PatchFormatError(f"{where}: replacement values must be [{n}, {n_cols}] of {e.dtype}")
    if e.exc_index is not None or e.exc_values is not None:
        _check_exceptions(e, where, n * n_cols)


def _check_exceptions(e, where: str, size: int) -> None:
    idx, vals = e.exc_index, e.exc_values
    if e.encoding == "replace":
        raise PatchFormatError(f"{where}: a replace edit carries no exceptions")
    if idx is None or idx.ndim != 1 or idx.dtype != np.int64 or len(idx) == 0:
        raise PatchFormatError(f"{where}: exceptions must be a non-empty 1-d int64 array")
    if np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= size:
        raise PatchFormatError(f"{where}: exception indices must be sorted, unique and within 0..{size - 1}")
    if vals is None or vals.shape != idx.shape or vals.dtype != STORAGE[e.dtype]:
        raise PatchFormatError(f"{where}: exception values must be [{len(idx)}] of {e.dtype}")


def _check_array(a, shape, dtype, what) -> None:
    if a is None or a.shape != tuple(shape) or a.dtype != dtype:
        got = "missing" if a is None else f"{a.dtype} {list(a.shape)}"
        raise PatchFormatError(f"{what} must be {np.dtype(dtype).name} {list(shape)}, found {got}")
    if not np.all(np.isfinite(a)):
        raise PatchFormatError(f"{what} contains NaN or inf")


def factorize(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(direction, scale) that reproduce `delta` bit for bit as scale[i] * direction, else None."""
    if delta.size == 0:
        return None
    bits = np.ascontiguousarray(delta, dtype=np.float32).view(np.uint32)  # bit for bit: -0.0 is not 0.0
    if np.all(bits == bits[0:1]):
        return delta[0].astype(np.float32).copy(), np.ones(1, dtype=np.float32)
    d64 = delta.astype(np.float64)
    norms = np.einsum("ij,ij->i", d64, d64)
    nonzero = np.flatnonzero(norms > 0)
    if nonzero.size == 0:
        return None
    # The direction is one of the rows; try the largest, the smallest and the first, so that rows
    # s[i] * v are found whenever v (or an exact power-of-two multiple of it) is among them.
    for i in dict.fromkeys([int(np.argmax(norms)), int(nonzero[np.argmin(norms[nonzero])]), int(nonzero[0])]):
        v = delta[i].astype(np.float32)
        scale = (d64 @ v.astype(np.float64) / norms[i]).astype(np.float32)
        if np.array_equal((scale[:, None] * v[None, :]).view(np.uint32), bits):
            return v.copy(), scale
    return None
