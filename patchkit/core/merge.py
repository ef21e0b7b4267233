"""merge: several patches for one base as one patch, and the overlap rules that `apply` can share.

`combine_edits` is the overlap logic on its own: given one tensor's edits from several patches (in
order, each with a weight), it returns the union of their rows and each row's new delta or
replacement under a policy (`sum`, `error`, `last`). It needs no checkpoint. `merge_patches` adds
what a patch file needs around it: the base fingerprints (checked between the parts, or exactly
against a base checkpoint with `base=`), parents, provenance. The rules are in docs/merge.md.

No torch: numpy and the core modules only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BaseMismatchError, MergeError, NonFiniteError
from .checkpoint import Checkpoint
from .choices import OnOverlap
from .patchfile import Patch, TensorEdit, factorize, n_rows_cols, rows_hash
from .plan import load_patch

POLICIES = tuple(m.value for m in OnOverlap)



def _short(pid: str) -> str:
    return pid[:12]


def _rows_text(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


@dataclass
class Part:
    """One patch's edit of one tensor, its weight, and the patch's short id for messages."""

    edit: TensorEdit
    weight: float = 1.0
    label: str = "?"


@dataclass
class Combined:
    """One tensor's merged edit before it has a base fingerprint."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    rows: np.ndarray  # union of the parts' rows, sorted
    delta: np.ndarray  # float32 [n, cols]; zero where `replaced`
    replaced: np.ndarray  # bool [n]
    values: np.ndarray | None  # the tensor's dtype [n, cols] where `replaced`, else None
    direction: np.ndarray | None  # the parts' shared factored direction, when there is one
    scale: np.ndarray | None  # float32 [n]: per-row scales along `direction` (valid with it)
    owners: list[int]  # indices of the parts that contribute at least one row
    factors: tuple[np.ndarray, np.ndarray] | None = None  # stacked (U [n, R], V [R, cols]) when a part is lowrank


