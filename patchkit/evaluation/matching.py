"""Controls at matched damage: search a control's strength until its next-token KL on benign text is
the patch's.

A control built at the patch's own strength can do much less damage than the patch (a random
direction projected out of the residual stream barely moves the model at the lam that removes a
behaviour direction) or much more (label-shuffled directions): comparing behaviour at unequal
damage says little. `match_kl` scales the control (its `build(strength)` multiplies the patch's
strength) until KL(base || control) is within `tol` of the patch's on a log scale, with a secant
step on log KL against log strength (KL grows about as strength squared for a small edit),
bisection once the target is bracketed, and bounds. It returns the closest point it measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KL_TOLERANCE = math.log(1.1)  # within 10 % of the patch's KL
MAX_EVALUATIONS = 6
BOUNDS = (1 / 64, 64.0)


@dataclass
class Matched:
    strength: float  # times the patch's own strength
    capability: dict  # the meter's numbers at that strength ({"kl", "perplexity", ...})
    patch: Any  # the control patch at that strength
    evaluations: int
    kl_at_start: float | None  # the control's KL at the starting strength
    matched: bool  # within the tolerance


def _log_err(kl: float | None, target: float) -> float:
    return math.log(max(kl or 0.0, 1e-12) / target)


def match_kl(measure: Callable[[Any], dict], build: Callable[[float], Any], target_kl: float, start: float = 1.0, *,
             tol: float = KL_TOLERANCE, max_evaluations: int = MAX_EVALUATIONS, bounds: tuple[float, float] = BOUNDS) -> Matched:
    """The control `build(strength)` whose `measure(patch)["kl"]` is closest to `target_kl` (see the module doc)."""
    if not (target_kl and target_kl > 0 and math.isfinite(target_kl)):  # nothing to match: the patch's own strength
        p = build(start)
        c = measure(p)
        return Matched(start, c, p, 1, c.get("kl"), False)
    lo_b, hi_b = bounds
    pts: list[tuple[float, dict, Any]] = []
    a = min(hi_b, max(lo_b, start))
    for _ in range(max_evaluations):
        p = build(a)
        c = measure(p)
        pts.append((a, c, p))
        err = _log_err(c.get("kl"), target_kl)
        if abs(err) < tol or not math.isfinite(c.get("kl") or 0.0):
            break
        slope = 2.0
        if len(pts) >= 2:
            (a1, c1, _), (a2, c2, _) = pts[-2], pts[-1]
            if a1 != a2 and (c1.get("kl") or 0) > 0 and (c2.get("kl") or 0) > 0:
                s = math.log(c2["kl"] / c1["kl"]) / math.log(a2 / a1)
                slope = min(4.0, max(0.5, s)) if math.isfinite(s) else 2.0
        nxt = a * math.exp(-err / slope)
        below = [q[0] for q in pts if (q[1].get("kl") or 0.0) < target_kl]
        above = [q[0] for q in pts if (q[1].get("kl") or 0.0) > target_kl]
        if below and above:  # bracketed: stay inside, else bisect in log strength
            a_lo, a_hi = max(below), min(above)
            if not min(a_lo, a_hi) < nxt < max(a_lo, a_hi):
                nxt = math.sqrt(a_lo * a_hi)
        nxt = min(hi_b, max(lo_b, nxt))
        if nxt == a:  # pinned at a bound
            break
        a = nxt
    best = min(pts, key=lambda q: abs(_log_err(q[1].get("kl"), target_kl)))
    return Matched(best[0], best[1], best[2], len(pts), pts[0][1].get("kl"), abs(_log_err(best[1].get("kl"), target_kl)) < tol)
