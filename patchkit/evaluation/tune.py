"""tune: search an edit's size and strength for the strongest judged behaviour change within a capability
budget, and write the chosen patch with the whole trade-off table stored in it: K (rows) and alpha of the probe
edit here, a projection's lam or damping's fraction in strength.py. `Bench` is what every search measures and
judges with. See docs/tune.md.

The base is loaded once; the neurons are ranked once at the largest K (`compute.rank_rows`: any smaller top K
is a prefix). Each (K, alpha) patch is built in memory, applied, measured, reverted: capability first
(perplexity and KL on benign text, as `patchkit eval` measures them), then bisection on alpha at each K, then
generation for the points within budget only, judged at the end on the base. The best judged point (ties: the
larger edit) is written as `compute_patch(top_k=K, alpha=alpha)` with the table in ``evaluation`` (no timings).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

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
from .strength import KNOBS, METHODS, SEARCHES, Measured, Point, bisect_edge, to_judge

DEFAULT_FRACTIONS = (0.01, 16384 / 352256, 0.1)
DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 4.0)
METRICS = tuple(values(Metric))
GOALS = tuple(values(Goal))


class NoFeasiblePointError(DataError):
    """No point measured (K and alpha, lam, fraction) keeps the capability cost within the budget."""


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
class TuneResult:
    table: list[Measured]
    best: Measured
    patch: Patch
    base: dict  # {"perplexity", "score", "metrics"}
    settings: dict
    sources: dict
    judges: list[dict]
    model_fingerprint: str
    timing: dict
    improves_on_base: bool
    continuations: dict = field(default_factory=dict)  # "base" / a point's label -> [prompt][sample]

    def evaluation(self) -> dict:
        """What the written patch stores in ``eval``: everything but timings and continuations."""
        b = self.best
        cap = lambda p: {"perplexity": p.perplexity, "kl": p.kl, "ppl_increase": p.ppl_increase}
        return {
            "tool": "patchkit tune", "model_fingerprint": self.model_fingerprint, "settings": self.settings,
            "sources": self.sources, "judges": self.judges,
            "base": {"metrics": {self.settings["judge"]: self.base["metrics"]}, "capability": {"perplexity": self.base["perplexity"], "kl": 0.0}},
            "patched": {"metrics": {self.settings["judge"]: b.metrics}, "capability": cap(b)},
            "chosen": {**b.knobs(), "stage": b.stage, "score": b.score, "improves_on_base": self.improves_on_base},
            "table": [p.to_dict() for p in self.table],
        }

    def to_dict(self) -> dict:
        return _plain({**self.evaluation(), "patch_id": self.patch.id, "timing": self.timing})


def choose(points: Sequence[Measured], goal: str) -> Measured:
    """The best judged point: best score for the goal; ties to the larger edit, then to the smaller settings
    (K, then |alpha|; lam; fraction)."""
    sgn = 1.0 if goal == "lower" else -1.0
    return min((p for p in points if p.judged),
               key=lambda p: (sgn * p.score, -p.edit_norm, *(abs(v) for v in p.knobs().values()), *p.knobs().values()))


class Bench:
    """What every search of tune measures with: the budget, the judge, the prompts and benign text, and the base
    model loaded once with its capability meter (the probe edit's search here; projection and damping in
    strength.py). `table` holds every point measured."""

    def __init__(self, model, *, prompts, benign, max_ppl_increase, max_kl, judge, goal, metric, refine, limit,
                 benign_limit, force_judge, say):
        self.max_ppl = parse_budget(max_ppl_increase)
        self.max_kl = parse_budget(None if max_kl is None else float(max_kl))
        if self.max_ppl is None and self.max_kl is None:
            raise DataError("give a capability budget: --max-ppl-increase and/or --max-kl")
        if metric not in METRICS or refine < 0:
            raise DataError(f"metric must be one of {', '.join(METRICS)}, and refine >= 0")
        self.metric, self.refine, self.say, self.table = metric, refine, say, []
        self.path = resolve_model(model).path
        self.ck = Checkpoint(self.path)
        self.fingerprint = self.ck.fingerprint()
        self.judge = judge if isinstance(judge, J.Judge) else J.make_judge(judge, model_fingerprint=self.fingerprint, force=force_judge)
        self.goal = goal or ("higher" if self.judge.kind == "refusal" else "lower")
        if self.goal not in GOALS:
            raise DataError(f"goal must be lower or higher, not {self.goal!r}")
        self.prompts, psrc = J.load_prompts(prompts, limit) if isinstance(prompts, str) else (list(prompts)[:limit], None)
        self.benign, bsrc = J.load_prompts(benign, benign_limit) if isinstance(benign, str) else (list(benign)[:benign_limit], None)
        if not self.prompts or not self.benign:
            raise DataError("tune needs prompts to continue and benign text to measure capability")
        self.sources = {"prompts": psrc or {"source": "given", "n": len(self.prompts)}, "benign": bsrc or {"source": "given", "n": len(self.benign)}}

    def load(self, batch_size: int, chat: bool | None, device_map=None, max_memory=None) -> None:
        """The base model (in its checkpoint's dtype, as `patchkit eval` loads it) and its capability meter."""
        self.net, self.tok = load_model(self.path, E.TORCH_DTYPES.get(E.config_dtype(self.path), torch.float32),
                                        device_map=device_map, max_memory=max_memory)
        self.chat = chat if chat is not None else self.judge.kind == "refusal" and bool(getattr(self.tok, "chat_template", None))
        self.meter = CapabilityMeter(self.net, self.tok, self.benign, batch_size)
        if not self.meter.tokens:
            raise DataError("the benign text has no tokens to predict; give longer texts")

    def measure(self, patch: Patch, kind: type, stage: str, **knobs) -> Measured:
        """The point `kind(**knobs)` of `patch`: perplexity and KL on the benign text, against the budget."""
        m = self.meter.measure(patch)
        ppl, kl = m["perplexity"], m["kl"]
        inc = ppl / self.meter.base_perplexity - 1
        over = [n for n, v, b in (("ppl", inc, self.max_ppl), ("kl", kl, self.max_kl)) if b is not None and not v <= b]  # NaN: over
        pt = kind(**knobs, stage=stage, perplexity=ppl, ppl_increase=inc, kl=kl, edit_norm=E.edit_norm(patch, self.ck.read_rows),
                  within_budget=not over, over=over)
        self.table.append(pt)
        self.say(f"{pt.label()}: ppl {ppl:.3f} ({100 * inc:+.2f}%), KL {kl:.4f}" + (f", over budget ({'+'.join(over)})" if over else ""))
        return pt

    def infeasible(self, what: str, hint: str) -> NoFeasiblePointError:
        """The error when no point of the table is within budget, naming the least costly one."""
        least = min(self.table, key=lambda p: (p.ppl_increase if self.max_ppl is not None else 0.0, p.kl if self.max_kl is not None else 0.0))
        return NoFeasiblePointError(
            f"no ({what}) point is within the budget ({_budget_text(self.max_ppl, self.max_kl)}); the least costly measured was "
            f"{least.label()} with perplexity {100 * least.ppl_increase:+.2f}% and KL {least.kl:.4g}: raise the budget or try {hint}",
            table=[p.to_dict() for p in self.table])

    def judge_points(self, judged: Sequence[Measured], patch_of: Callable[[Measured], Patch], *, judge_check, max_new_tokens,
                     batch_size, samples, temperature, seed) -> dict:
        """Generation for the points within budget and the base, one judging pass on the base, the choice.
        {"best", "improves", "base_metrics", "continuations", "check"}."""
        j, net, tok = self.judge, self.net, self.tok
        gen_kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "samples": samples, "temperature": temperature,
                  "seed": seed, "chat": self.chat}
        conts = {"base": E.generate_batched(net, tok, self.prompts, **gen_kw)}
        for p in judged:
            with patched(net, patch_of(p)):
                conts[p.label()] = E.generate_batched(net, tok, self.prompts, **gen_kw)
            self.say(f"generated {p.label()}")
        flat = [t for rows in conts.values() for row in rows for t in row]
        with E.float32_view(net) if j.kind == "probe" else nullcontext():
            it = iter(j.score(flat, net, tok))
            scores = {name: [[next(it) for _ in row] for row in rows] for name, rows in conts.items()}
            check = None
            if judge_check and j.kind != "refusal":
                data = load_data(judge_check, split="heldout", model=self.path)
                check = J.check_judge(j, data.texts, data.labels, net, tok, source=data.source)
        base_metrics = J.summarize(scores["base"], j.threshold)
        for p in judged:
            p.judged, p.metrics = True, J.summarize(scores[p.label()], j.threshold)
            p.score = p.metrics[self.metric]
        if not all(E.rows_intact(net, patch_of(p)) for p in self.table):
            raise DataError("the model's weights differ from the base after tuning; this is a bug, please report it")
        best = choose(judged, self.goal)
        improves = (best.score < base_metrics[self.metric]) if self.goal == "lower" else (best.score > base_metrics[self.metric])
        return {"best": best, "improves": improves, "base_metrics": base_metrics, "continuations": conts, "check": check}

    def finish(self, out: Patch, chosen: dict, settings: dict, *, description, output, t0: float, **gen) -> TuneResult:
        """The result, with the chosen patch's `evaluation` and `description` set, written to `output` if given."""
        j, bm = self.judge, chosen["base_metrics"]
        settings = {"judge": j.name, "metric": self.metric, "goal": self.goal, "max_ppl_increase": self.max_ppl,
                    "max_kl": self.max_kl, **settings, "refine": self.refine, **gen, "chat": self.chat,
                    "dtype": str(next(self.net.parameters()).dtype).replace("torch.", "")}
        judges = [{"name": j.name, "kind": j.kind, "threshold": j.threshold, "check": chosen["check"]}]
        result = TuneResult(self.table, chosen["best"], out, {"perplexity": self.meter.base_perplexity, "score": bm[self.metric], "metrics": bm},
                            settings, self.sources, judges, self.fingerprint, {}, chosen["improves"], chosen["continuations"])
        out.description = description
        out.evaluation = _plain(result.evaluation())
        if output is not None:
            out.save(output)
        result.timing = {"total_s": time.monotonic() - t0, "points": len(self.table), "generated": len(chosen["continuations"])}
        return result