def combine_edits(parts: list[Part], on_overlap: str = "sum") -> Combined:
    """Rows edited by several parts follow `on_overlap`:

    - sum:   delta = round_f32(sum_i w_i * delta_i), the sum taken in float64 in part order;
             a replaced row edited by another part is an error (a replacement has no delta).
    - last:  the last part touching a row decides it alone (its weighted delta, or its values).
    - error: any row edited by two parts is an error naming the tensor and rows.

    When a part is `lowrank` (format v1.1) and every part is lowrank or factored, the result is the
    parts' factors stacked in part order: U = [w_1 * U_1 | w_2 * U_2 | ...] (each scattered to the
    union's rows, zero elsewhere, the weight multiplied in float32; a factored part is U = scale,
    V = direction), V = [V_1; V_2; ...]; its delta is the lowrank arithmetic of docs/format.md, so a
    sum of a rank-r and a rank-s edit is one rank r+s edit rounded once. Under `last`, an earlier
    part's U rows are zeroed where a later part takes the row. Edits that carry exceptions (exact
    values) and `scale` edits (a product, not a delta) cannot be summed, scaled or stacked: refused.
    """
    if on_overlap not in POLICIES:
        raise MergeError(f"unknown overlap policy {on_overlap!r}: use one of {', '.join(POLICIES)}")
    first = parts[0].edit
    name, shape, dtype = first.name, tuple(first.shape), first.dtype
    for p in parts[1:]:
        if tuple(p.edit.shape) != shape or p.edit.dtype != dtype:
            raise BaseMismatchError(
                f"patches {parts[0].label} and {p.label} disagree on tensor {name} ({dtype} {list(shape)} vs "
                f"{p.edit.dtype} {list(p.edit.shape)}): they are for different models and cannot be merged",
                tensor=name,
            )
    for p in parts:
        if (p.edit.n_exceptions or p.edit.encoding == "scale") and (len(parts) > 1 or p.weight != 1.0):
            what = "carries exceptions (exact values)" if p.edit.n_exceptions else "is a scale edit (a product, not a delta)"
            raise MergeError(f"tensor {name} of patch {p.label} {what}: it cannot be summed or scaled; "
                             "apply the patches one after another instead", tensor=name)
    stack = any(p.edit.encoding == "lowrank" for p in parts) and all(p.edit.encoding in ("lowrank", "factored") for p in parts)
    rows = parts[0].edit.rows
    for p in parts[1:]:
        rows = np.union1d(rows, p.edit.rows)
    rows = rows.astype(np.int64)
    n, cols = len(rows), n_rows_cols(shape)[1]
    acc = np.zeros((n, cols), dtype=np.float64)
    owner = np.full(n, -1, dtype=np.int64)
    replaced = np.zeros(n, dtype=bool)
    values = None
    # the factored encoding can survive when every part is factored along one direction (bit for bit)
    dirs = [p.edit.direction for p in parts if p.edit.encoding == "factored"]
    direction = dirs[0] if len(dirs) == len(parts) and all(np.array_equal(d.view(np.uint32), dirs[0].view(np.uint32)) for d in dirs) else None
    scale = np.zeros(n, dtype=np.float64)
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    for i, p in enumerate(parts):
        e = p.edit
        pos = np.searchsorted(rows, e.rows)
        hit = owner[pos] >= 0
        if hit.any():
            other = parts[int(owner[pos[hit][0]])].label
            where = f"{int(hit.sum())} row(s) of tensor {name} (rows {_rows_text(e.rows[hit])})"
            if on_overlap == "error":
                raise MergeError(
                    f"patches {other} and {p.label} both edit {where}: use --on-overlap sum or last to merge them",
                    tensor=name, rows=e.rows[hit].tolist(),
                )
            if on_overlap == "sum" and (e.encoding == "replace" or replaced[pos[hit]].any()):
                raise MergeError(
                    f"patches {other} and {p.label} both edit {where} and one replaces them whole: a replacement has "
                    "no delta to add; use --on-overlap last (the later patch wins) or error",
                    tensor=name, rows=e.rows[hit].tolist(),
                )
            if on_overlap == "last":
                acc[pos[hit]], scale[pos[hit]], replaced[pos[hit]] = 0.0, 0.0, False
                for bu, _ in blocks:
                    bu[pos[hit]] = 0.0
        if e.encoding == "replace":
            if p.weight != 1.0:
                raise MergeError(f"patch {p.label} replaces rows of tensor {name} whole; a replacement cannot be scaled: give it weight 1")
            if values is None:
                values = np.zeros((n, cols), dtype=e.values.dtype)
            values[pos], replaced[pos], acc[pos] = e.values, True, 0.0
        else:
            if stack:
                eu, ev = (e.u, e.v) if e.encoding == "lowrank" else (
                    np.broadcast_to(e.scale, (len(e.rows),))[:, None], e.direction[None, :])
                bu = np.zeros((n, eu.shape[1]), dtype=np.float32)
                with np.errstate(over="ignore"):
                    bu[pos] = eu if p.weight == 1.0 else np.float32(p.weight) * eu
                blocks.append((bu, np.asarray(ev, dtype=np.float32)))
            acc[pos] += float(p.weight) * e.deltas().astype(np.float64)
            if direction is not None:
                s = e.scale if len(e.scale) == len(e.rows) else np.repeat(e.scale, len(e.rows))
                scale[pos] += float(p.weight) * s.astype(np.float64)
        owner[pos] = i
    with np.errstate(over="ignore"):
        delta = acc.astype(np.float32)
    if not np.all(np.isfinite(delta)):
        r = int(rows[np.argwhere(~np.isfinite(delta))[0][0]])
        raise NonFiniteError(f"the weighted sum of the deltas of tensor {name} overflows float32 at row {r}: use smaller --weights", tensor=name, row=r)
    owners = sorted({int(o) for o in owner})
    factors = None
    if stack:
        factors = (np.ascontiguousarray(np.concatenate([b[0] for b in blocks], axis=1)),
                   np.ascontiguousarray(np.concatenate([b[1] for b in blocks], axis=0)))
        if not (np.isfinite(factors[0]).all()):
            raise NonFiniteError(f"the weighted factors of tensor {name} overflow float32: use smaller --weights", tensor=name)
    return Combined(name, shape, dtype, rows, delta, replaced, values, direction,
                    scale.astype(np.float32) if direction is not None else None, owners, factors)


