"""Finding a `lowrank` edit (format v1.1) that reproduces an edited tensor's rows bit for bit.

Used by `diff`. The change of the rows, `new - old`, is computed in float64 (float32 for BF16 and
F16 tensors, where it is exact), and its top singular vectors found with a randomized range finder
(two power iterations; exact when the change is of rank at most `max_rank`, up to rounding). For
r = 1 .. max_rank: U = left vectors times singular values, V = right vectors, refined (rounds checked at
REFINE_ROUNDS, while they still cut the exceptions, within REFINE_BUDGET rounds x elements) by
alternating least squares against the change clipped into the interval each edited element's
rounding allows (elements that come out right are pulled no further); the exact kernel is applied
to the base rows and the elements that differ from the edited bytes become exceptions. The smallest
r whose arrays take at most LOWRANK_MAX_FRACTION of the dense deltas' bytes wins; none: None.

Rounding limits what any factors can do: an element whose edited value is near zero rounds on a
scale far finer than the noise bf16 rounding leaves in the factors, so a few percent of elements
(falling roughly as 1/sqrt(rows), 1/sqrt(cols)) become exceptions whatever the fit.
"""

from __future__ import annotations

import numpy as np

from .encodings import apply_lowrank, exceptions_for
from .patchfile import TensorEdit, rows_hash

DEFAULT_MAX_RANK = 8
LOWRANK_MAX_FRACTION = 0.25  # of the dense deltas' bytes (float32, n x cols)
LOWRANK_MAX_ELEMENTS = 1 << 26  # larger changes are not searched (the work arrays are n x cols)
REFINE_ROUNDS = (0, 8, 24, 56, 120, 248, 504, 1016, 2040, 4088)  # the fit is checked after these many rounds of refinement
REFINE_BUDGET = 1 << 29  # rounds x elements: large tensors get fewer rounds
REFINE_GAIN = 0.97  # go on refining while each check cuts the exceptions to below this fraction
WRONG_RANK = 0.3  # a fraction of elements as exceptions after a few rounds that says the rank is too small
BLOCK_ROWS_ELEMENTS = 1 << 20


def _problem(old, new, dtype, bounds):
    """(change, low, high) as n x cols arrays: the change new - old, and the interval in which a change
    rounds to the same edited value (relative to old). Non-finite elements are left unconstrained."""
    work = np.float64 if dtype in ("F32", "F64") else np.float32
    n = old.shape[0]
    d = l_ = h = None
    step = max(1, BLOCK_ROWS_ELEMENTS // max(1, old.shape[1]))
    for r0 in range(0, n, step):
        w = bounds(old[r0 : r0 + step], dtype)[0]
        y, lo, hi = bounds(new[r0 : r0 + step], dtype)
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(w) & np.isfinite(y))
            dd, ll, hh = y - w, lo - w, hi - w
        dd[bad], ll[bad], hh[bad] = 0.0, -np.inf, np.inf
        if d is None:
            d, l_, h = (np.empty((n, dd.shape[1]), dtype=work) for _ in range(3))
        d[r0 : r0 + step], l_[r0 : r0 + step], h[r0 : r0 + step] = dd, ll, hh
    return d, l_, h


def _top_singular(d: np.ndarray, k: int, seed: int = 0):
    """(U, S, Vt) of the top k singular triplets of d, by a randomized range finder (deterministic)."""
    rng = np.random.default_rng(seed)
    p = min(k + 8, *d.shape)
    y = d @ rng.standard_normal((d.shape[1], p)).astype(d.dtype)
    for _ in range(2):
        q = np.linalg.qr(y)[0]
        y = d @ (d.T @ q)
    q = np.linalg.qr(y)[0]
    ub, s, vt = np.linalg.svd((q.T @ d).astype(np.float64), full_matrices=False)
    return (q.astype(np.float64) @ ub)[:, :k], s[:k], vt[:k]


def _refine(u, v, lo, hi):
    """One round of alternating least squares against the change clipped into its rounding intervals:
    T = clip(U V, low, high); U = argmin |T - U V|; V = argmin |T - U V| with the new U. Row blocks at a
    time (float64 temporaries of a block only); the same arithmetic as on the whole arrays."""
    n, cols = lo.shape
    vvt = v @ v.T
    new_u = np.empty_like(u)
    ut_t = np.zeros((u.shape[1], cols))
    step = max(1, BLOCK_ROWS_ELEMENTS // max(1, cols))
    for r0 in range(0, n, step):
        t = np.clip(u[r0 : r0 + step] @ v, lo[r0 : r0 + step], hi[r0 : r0 + step])
        new_u[r0 : r0 + step] = np.linalg.solve(vvt, v @ t.T).T
        ut_t += new_u[r0 : r0 + step].T @ t
    return new_u, np.linalg.solve(new_u.T @ new_u, ut_t)


def _exceptions(old, new, dtype, u, v):
    got = apply_lowrank(old, dtype, u, v)[0]
    return exceptions_for(got, new, dtype)


def fit_lowrank(name, shape, dtype, rows, old, new, max_rank, bounds) -> TensorEdit | None:
    """The smallest-rank `lowrank` edit with exceptions that turns `old` into `new` exactly, within
    LOWRANK_MAX_FRACTION of the dense size; None when there is none (see the module doc)."""
    n = old.shape[0]
    cols = int(np.prod(shape[-1:])) if len(shape) else 1
    if n < 2 or cols < 2 or n * cols > LOWRANK_MAX_ELEMENTS:
        return None
    dense_bytes = 4 * n * cols
    itemsize = old.shape[1] // cols
    d, lo, hi = _problem(old, new, dtype, bounds)
    k = min(max_rank, n, cols)
    if not np.any(d):
        return None
    uf, s, vt = _top_singular(d, k)
    for r in range(1, k + 1):
        factor_bytes = 4 * r * (n + cols)
        if factor_bytes > LOWRANK_MAX_FRACTION * dense_bytes:
            return None
        u, v = uf[:, :r] * s[:r], vt[:r].copy()
        best = None
        done = 0
        for rounds in REFINE_ROUNDS:
            if rounds * n * cols > REFINE_BUDGET and best is not None:
                break
            try:
                for _ in range(rounds - done):
                    u, v = _refine(u, v, lo, hi)
            except np.linalg.LinAlgError:
                break
            done = rounds
            u32, v32 = u.astype(np.float32), v.astype(np.float32)
            if not (np.isfinite(u32).all() and np.isfinite(v32).all()):
                break
            idx, vals = _exceptions(old, new, dtype, u32, v32)
            previous = None if best is None else len(best[2])
            if best is None or len(idx) < len(best[2]):
                best = (u32, v32, idx, vals)
            if rounds and len(best[2]) > WRONG_RANK * n * cols:
                break  # the rank is too small: refining will not close the gap
            if previous is not None and len(best[2]) > REFINE_GAIN * previous:
                break  # converged
        if best is None:
            continue
        u32, v32, idx, vals = best
        if factor_bytes + len(idx) * (8 + itemsize) <= LOWRANK_MAX_FRACTION * dense_bytes:
            edit = TensorEdit(name, shape, dtype, rows, "lowrank", rows_hash(old), u=u32, v=v32)
            if len(idx):
                edit.exc_index, edit.exc_values = idx, vals
            return edit.if_exact(old, new)
    return None
