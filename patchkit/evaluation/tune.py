"""tune: search K (rows) and alpha (strength) for the strongest judged behaviour change within a
capability budget, and write the chosen patch with the whole trade-off table stored in it.

The base is loaded once; the neurons are ranked once at the largest K (`compute.rank_rows`: any
smaller top K is a prefix). Each (K, alpha) patch is built in memory, applied, measured, reverted:

capability first (perplexity and KL on benign text, as `patchkit eval` measures them), then
bisection on alpha at each K, then generation for the points within budget only, judged at the
end on the base. The best judged point (ties: the larger edit) is written as `compute_patch(top_k=K,
alpha=alpha)` with the table in ``evaluation`` (no timings: byte-reproducible). See docs/tune.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..core.checkpoint import Checkpoint
from ..core.choices import values
from ..core.patchfile import Patch
from ..errors import DataError, OutputExistsError, ProbeError
from ..method.compute import target_edit, compute_patch, probe_arrays, rank_rows
from ..method.pipeline import load_data, load_model, resolve_model
from ..method.select import paper_k
from ..method.targets import resolve_targets
from . import evaluate as E
from . import judges as J
from .choices import Goal, Metric
from .capability import CapabilityMeter
from .inmemory import patched

DEFAULT_FRACTIONS = (0.01, 16384 / 352256, 0.1)
DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 4.0)
METRICS = tuple(values(Metric))
GOALS = tuple(values(Goal))


class NoFeasiblePointError(DataError):
    """No (K, alpha) point measured keeps the capability cost within the budget."""


def parse_budget(text: str | float | None) -> float | None:
    """'5%' -> 0.05, '0.05' -> 0.05; a bare number of 1 or more is refused as ambiguous."""
    if text is None:
        return None
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise DataError(f"budget {text!r} is not a number; write 5% or 0.05") from None
    if isinstance(text, str) and not s.endswith("%") and value >= 1:
        raise DataError(f"budget {text!r} is ambiguous; write {s}% for percent or a fraction below 1")
    if not math.isfinite(value) or value < 0:
        raise DataError(f"budget {text!r} must be a finite number >= 0")
    return value


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"{what} must be comma-separated numbers, got {text!r}") from None


@dataclass
class Point:
    k: int
    fraction: float
    alpha: float
    stage: str  # grid | refine
    perplexity: float
    ppl_increase: float  # perplexity / base perplexity - 1
    kl: float
    edit_norm: float
    within_budget: bool
    over: list[str] = field(default_factory=list)  # which budgets it exceeds: ppl, kl
    judged: bool = False
    score: float | None = None  # the judge metric the search optimises
    metrics: dict | None = None  # summarize() of the judge's scores

    to_dict = asdict


@dataclass
class TuneResult:
    table: list[Point]
    best: Point
    patch: Patch
    base: dict  # {"perplexity", "score", "metrics"}
    settings: dict
    sources: dict
    judges: list[dict]
    model_fingerprint: str
    timing: dict
    improves_on_base: bool
    continuations: dict = field(default_factory=dict)  # "base" / "K@alpha" -> [prompt][sample]

    def evaluation(self) -> dict:
        """What the written patch stores in ``eval``: everything but timings and continuations."""
        b = self.best
        cap = lambda p: {"perplexity": p.perplexity, "kl": p.kl, "ppl_increase": p.ppl_increase}
        return {
            "tool": "patchkit tune", "model_fingerprint": self.model_fingerprint, "settings": self.settings,
            "sources": self.sources, "judges": self.judges,
            "base": {"metrics": {self.settings["judge"]: self.base["metrics"]}, "capability": {"perplexity": self.base["perplexity"], "kl": 0.0}},
            "patched": {"metrics": {self.settings["judge"]: b.metrics}, "capability": cap(b)},
            "chosen": {"k": b.k, "fraction": b.fraction, "alpha": b.alpha, "stage": b.stage, "score": b.score,
                       "improves_on_base": self.improves_on_base},
            "table": [p.to_dict() for p in self.table],
        }

    def to_dict(self) -> dict:
        return _plain({**self.evaluation(), "patch_id": self.patch.id, "timing": self.timing})


def _key(p: Point) -> str:
    return f"{p.k}@{p.alpha!r}"


def _budget_check(ppl_inc: float, kl: float, max_ppl: float | None, max_kl: float | None) -> list[str]:
    """The budgets a point exceeds (a NaN exceeds any budget)."""
    return [n for n, v, b in (("ppl", ppl_inc, max_ppl), ("kl", kl, max_kl)) if b is not None and not v <= b]


def choose(points: Sequence[Point], goal: str) -> Point:
    """The best judged point: best score for the goal; ties to the larger edit, then smaller K and |alpha|."""
    sgn = 1.0 if goal == "lower" else -1.0
    return min((p for p in points if p.judged), key=lambda p: (sgn * p.score, -p.edit_norm, p.k, abs(p.alpha), p.alpha))


class _Search:
    """The ranking, the in-memory patches and the measured points of one tuning run."""

    def __init__(self, ck, probe, ranking, cap, max_ppl, max_kl, say):
        self.ck, self.ranking, self.cap, self.say = ck, ranking, cap, say
        self.vector = probe.direction.astype(np.float32)
        self.max_ppl, self.max_kl = max_ppl, max_kl
        self.patches: dict[tuple[int, float], Patch] = {}
        self.table: list[Point] = []

    def build(self, k: int, alpha: float) -> Patch:
        """The patch compute_patch(top_k=k, alpha=alpha) would make (its edits, no metadata), from the ranking."""
        if (k, alpha) not in self.patches:
            r = self.ranking
            t_idx, neurons = r["tensor_idx"][:k], r["neurons"][:k]
            edits = {}
            for t in np.unique(t_idx):
                name = r["names"][t]
                edits[name] = target_edit(self.ck.info(name), r["layouts"][t], np.sort(neurons[t_idx == t]).astype(np.int64), self.vector, alpha)
            self.patches[(k, alpha)] = Patch(edits=edits)
        return self.patches[(k, alpha)]

    def measure(self, k: int, alpha: float, stage: str) -> Point:
        p = self.build(k, alpha)
        m = self.cap.measure(p)
        ppl, kl = m["perplexity"], m["kl"]
        inc = ppl / self.cap.base_perplexity - 1
        over = _budget_check(inc, kl, self.max_ppl, self.max_kl)
        pt = Point(k, k / self.ranking["total"], alpha, stage, ppl, inc, kl, E.edit_norm(p), not over, over)
        self.table.append(pt)
        self.say(f"K={k} alpha={alpha:g}: ppl {ppl:.3f} ({100 * inc:+.2f}%), KL {kl:.4f}" + (f", over budget ({'+'.join(over)})" if over else ""))
        return pt

    def refine(self, k: int, steps: int) -> None:
        """Bisection on |alpha|, per sign, between the largest within budget (or 0) and the next grid alpha."""
        for sign in (1.0, -1.0):
            grid = sorted((p for p in self.table if p.k == k and p.alpha * sign > 0), key=lambda p: abs(p.alpha))
            ok = [i for i, p in enumerate(grid) if p.within_budget]
            nxt = ok[-1] + 1 if ok else 0
            if nxt >= len(grid):
                continue
            lo, hi = (abs(grid[ok[-1]].alpha) if ok else 0.0), abs(grid[nxt].alpha)
            for _ in range(steps):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self.measure(k, sign * mid, "refine").within_budget else (lo, mid)

    def to_judge(self) -> list[Point]:
        """The grid points within budget, and at each K and sign the largest refined alpha within budget."""
        out = [p for p in self.table if p.within_budget and p.stage == "grid"]
        for k in sorted({p.k for p in self.table}):
            for sign in (1.0, -1.0):
                ok = [p for p in self.table if p.k == k and p.alpha * sign > 0 and p.within_budget]
                top = max(ok, key=lambda p: abs(p.alpha), default=None)
                if top is not None and top.stage == "refine":
                    out.append(top)
        return out


def tune(model, probe, prompts: str | Sequence[str] = "builtin:toxic-prompts", benign: str | Sequence[str] = "builtin:benign-requests", *,
         ks: Sequence[int] | None = None, fractions: Sequence[float] | None = None, alphas: Sequence[float] | None = None,
         max_ppl_increase: float | str | None = None, max_kl: float | None = None, judge="lexical", goal: str | None = None,
         metric: str = "mean", refine: int = 3, seed: int = 0, limit: int | None = 32, benign_limit: int | None = 32,
         max_new_tokens: int = 32, batch_size: int = 16, samples: int = 1, temperature: float = 0.0,
         judge_check: str | None = None, force_judge: bool = False, check_model: bool = True, chat: bool | None = None,
         description: str | None = None, output=None, overwrite: bool = False, device_map: str | None = None,
         max_memory: str | None = None, log: Callable[[str], None] | None = None) -> TuneResult:
    """Search (K, alpha) on ``model`` (a folder, Hub id or ``embedded``); see the module doc. With ``output``, the
    chosen patch is written there (atomically); NoFeasiblePointError when no point is within budget (nothing written).
    ``device_map`` and ``max_memory`` go to ``pipeline.load_model``."""
    say = log or (lambda _m: None)
    t0 = time.monotonic()
    max_ppl = parse_budget(max_ppl_increase)
    max_kl = parse_budget(None if max_kl is None else float(max_kl))
    if max_ppl is None and max_kl is None:
        raise DataError("give a capability budget: --max-ppl-increase and/or --max-kl")
    if ks is not None and fractions is not None:
        raise DataError("give K values or fractions, not both")
    if metric not in METRICS or refine < 0:
        raise DataError(f"metric must be one of {', '.join(METRICS)}, and refine >= 0")
    alphas = sorted({float(a) for a in (alphas if alphas is not None else DEFAULT_ALPHAS)})
    if not alphas or any(a == 0 or not math.isfinite(a) for a in alphas):
        raise DataError("alphas must be finite and non-zero")
    if output is not None:
        OutputExistsError.check(output, overwrite)

    path = resolve_model(model).path
    ck = Checkpoint(path)
    fingerprint = ck.fingerprint()
    parr = probe_arrays(probe)
    j = judge if isinstance(judge, J.Judge) else J.make_judge(judge, model_fingerprint=fingerprint, force=force_judge)
    goal = goal or ("higher" if j.kind == "refusal" else "lower")
    if goal not in GOALS:
        raise DataError(f"goal must be lower or higher, not {goal!r}")
    pinfo = {"data_sha256": parr.info.get("data_hash"), "model_fingerprint": parr.info.get("model_fingerprint"), "layer": parr.info.get("layer")}
    if J.self_judging(j, {"probe": pinfo}) and not force_judge:
        raise ProbeError(f"judge {j.name} is the probe the patches are made with: it would judge its own edit; use another probe or force it")
    total = sum(lay.neurons for lay in resolve_targets(ck, None, 0).layouts)
    if ks is None:
        fr = list(fractions if fractions is not None else DEFAULT_FRACTIONS)
        if any(not 0 < f <= 1 for f in fr):
            raise DataError("fractions must be in (0, 1]")
        ks = [paper_k(total, f) for f in fr]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > total:
        raise DataError(f"K values must be between 1 and the {total} target rows")
    prompt_list, prompt_src = J.load_prompts(prompts, limit) if isinstance(prompts, str) else (list(prompts)[:limit], None)
    benign_list, benign_src = J.load_prompts(benign, benign_limit) if isinstance(benign, str) else (list(benign)[:benign_limit], None)
    if not prompt_list or not benign_list:
        raise DataError("tune needs prompts to continue and benign text to measure capability")
    sources = {"prompts": prompt_src or {"source": "given", "n": len(prompt_list)}, "benign": benign_src or {"source": "given", "n": len(benign_list)}}

    ranking = rank_rows(ck, parr, ks[-1], check_model=check_model)  # once, at the largest K
    say(f"ranked {ranking['total']} {ranking['family']} rows once; K in {ks}, alpha in {alphas}")
    net, tok = load_model(path, E.TORCH_DTYPES.get(E.config_dtype(path), torch.float32), device_map=device_map,
                          max_memory=max_memory)
    use_chat = chat if chat is not None else j.kind == "refusal" and bool(getattr(tok, "chat_template", None))
    meter = CapabilityMeter(net, tok, benign_list, batch_size)
    if not meter.tokens:
        raise DataError("the benign text has no tokens to predict; give longer texts")
    search = _Search(ck, parr, ranking, meter, max_ppl, max_kl, say)
    for k in ks:
        for a in alphas:
            search.measure(k, a, "grid")
    for k in ks:
        search.refine(k, refine)
    table, judged = search.table, search.to_judge()
    if not judged:
        least = min(table, key=lambda p: (p.ppl_increase if max_ppl is not None else 0.0, p.kl if max_kl is not None else 0.0))
        raise NoFeasiblePointError(
            f"no (K, alpha) point is within the budget ({_budget_text(max_ppl, max_kl)}); the least costly measured was "
            f"K={least.k} alpha={least.alpha:g} with perplexity {100 * least.ppl_increase:+.2f}% and KL {least.kl:.4g}: "
            "raise the budget or try smaller alphas or K", table=[p.to_dict() for p in table])

    # generation only for the points within budget, then one judging pass on the base
    gen_kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "samples": samples, "temperature": temperature,
              "seed": seed, "chat": use_chat}
    conts = {"base": E.generate_batched(net, tok, prompt_list, **gen_kw)}
    for p in judged:
        with patched(net, search.build(p.k, p.alpha)):
            conts[_key(p)] = E.generate_batched(net, tok, prompt_list, **gen_kw)
        say(f"generated K={p.k} alpha={p.alpha:g}")
    flat = [t for rows in conts.values() for row in rows for t in row]
    with E.float32_view(net) if j.kind == "probe" else nullcontext():
        it = iter(j.score(flat, net, tok))
        scores = {name: [[next(it) for _ in row] for row in rows] for name, rows in conts.items()}
        check = None
        if judge_check and j.kind != "refusal":
            data = load_data(judge_check, split="heldout")
            check = J.check_judge(j, data.texts, data.labels, net, tok, source=data.source)
    base_metrics = J.summarize(scores["base"], j.threshold)
    for p in judged:
        p.judged, p.metrics = True, J.summarize(scores[_key(p)], j.threshold)
        p.score = p.metrics[metric]
    if not all(E.rows_intact(net, pp) for pp in search.patches.values()):
        raise DataError("the model's weights differ from the base after tuning; this is a bug, please report it")
    best = choose(judged, goal)
    improves = (best.score < base_metrics[metric]) if goal == "lower" else (best.score > base_metrics[metric])

    # the patch to write: compute's own, checked to be the edit that was measured
    out = compute_patch(ck, parr, top_k=best.k, alpha=best.alpha, seed=seed, check_model=check_model)
    if {n: e.result_sha256 for n, e in out.edits.items()} != {n: e.result_sha256 for n, e in search.build(best.k, best.alpha).edits.items()}:
        raise DataError("the computed patch differs from the measured one; this is a bug, please report it")
    table.sort(key=lambda p: (p.k, p.alpha))
    settings = {"judge": j.name, "metric": metric, "goal": goal, "max_ppl_increase": max_ppl, "max_kl": max_kl,
                "ks": ks, "alphas": alphas, "refine": refine, "total_rows": ranking["total"], "samples": samples,
                "temperature": temperature, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed,
                "chat": use_chat, "dtype": str(next(net.parameters()).dtype).replace("torch.", "")}
    judges = [{"name": j.name, "kind": j.kind, "threshold": j.threshold, "check": check}]
    result = TuneResult(table, best, out, {"perplexity": search.cap.base_perplexity, "score": base_metrics[metric], "metrics": base_metrics},
                        settings, sources, judges, fingerprint, {}, improves, conts)
    out.description = description
    out.evaluation = _plain(result.evaluation())
    if output is not None:
        out.save(output)
    result.timing = {"total_s": time.monotonic() - t0, "points": len(table), "generated": len(judged) + 1}
    return result


def _plain(obj):
    """JSON-ready: numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return int(obj) if isinstance(obj, np.integer) else obj