def to_edit(c: Combined, base_sha256: str, base_raw: np.ndarray | None = None) -> TensorEdit:
    """The merged rows as one TensorEdit: factored when that reproduces the deltas bit for bit, else dense;
    replace when rows are replaced (delta rows then become replacements too, which needs `base_raw`)."""
    if c.replaced.any():
        if c.replaced.all():
            vals = c.values
        elif base_raw is None:
            raise MergeError(
                f"tensor {c.name} would mix rows replaced whole with rows given as deltas, and one tensor edit has one "
                "encoding: pass --base CHECKPOINT (the base they were made for) to write them all as replacements",
                tensor=c.name,
            )
        else:
            from .dtypes import STORAGE, add_delta

            vals = add_delta(base_raw, c.delta, c.dtype).view(STORAGE[c.dtype]).copy()
            vals[c.replaced] = c.values[c.replaced]
        edit = TensorEdit(c.name, c.shape, c.dtype, c.rows, "replace", base_sha256, values=np.ascontiguousarray(vals))
    elif c.factors is not None:
        edit = TensorEdit(c.name, c.shape, c.dtype, c.rows, "lowrank", base_sha256, u=c.factors[0], v=c.factors[1])
    else:
        fac = None
        if c.direction is not None:
            bits = (c.scale[:, None] * c.direction[None, :]).astype(np.float32).view(np.uint32)
            if np.array_equal(bits, c.delta.view(np.uint32)):
                sc = c.scale[:1].copy() if np.all(c.scale == c.scale[0]) and np.all(np.signbit(c.scale) == np.signbit(c.scale[0])) else c.scale
                fac = (c.direction.copy(), sc)
        fac = fac or factorize(c.delta)
        if fac is not None:
            edit = TensorEdit(c.name, c.shape, c.dtype, c.rows, "factored", base_sha256, direction=fac[0], scale=fac[1])
        else:
            edit = TensorEdit(c.name, c.shape, c.dtype, c.rows, "dense", base_sha256, delta=c.delta)
    edit.validate()
    if base_raw is not None:
        edit.result_sha256 = rows_hash(edit.new_rows(base_raw))
    return edit


# ---- whole patches ---------------------------------------------------------------------------------
def _ancestors(patches: list[Patch]) -> list[set[int]]:
    """For each part, the earlier parts it was made on top of (transitively); refuses a child listed first."""
    ids = [p.id for p in patches]
    anc: list[set[int]] = []
    for i, p in enumerate(patches):
        mine: set[int] = set()
        for parent in p.parents:
            if parent in ids:
                j = ids.index(parent)
                if j > i:
                    raise MergeError(f"patch {_short(p.id)} was made on top of patch {_short(parent)}: list {_short(parent)} before it")
                mine |= {j} | anc[j]
        anc.append(mine)
    return anc


def _common(values: list) -> object:
    known = [v for v in values if v is not None]
    return known[0] if known and all(v == known[0] for v in known) else None


