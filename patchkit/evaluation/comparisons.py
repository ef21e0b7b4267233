"""Numbers of an evaluation beyond the raw scores: per-condition metrics (greedy rate, RealToxicityPrompts'
expected maximum and toxicity probability), the comparisons of each patch with the base and with its
controls (paired bootstrap, Holm-adjusted as one family, simultaneous intervals), the minimum detectable
effect at the base rate, and a judge's quality beyond its held-out check. See :mod:`patchkit.evaluation.stats`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.choices import values
from . import judges as J
from . import stats
from .choices import ControlKind
from .judges import summarize


def condition_metrics(scores: Sequence[Sequence[float]], threshold: float, greedy: bool) -> dict:
    """``summarize`` of every text, plus the greedy column's rate and mean and RealToxicityPrompts'
    expected maximum and toxicity probability over the SAMPLED columns (the greedy one when there are none)."""
    m = summarize(scores, threshold)
    sampled = [row[1:] if greedy else row for row in scores]
    if all(sampled):
        m.update(stats.rtp_metrics(sampled, threshold))
    else:  # greedy only (e.g. a control): no RealToxicityPrompts metrics
        m.update({"expected_max": None, "p_any": None, "samples": 0})
    if greedy:
        g = [row[0] for row in scores]
        m.update({"greedy_rate": float(np.mean([s >= threshold for s in g])), "greedy_mean": float(np.mean(g))})
    return m


def per_prompt(c, judge: str, metric: str, threshold: float, greedy: bool) -> list[float]:
    """One number per prompt: ``greedy`` (the greedy text flagged, 0/1) or ``max`` (max score over the samples)."""
    rows = c.scores[judge]
    if metric == "greedy":
        return [float(r[0] >= threshold) for r in rows]
    return [max(r[1:] if greedy and len(r) > 1 else r) for r in rows]


def judge_quality(judge, labelled_all, benign_scores, base_scores, model=None, tok=None, benign_src=None) -> dict:
    """A judge's quality beyond the held-out check: its check on the whole labelled set, its false
    positive rate on the base model's continuations of benign requests (ASSUMED all non-toxic, so
    every flag there counts as a false positive), and its score quantiles on the base model's
    continuations of the evaluated prompts."""
    out = {"all": J.check_judge(judge, labelled_all.texts, labelled_all.labels, model, tok, source=labelled_all.source)
           if labelled_all is not None else None}
    fp = stats.false_positive_rate(benign_scores, judge.threshold) if benign_scores else None
    if fp is not None:
        fp.update({"source": (benign_src or {}).get("source"), "assumption": "every base continuation of a benign request is non-toxic"})
    out["benign_false_positive"] = fp
    out["base_quantiles"] = stats.quantiles(base_scores)
    return out


CONTROL_ORDER = tuple(values(ControlKind))


def compare_conditions(conds: list, judge_objs, greedy: bool, samples: int, n_boot: int, seed: int, alpha: float):
    """Each patch vs the base and vs the mean (per prompt, over seeds) of each control kind, per judge and
    metric; the p-values of the whole evaluation Holm-adjusted as one family; the MDE at the base rate."""
    metrics = (["greedy"] if greedy else []) + (["max"] if samples else [])
    base = conds[0]
    rows, pairs = [], []
    for c in (c for c in conds if c.kind == "patch"):
        for j in judge_objs:
            for metric in metrics:
                val = lambda x: per_prompt(x, j.name, metric, j.threshold, greedy)  # noqa: E731
                a = val(c)
                row = {"patch": c.name, "judge": j.name, "metric": metric}
                others = {"base": val(base)}
                for kind in CONTROL_ORDER:  # every kind of control the patch has (its method's)
                    ctl = [val(x) for x in conds if x.of_patch == c.patch_id and x.kind == kind
                           and (metric == "greedy" or not greedy or len(x.scores[j.name][0]) > 1)]
                    if ctl:
                        others[kind] = np.mean(np.array(ctl), axis=0).tolist()
                for name, b in others.items():
                    row[f"vs_{name}"] = stats.bootstrap_test(a, b, n_boot, seed)
                    pairs.append((row, f"vs_{name}", a, b))
                rows.append(row)
    if pairs:
        fixed = stats.corrected([r[k] for r, k, _a, _b in pairs], [(a, b) for _r, _k, a, b in pairs], alpha, n_boot, seed)
        for (r, k, _a, _b), t in zip(pairs, fixed):
            r[k] = t
    n = len(base.continuations)
    m = max(1, len(pairs))
    power = {"n_prompts": n, "family": len(pairs), "alpha": alpha, "power": 0.8, "judges": {}}
    for j in judge_objs:
        met = base.metrics[j.name]
        rate = met["greedy_rate"] if "greedy_rate" in met else met["p_any"]
        power["judges"][j.name] = {"base_rate": rate, "mde": stats.mde(rate, n, alpha) if n else None,
                                   "mde_corrected": stats.mde(rate, n, alpha / m) if n else None}
    return rows, power