def _budget_text(max_ppl: float | None, max_kl: float | None) -> str:
    parts = ([f"perplexity +{100 * max_ppl:g}%"] if max_ppl is not None else []) + ([f"KL {max_kl:g}"] if max_kl is not None else [])
    return " and ".join(parts)


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)  # None: not measured, or not finite


def render_tune_table(result: TuneResult | dict) -> str:
    """The trade-off table for a terminal; takes a TuneResult or its evaluation dict."""
    d = result.evaluation() if isinstance(result, TuneResult) else result
    s, base, chosen = d["settings"], d["base"], d["chosen"]
    jn = s["judge"]
    bm = base["metrics"][jn]
    lines = [f"budget   {_budget_text(s['max_ppl_increase'], s['max_kl'])} over the base on {d['sources']['benign']['n']} benign texts",
             f"judge    {jn}: {s['metric']} ({s['goal']} is better) on {d['sources']['prompts']['n']} prompts"]
    lines += [f"         accuracy {_f(c['accuracy'], '.3f')} (balanced {_f(c['balanced_accuracy'], '.3f')}, n={c['n']}, {c['data']})"
              for c in (jd.get("check") for jd in d["judges"]) if c]
    head = ["", "K", "fraction", "alpha", "stage", "ppl", "ppl +%", "KL", "budget", f"{jn.split(':')[0]} {s['metric']}"]
    rows = [["", "0", "0", "0", "base", f"{base['capability']['perplexity']:.3f}", "+0.00", "0.0000", "ok", f"{bm[s['metric']]:.3f}"]]
    for p in d["table"]:
        mark = "*" if (p["k"], p["alpha"]) == (chosen["k"], chosen["alpha"]) else ""
        inc = None if p["ppl_increase"] is None else 100 * p["ppl_increase"]
        rows.append([mark, str(p["k"]), f"{p['fraction']:.4f}", f"{p['alpha']:g}", p["stage"], _f(p["perplexity"], ".3f"),
                     _f(inc, "+.2f"), _f(p["kl"], ".4f"), "ok" if p["within_budget"] else "over " + "+".join(p["over"]),
                     _f(p["score"], ".3f") if p["judged"] else ("-" if p["within_budget"] else "skipped")])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(w) if i in (0, 4, 8) else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    lines += ["", fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    lines += ["", f"chosen   K={chosen['k']} ({100 * chosen['fraction']:.2f}% of {s['total_rows']} rows), alpha {chosen['alpha']:g}: "
              f"{s['metric']} {_f(chosen['score'], '.3f')} vs base {bm[s['metric']]:.3f}"
              + ("" if chosen["improves_on_base"] else " (no improvement over the base measured)")]
    return "\n".join(lines)


__all__ = ["NoFeasiblePointError", "Point", "TuneResult", "choose", "parse_budget", "parse_floats", "render_tune_table", "tune"]