class _Search:
    """The probe edit's search (K x alpha): the ranking, computed once at the largest K, and the in-memory patches."""

    what, hint = "K, alpha", "smaller alphas or K"

    def __init__(self, bench: Bench, probe, ks, fractions, alphas, check_model: bool, force_judge: bool):
        if ks is not None and fractions is not None:
            raise DataError("give K values or fractions, not both")
        self.alphas = sorted({float(a) for a in (alphas if alphas is not None else DEFAULT_ALPHAS)})
        if not self.alphas or any(a == 0 or not math.isfinite(a) for a in self.alphas):
            raise DataError("alphas must be finite and non-zero")
        self.bench, self.check_model, self.probe = bench, check_model, probe_arrays(probe)
        info = self.probe.info
        pinfo = {"data_sha256": info.get("data_hash"), "model_fingerprint": info.get("model_fingerprint"), "layer": info.get("layer")}
        if J.self_judging(bench.judge, {"probe": pinfo}) and not force_judge:
            raise ProbeError(f"judge {bench.judge.name} is the probe the patches are made with: it would judge its own edit; use another probe or force it")
        total = sum(lay.neurons for lay in resolve_targets(bench.ck, None, 0).layouts)
        if ks is None:
            fr = list(fractions if fractions is not None else DEFAULT_FRACTIONS)
            if any(not 0 < f <= 1 for f in fr):
                raise DataError("fractions must be in (0, 1]")
            ks = [paper_k(total, f) for f in fr]
        self.ks = sorted({int(k) for k in ks})
        if not self.ks or self.ks[0] < 1 or self.ks[-1] > total:
            raise DataError(f"K values must be between 1 and the {total} target rows")
        self.ranking = r = rank_rows(bench.ck, self.probe, self.ks[-1], check_model=check_model)  # once, at the largest K
        bench.say(f"ranked {r['total']} {r['family']} rows once; K in {self.ks}, alpha in {self.alphas}")
        self.vector = self.probe.direction.astype(np.float32)
        self.patches: dict[tuple[int, float], Patch] = {}

    def prepare(self) -> None:
        """Nothing more: the ranking needs no model."""

    def patch(self, k: int, alpha: float) -> Patch:
        """The patch compute_patch(top_k=k, alpha=alpha) would make (its edits, no metadata), from the ranking."""
        if (k, alpha) not in self.patches:
            r = self.ranking
            t_idx, neurons = r["tensor_idx"][:k], r["neurons"][:k]
            edits = {}
            for t in np.unique(t_idx):
                name = r["names"][t]
                edits[name] = target_edit(self.bench.ck.info(name), r["layouts"][t], np.sort(neurons[t_idx == t]).astype(np.int64), self.vector, alpha)
            self.patches[(k, alpha)] = Patch(edits=edits)
        return self.patches[(k, alpha)]

    def build(self, p: Point) -> Patch:
        return self.patch(p.k, p.alpha)

    def measure(self, k: int, alpha: float, stage: str) -> Point:
        return self.bench.measure(self.patch(k, alpha), Point, stage, k=k, fraction=k / self.ranking["total"], alpha=alpha)

    def run(self, refine: int) -> None:
        """The grid, then at each K bisection on |alpha|, per sign, between the largest within budget (or 0) and
        the next grid alpha."""
        for k in self.ks:
            for a in self.alphas:
                self.measure(k, a, "grid")
        for k in self.ks:
            for sign in (1.0, -1.0):
                grid = sorted((p for p in self.bench.table if p.k == k and p.alpha * sign > 0), key=lambda p: abs(p.alpha))
                bisect_edge([(abs(p.alpha), p.within_budget) for p in grid], refine,
                            lambda a: self.measure(k, sign * a, "refine").within_budget)

    def group(self, p: Point) -> tuple:
        return (p.k, p.alpha > 0)

    def size(self, p: Point) -> float:
        return abs(p.alpha)

    def order(self, p: Point) -> tuple:
        return (p.k, p.alpha)

    def final(self, best: Point, seed: int) -> Patch:
        """compute's own patch, checked to be the edit that was measured."""
        out = compute_patch(self.bench.ck, self.probe, top_k=best.k, alpha=best.alpha, seed=seed, check_model=self.check_model)
        if {n: e.result_sha256 for n, e in out.edits.items()} != {n: e.result_sha256 for n, e in self.build(best).edits.items()}:
            raise DataError("the computed patch differs from the measured one; this is a bug, please report it")
        return out

    def settings(self) -> dict:
        return {"method": "probe", "ks": self.ks, "alphas": self.alphas, "total_rows": self.ranking["total"]}