def merge_patches(patches, *, weights=None, on_overlap: str = "sum", base=None,
                  allow_different_base: bool = False, description: str | None = None) -> Patch:
    """Merge patches made for one base into one patch (see docs/merge.md for every rule)."""
    patches = [load_patch(p) for p in patches]
    if not patches:
        raise MergeError("give at least one patch to merge")
    ids = [p.id for p in patches]
    dup = next((pid for i, pid in enumerate(ids) if pid in ids[:i]), None)
    if dup:
        raise MergeError(f"patch {_short(dup)} is given twice: give each patch once (use --weights to scale one)")
    weights = [1.0] * len(patches) if weights is None else [float(w) for w in weights]
    if len(weights) != len(patches) or not all(np.isfinite(weights)):
        raise MergeError(f"--weights needs {len(patches)} finite numbers, one per patch, got {len(weights)}")
    anc = _ancestors(patches)
    ck = None if base is None else (base if isinstance(base, Checkpoint) else Checkpoint(base))
    labels = [_short(pid) for pid in ids]
    mismatches: list[dict] = []

    def mismatch(i: int, name: str, msg: str) -> None:
        if not allow_different_base:
            raise BaseMismatchError(msg + " (pass --allow-different-base to merge anyway; it is recorded in the result)", tensor=name, patch=ids[i])
        mismatches.append({"patch": ids[i], "tensor": name})

    edits: dict[str, TensorEdit] = {}
    for name in sorted({n for p in patches for n in p.edits}):
        idx = [i for i, p in enumerate(patches) if name in p.edits]
        parts = [Part(patches[i].edits[name], weights[i], labels[i]) for i in idx]
        c = combine_edits(parts, on_overlap)
        if ck is not None:
            info = ck.info(name)
            if tuple(info.shape) != c.shape or info.dtype != c.dtype:
                raise BaseMismatchError(f"tensor {name} is {info.dtype} {list(info.shape)} in {ck.path} but {c.dtype} {list(c.shape)} in the patches: "
                                        "pass the checkpoint they were made for", tensor=name)
            base_raw = ck.read_rows(name, c.rows)
            for k, i in enumerate(idx):  # each part's rows as it saw them: the base plus its ancestors' edits
                view = base_raw.copy()
                for k2, j in enumerate(idx[:k]):
                    if j in anc[i]:
                        pos = np.searchsorted(c.rows, parts[k2].edit.rows)
                        view[pos] = parts[k2].edit.new_rows(view[pos])
                seen = view[np.searchsorted(c.rows, parts[k].edit.rows)]
                if rows_hash(seen) != parts[k].edit.base_sha256:
                    mismatch(i, name, f"patch {labels[i]} was not made for {ck.path}: the rows of tensor {name} it edits differ")
            if len(idx) == 1 and weights[idx[0]] == 1.0:
                edits[name] = parts[0].edit
            else:
                edits[name] = to_edit(c, rows_hash(base_raw), base_raw)
            continue
        if len(idx) == 1:
            if weights[idx[0]] == 1.0:
                edits[name] = parts[0].edit  # unchanged: its fingerprints stay valid
            else:
                edits[name] = to_edit(c, parts[0].edit.base_sha256)  # result on the base unknown without it
            continue
        if not all(np.array_equal(p.edit.rows, c.rows) for p in parts):
            raise MergeError(
                f"patches {', '.join(labels[i] for i in idx)} edit different rows of tensor {name}: the merged patch's "
                "fingerprint covers all of them and needs the base's bytes: pass --base CHECKPOINT (the checkpoint they were made for)",
                tensor=name,
            )
        root = None
        for k, i in enumerate(idx):  # same rows: each part saw the root's rows, or its latest ancestor's result
            prior = [k2 for k2, j in enumerate(idx[:k]) if j in anc[i]]
            if prior:
                expected = parts[prior[-1]].edit.result_sha256
                if expected is None:
                    raise MergeError(f"patch {labels[i]} was made on top of patch {labels[idx[prior[-1]]]}, whose result fingerprint of "
                                     f"tensor {name} is unknown: pass --base CHECKPOINT to check them", tensor=name)
            elif root is None:
                root = expected = parts[k].edit.base_sha256
            else:
                expected = root
            if parts[k].edit.base_sha256 != expected:
                mismatch(i, name, f"patches {labels[idx[0]]} and {labels[i]} were made for different bases: the rows of tensor {name} they edit differ")
        edits[name] = to_edit(c, root or parts[0].edit.base_sha256)

    merged_ids = set(ids)
    parents = list(dict.fromkeys(q for p in patches for q in p.parents if q not in merged_ids))
    prov = {
        "method": "merge",
        "params": {"on_overlap": on_overlap, "weights": weights},
        "parts": [{"id": p.id, "base_model": p.base_model, "provenance": p.provenance} for p in patches],
        "base_check": "checkpoint" if ck is not None else "fingerprints",
        "allow_different_base": bool(allow_different_base),
    }
    if mismatches:
        prov["base_mismatches"] = mismatches
    return Patch(
        edits=edits,
        base_model=_common([p.base_model for p in patches]),
        base_revision=_common([p.base_revision for p in patches]),
        provenance=prov,
        parents=parents,
        description=description,
    )


def merge(patches, output, **kwargs) -> Patch:
    """merge_patches, then write the result (atomically) to `output`."""
    patch = merge_patches(patches, **kwargs)
    patch.save(Path(output))
    return patch