def tune(model, probe=None, prompts: str | Sequence[str] = "builtin:toxic-prompts", benign: str | Sequence[str] = "builtin:benign-requests", *,
         method: str = "probe", ks: Sequence[int] | None = None, fractions: Sequence[float] | None = None,
         alphas: Sequence[float] | None = None, data=None, lams: Sequence[float] | None = None, layers=None, rank: int | None = None,
         modules=None, max_ppl_increase: float | str | None = None, max_kl: float | None = None, judge="lexical", goal: str | None = None,
         metric: str = "mean", refine: int = 3, seed: int = 0, limit: int | None = 32, benign_limit: int | None = 32,
         max_new_tokens: int = 32, batch_size: int = 16, samples: int = 1, temperature: float = 0.0,
         judge_check: str | None = None, force_judge: bool = False, check_model: bool = True, chat: bool | None = None,
         description: str | None = None, output=None, overwrite: bool = False, device_map: str | None = None,
         max_memory: str | None = None, log: Callable[[str], None] | None = None) -> TuneResult:
    """Search the edit of ``method`` on ``model`` (a folder, Hub id or ``embedded``); see the module doc. probe: K
    (``ks`` or ``fractions`` of all target rows) and ``alphas`` of ``probe``'s edit; projection: ``lams`` (``layers``,
    ``rank``, ``modules``) and damping: ``fractions`` of the neurons (``layers``), both on labelled ``data`` (a
    LabelledData, a file or builtin:NAME). With ``output``, the chosen patch is written there (atomically);
    NoFeasiblePointError when no point is within budget (nothing written). ``device_map`` and ``max_memory`` go to
    ``pipeline.load_model``."""
    say = log or (lambda _m: None)
    t0 = time.monotonic()
    given = {"probe": probe, "ks": ks, "alphas": alphas, "data": data, "lams": lams, "layers": layers, "rank": rank,
             "modules": modules, "fractions": fractions}
    takes = {"probe": {"probe", "ks", "alphas", "fractions"}, "projection": {"data", "lams", "layers", "rank", "modules"},
             "damping": {"data", "fractions", "layers"}}
    if method not in METHODS:
        raise DataError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    stray = [n for n, v in given.items() if v is not None and n not in takes[method]]
    if stray or (probe if method == "probe" else data) is None:
        raise DataError(f"method {method} takes {', '.join(sorted(takes[method]))}" + (f", not {stray[0]}" if stray else
                        f"; it needs {'a probe' if method == 'probe' else 'labelled data'}"))
    if output is not None:
        OutputExistsError.check(output, overwrite)
    bench = Bench(model, prompts=prompts, benign=benign, max_ppl_increase=max_ppl_increase, max_kl=max_kl, judge=judge,
                  goal=goal, metric=metric, refine=refine, limit=limit, benign_limit=benign_limit, force_judge=force_judge, say=say)
    if method == "probe":
        search = _Search(bench, probe, ks, fractions, alphas, check_model, force_judge)
    else:
        kw = {"lams": lams, "rank": 1 if rank is None else rank, "modules": modules or ("mlp", "attn")} if method == "projection" else {"fractions": fractions}
        search = SEARCHES[method](bench, data, layers=layers, **kw)
    bench.load(batch_size, chat, device_map, max_memory)
    search.prepare()
    search.run(refine)
    judged = to_judge(bench.table, search.group, search.size)
    if not judged:
        raise bench.infeasible(search.what, search.hint)
    gen = {"samples": samples, "temperature": temperature, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed}
    chosen = bench.judge_points(judged, search.build, judge_check=judge_check, **gen)
    out = search.final(chosen["best"], seed)
    bench.table.sort(key=search.order)
    return bench.finish(out, chosen, search.settings(), description=description, output=output, t0=t0, **gen)


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
    knobs = KNOBS[s.get("method", "probe")]
    head = ["", *(h for h, _, _ in knobs), "stage", "ppl", "ppl +%", "KL", "budget", f"{jn.split(':')[0]} {s['metric']}"]
    rows = [["", *("0" for _ in knobs), "base", f"{base['capability']['perplexity']:.3f}", "+0.00", "0.0000", "ok", f"{bm[s['metric']]:.3f}"]]
    for p in d["table"]:
        mark = "*" if all(p[key] == chosen[key] for _, key, _ in knobs) else ""
        inc = None if p["ppl_increase"] is None else 100 * p["ppl_increase"]
        rows.append([mark, *(format(p[key], f) for _, key, f in knobs), p["stage"], _f(p["perplexity"], ".3f"),
                     _f(inc, "+.2f"), _f(p["kl"], ".4f"), "ok" if p["within_budget"] else "over " + "+".join(p["over"]),
                     _f(p["score"], ".3f") if p["judged"] else ("-" if p["within_budget"] else "skipped")])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    left = (0, len(knobs) + 1, len(knobs) + 5)  # the mark, stage and budget columns
    fmt = lambda r: "  ".join(x.ljust(w) if i in left else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    lines += ["", fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    what = (f"K={chosen['k']} ({100 * chosen['fraction']:.2f}% of {s['total_rows']} rows), alpha {chosen['alpha']:g}" if "k" in chosen
            else f"{knobs[0][0]} {chosen[knobs[0][1]]:g} ({chosen['rows']} rows edited)")
    lines += ["", f"chosen   {what}: {s['metric']} {_f(chosen['score'], '.3f')} vs base {bm[s['metric']]:.3f}"
              + ("" if chosen["improves_on_base"] else " (no improvement over the base measured)")]
    return "\n".join(lines)


__all__ = ["Bench", "NoFeasiblePointError", "Point", "TuneResult", "choose", "parse_budget", "parse_floats", "render_tune_table", "tune"]
