"""evaluate: what patches do to a model's behaviour and capability, measured on one loaded base.

The base is loaded once, in the checkpoint's dtype; each patch (and each control) is applied in
memory for its generations and reverted after, and the touched rows are checked bit for bit
against the patches' base fingerprints at the end. Judges score the continuations only after every
patch is reverted, so a probe judge reads the BASE model's hidden states and does not move with
the edit. See docs/eval.md for what each number means and its limits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.choices import values
from ..core.patchfile import Patch
from ..core.plan import load_patch
from ..errors import DataError, OutputExistsError, ProbeError, UnsupportedError
from . import judges as J
from .capability import CapabilityMeter
from .choices import ControlKind, ControlMatch
from .comparisons import compare_conditions, condition_metrics, judge_quality, per_prompt  # noqa: F401
from .controls import control_builders, edit_norm, make_controls, model_rows, projection_features, rows_intact  # noqa: F401
from .inmemory import patched
from .matching import match_kl
from .judges import (  # noqa: F401 (re-exported)
    exact_match,
    kl_sum,
    load_prompts,
    load_qa,
    normalize_answer,
    paired_bootstrap,
    summarize,
    token_nll,
)

CONTROL_MATCH = tuple(values(ControlMatch))
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


# --------------------------------------------------------------------------------------- generation
def format_prompts(tok: Any, prompts: Sequence[str], chat: bool) -> list[str]:
    if not chat:
        return list(prompts)
    if not getattr(tok, "chat_template", None):
        raise UnsupportedError("the tokenizer has no chat template; evaluate without chat prompts")
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]


def generate_batched(model, tok, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16, samples: int = 1,
                     temperature: float = 0.0, seed: int = 0, chat: bool = False) -> list[list[str]]:
    """Continuations, ``[prompt][sample]``: batches of similar length, left padding, KV cache.
    Greedy when temperature is 0; sampled runs reseed with ``seed`` so conditions share the draws."""
    if samples > 1 and temperature <= 0:
        raise DataError("several samples need a temperature above 0")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    texts = format_prompts(tok, prompts, chat)
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=not chat)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    out: list[list[str]] = [[] for _ in texts]
    torch.manual_seed(seed)
    kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            enc = tok([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=not chat)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 pad_token_id=tok.pad_token_id, use_cache=True, **kw)
            dec = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for j, i in enumerate(chunk):
                out[i] = [t.strip() for t in dec[j * samples : (j + 1) * samples]]
    return out


@contextmanager
def float32_view(model):
    """The model in float32 inside the block, and exactly as it was after: its parameters go back to
    their dtype (bit-exact for bf16 and fp16: widening is exact) and its buffers are put back as the
    very tensors they were (a float32 buffer of a bf16 model, such as the rotary embedding's
    `inv_freq`, would otherwise come back rounded to bf16 and change every later generation). A
    judge then reads features as probes are trained. A model accelerate placed (offloaded) cannot be
    moved and is used as it is."""
    if getattr(model, "hf_device_map", None):  # placed by accelerate: it cannot be moved; judged as it is
        yield model
        return
    dtype = next(model.parameters()).dtype
    buffers = [(module, name, buf) for module in model.modules() for name, buf in module.named_buffers(recurse=False)]
    model.to(torch.float32)
    try:
        yield model
    finally:
        model.to(dtype)
        for module, name, buf in buffers:  # .to() made new tensors; the originals are untouched
            setattr(module, name, buf)


# ------------------------------------------------------------------------------------------ result
@dataclass
class Condition:
    name: str  # "base", the patch's short id, or "<short id>/random-rows#<seed>"
    kind: str  # base | patch | random-rows | random-direction
    patch_id: str | None = None
    of_patch: str | None = None
    label: str = ""
    rows: int = 0
    edit_norm: float = 0.0
    seed: int | None = None  # of a control
    strength: float | None = None  # of a control: times its patch's strength (searched when its KL is matched)
    continuations: list[list[str]] = field(default_factory=list)  # [prompt][greedy first (if any), then the samples]
    scores: dict[str, list[list[float]]] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    capability: dict = field(default_factory=dict)
    qa: dict | None = None
    seconds: float = 0.0


@dataclass
class EvalResult:
    model: str
    model_fingerprint: str
    settings: dict
    prompts: list[str]
    sources: dict
    judges: list[dict]
    conditions: list[Condition]
    comparisons: list[dict]
    reverted_bit_identical: bool
    timing: dict
    power: dict = field(default_factory=dict)

    def condition(self, name: str) -> Condition:
        return next(c for c in self.conditions if c.name == name or c.patch_id == name)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=float))


# ----------------------------------------------------------------------------------------- evaluate
def evaluate(model_path, patches: Sequence = (), prompts: str | Sequence[str] = "builtin:toxicity-eval",
             benign: str | Sequence[str] | None = "builtin:benign-requests", judges: Sequence = ("lexical",),
             samples: int = 4, temperature: float = 0.9, max_new_tokens: int = 20, batch_size: int = 16,
             controls: bool = False, qa=None, seed: int = 0, *, greedy: bool = True, control_seeds: int = 3,
             control_samples: bool = False, control_data=None, control_match: str = "kl", control_kinds: Sequence[str] | None = None,
             limit: int | None = None, benign_limit: int | None = 32, judge_label: str | None = None,
             judge_check: str | None = None, force_judge: bool = False, chat: bool | None = None, n_boot: int = 4000,
             alpha: float = 0.05, device_map: str | None = None, max_memory: str | None = None,
             log: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate ``patches`` (each a Patch, a path or ``hf://``) on the model at ``model_path`` (a folder, Hub id
    or ``embedded``); see the module doc. ``device_map`` and ``max_memory`` go to ``pipeline.load_model``.
    ``control_data`` (a file or ``builtin:NAME``) is the data a projection patch was made from, for its
    label-shuffled control, when the patch's provenance names a file that is not here. ``control_match``:
    ``kl`` searches each control's strength until its next-token KL on the benign text is the patch's
    (evaluation.matching); ``strength`` builds it at the patch's own strength. ``control_kinds`` keeps only
    the controls of those kinds (evaluation.controls.CONTROL_KINDS), default all that fit each patch."""
    from ..core.checkpoint import Checkpoint
    from ..method.pipeline import load_data, load_model, resolve_model

    say = log or (lambda _m: None)
    t_start = time.monotonic()
    if temperature <= 0:  # no sampling at temperature 0: the greedy continuation only
        samples, greedy = 0, True
    if not greedy and samples < 1:
        raise DataError("nothing to generate: ask for greedy continuations or samples")
    if control_match not in CONTROL_MATCH:
        raise DataError(f"control_match must be one of {', '.join(CONTROL_MATCH)}, not {control_match!r}")
    known = values(ControlKind)
    if control_kinds is not None and (not control_kinds or set(control_kinds) - set(known)):
        raise DataError(f"control kinds must be some of {', '.join(known)}, not {', '.join(control_kinds) or 'none'}")
    path = resolve_model(model_path).path
    fingerprint = Checkpoint(path).fingerprint()
    loaded = [load_patch(p) for p in patches]
    ids = [p.id for p in loaded]
    if len(set(ids)) != len(ids):
        raise DataError("the same patch is given twice")
    dtypes = {e.dtype for p in loaded for e in p.edits.values()} or {config_dtype(path)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in TORCH_DTYPES:
        raise UnsupportedError(f"patches for dtypes {sorted(dtypes)}: evaluate patches of one float dtype at a time")
    judge_objs = [j if isinstance(j, J.Judge) else J.make_judge(j, label=judge_label, model_fingerprint=fingerprint, force=force_judge)
                  for j in judges]
    if not judge_objs or len({j.name for j in judge_objs}) != len(judge_objs):
        raise DataError("give at least one judge, each once")
    for p in loaded:
        for j in judge_objs:
            if J.self_judging(j, p.provenance) and not force_judge:
                raise ProbeError(f"judge {j.name} is the probe patch {p.id[:12]} was made with: it would judge its own edit; "
                                 "use a probe of another layer or data, or force it")
    if isinstance(prompts, str):
        prompt_list, prompt_src = load_prompts(prompts, limit)
    else:
        prompt_list, prompt_src = list(prompts)[:limit], {"source": "given", "n": len(list(prompts)[:limit])}
    if isinstance(benign, str):
        benign_list, benign_src = load_prompts(benign, benign_limit)
    else:
        benign_list = list(benign or [])[:benign_limit]
        benign_src = {"source": "given", "n": len(benign_list)}
    qa_rows = load_qa(qa) if qa else None
    model, tok = load_model(path, TORCH_DTYPES[next(iter(dtypes))], device_map=device_map, max_memory=max_memory)
    use_chat = chat if chat is not None else any(j.kind == "refusal" for j in judge_objs) and bool(getattr(tok, "chat_template", None))

    conds: list[tuple[Condition, Patch | None]] = [(Condition("base", "base", label="base"), None)]
    base_rows = model_rows(model)  # the size of a scale edit needs the base rows
    meter = None
    if controls and control_match == "kl" and loaded:
        if not benign_list:
            raise DataError("matching the controls' KL needs benign text; give some, or match their strength instead")
        meter = CapabilityMeter(model, tok, benign_list, batch_size)
    for p in loaded:
        pc = Condition(p.id[:12], "patch", p.id, label=p.description or p.id[:12], rows=p.rows, edit_norm=edit_norm(p, base_rows))
        conds.append((pc, p))
        if controls:
            # a projection patch's label-shuffled controls share one pass over its data's features
            wanted = set(control_kinds or known)
            feats = projection_features(model, p, data=control_data and load_data(control_data, model=path)) if (
                (p.provenance or {}).get("method") == "projection" and "label-shuffled" in wanted) else None
            conds += _control_conditions(model, pc, p, range(seed, seed + control_seeds), feats, meter, base_rows, say, wanted)
    gen_kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "chat": use_chat}
    for cond, p in conds:
        t0 = time.monotonic()
        with patched(model, *([p] if p is not None else [])):
            g = generate_batched(model, tok, prompt_list, **gen_kw) if greedy else [[] for _ in prompt_list]
            sample_it = samples and (cond.kind in ("base", "patch") or control_samples or not greedy)
            sm = (generate_batched(model, tok, prompt_list, samples=samples, temperature=temperature, seed=seed, **gen_kw)
                  if sample_it else [[] for _ in prompt_list])
            cond.continuations = [a + b for a, b in zip(g, sm)]
            if qa_rows:
                preds = generate_batched(model, tok, [q for q, _ in qa_rows], max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         chat=bool(getattr(tok, "chat_template", None)))
                hits = [exact_match(pr[0], a) for pr, (_q, a) in zip(preds, qa_rows)]
                cond.qa = {"exact_match": float(np.mean(hits)), "n": len(hits), "predictions": [pr[0] for pr in preds]}
        cond.seconds = time.monotonic() - t0
        say(f"generated {cond.name}: {len(prompt_list)} prompts x {int(greedy) + samples} in {cond.seconds:.1f} s")
    benign_conts = []
    if judge_check and benign_list and any(j.kind != "refusal" for j in judge_objs):
        chat_ok = bool(getattr(tok, "chat_template", None))
        benign_conts = [r[0] for r in generate_batched(model, tok, benign_list, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat_ok)]

    # judges: every patch is reverted now, so the model is the base
    with _judge_view(model, judge_objs):
        judge_info = _judge(judge_objs, conds, greedy, judge_check, benign_conts, benign_src, model, tok, say, path)
    if benign_list:
        _capability(meter or CapabilityMeter(model, tok, benign_list, batch_size), conds)
        say("capability measured on benign text")
    intact = all(rows_intact(model, p) for _c, p in conds if p is not None)
    comparisons, power = compare_conditions([c for c, _ in conds], judge_objs, greedy, samples, n_boot, seed, alpha)  # noqa: E501
    settings = {"greedy": greedy, "samples": samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "controls": controls, "control_seeds": control_seeds if controls else 0,
                "control_samples": bool(controls and (control_samples or not greedy) and samples), "seed": seed,
                "control_match": control_match if controls else None,
                "control_kinds": sorted(control_kinds) if controls and control_kinds else None,
                "chat": use_chat, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "n_boot": n_boot,
                "alpha": alpha, "judge_check": judge_check, "force_judge": force_judge}
    sources = {"prompts": prompt_src, "benign": benign_src, "qa": str(qa) if qa else None}
    gen_s = sum(c.seconds for c, _ in conds)
    timing = {"total_s": time.monotonic() - t_start, "generation_s": gen_s,
              "prompts_per_s": len(prompt_list) * len(conds) / gen_s if gen_s else None}
    return EvalResult(str(path), fingerprint, settings, prompt_list, sources, judge_info, [c for c, _ in conds],
                      comparisons, intact, timing, power)


def _judge(judge_objs, conds, greedy, judge_check, benign_conts, benign_src, model, tok, say, path) -> list[dict]:
    """Score every continuation with every judge, and each judge's quality (see :func:`judge_quality`)."""
    from ..method.pipeline import load_data

    check_held = load_data(judge_check, split="heldout", model=path) if judge_check else None
    check_all = load_data(judge_check, split="all", model=path) if judge_check else None
    info_out = []
    for j in judge_objs:
        flat = [t for c, _ in conds for row in c.continuations for t in row]
        scores = iter(j.score(flat, model, tok))
        for c, _ in conds:
            c.scores[j.name] = [[next(scores) for _ in row] for row in c.continuations]
            c.metrics[j.name] = condition_metrics(c.scores[j.name], j.threshold, greedy)  # controls without samples: greedy only
        info = {"name": j.name, "kind": j.kind, "threshold": j.threshold, "info": j.info, "check": None, "quality": None}
        if check_held is not None and j.kind != "refusal":
            info["check"] = J.check_judge(j, check_held.texts, check_held.labels, model, tok, source=check_held.source)
            base_scores = [s for row in conds[0][0].scores[j.name] for s in row]
            info["quality"] = judge_quality(j, check_all, j.score(benign_conts, model, tok) if benign_conts else [], base_scores,
                                            model, tok, benign_src)
        info_out.append(info)
        say(f"judged with {j.name}")
    return info_out


def config_dtype(path: Path) -> str:
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(name, "F32")


@contextmanager
def _judge_view(model, judge_objs):
    if any(j.kind == "probe" for j in judge_objs):
        with float32_view(model):
            yield
    else:
        yield


def _control_conditions(model, cond: Condition, patch: Patch, seeds, feats, meter, base_rows, say, kinds) -> list[tuple[Condition, Patch]]:
    """The patch's controls (evaluation.controls, by its method), one per kind and seed: at the strength
    whose KL matches the patch's when `meter` is given (each seed starts from the previous seed's), else
    at the patch's own strength. With a meter, the patch's `cond` and each control keep the capability
    the search measured (the meter's numbers do not change: `_capability` does not measure them again)."""
    out, start = [], {}
    target = None
    if meter is not None:
        cond.capability = meter.measure(patch)
        target = cond.capability["kl"]
    for s in seeds:
        for kind, build in control_builders(model, patch, s, features=feats):
            if kind not in kinds:
                continue
            if meter is None:
                c, strength, label = build(1.0), 1.0, f"{kind} control, seed {s}"
            else:
                m = match_kl(meter.measure, build, target, start.get(kind, 1.0))
                start[kind] = m.strength
                c, strength = m.patch, m.strength
                label = f"{kind} control, seed {s}, strength x{m.strength:.3g}" + ("" if m.matched else " (KL not matched)")
                say(f"control {kind} #{s} of {patch.id[:12]}: strength x{m.strength:.3g}, KL {m.capability.get('kl') or 0:.4g} "
                    f"for the patch's {target or 0:.4g} ({m.evaluations} evaluations)")
            out.append((Condition(f"{patch.id[:12]}/{kind}#{s}", kind, c.id, patch.id, label, c.rows, edit_norm(c, base_rows), s,
                                  strength=strength, capability=m.capability if meter is not None else {}), c))
    return out


def _capability(meter: CapabilityMeter, conds) -> None:
    """Perplexity of each condition on the meter's texts, and mean next-token KL(base || condition),
    where the control search has not measured it already."""
    for c, p in conds:
        if not c.capability:
            c.capability = meter.base if p is None else meter.measure(p)


# ------------------------------------------------------------------------------------------- attach
def evaluation_summary(result: EvalResult, patch_id: str) -> dict:
    """The numbers of one patch (and of the base and its controls) as stored in a patch's ``eval``."""
    cond = next((c for c in result.conditions if c.kind == "patch" and c.patch_id.startswith(patch_id)), None)
    if cond is None:
        raise DataError(f"patch {patch_id[:12]} is not in this evaluation")
    base = result.conditions[0]
    controls = {c.kind: {"metrics": c.metrics, "capability": c.capability} for c in result.conditions if c.of_patch == cond.patch_id}
    return {
        "tool": "patchkit evaluate", "evaluated_patch_id": cond.patch_id, "model_fingerprint": result.model_fingerprint,
        "settings": result.settings, "sources": result.sources,
        "judges": [{k: j[k] for k in ("name", "kind", "threshold", "check")} for j in result.judges],
        "base": {"metrics": base.metrics, "capability": base.capability, "qa": (base.qa or {}).get("exact_match")},
        "patched": {"metrics": cond.metrics, "capability": cond.capability, "qa": (cond.qa or {}).get("exact_match")},
        "controls": controls, "effects": [r for r in result.comparisons if r["patch"] == cond.name],
    }


def eval_output(patch_path) -> Path:
    """Where `attach_evaluation` writes by default: ``<name>.eval.safetensors`` beside the patch."""
    p = Path(patch_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".eval.safetensors")


def attach_evaluation(patch_path, result: EvalResult, patch_id: str | None = None, output=None, overwrite: bool = False) -> Patch:
    """Write a NEW patch file: the patch with ``evaluation`` set to this result's numbers for it.

    The content id covers the evaluation, so the new file has a new id (its edits, rows and base
    fingerprints are unchanged; ``evaluation.evaluated_patch_id`` names the file that was measured).
    ``output`` defaults to ``<name>.eval.safetensors`` beside the patch."""
    patch = Patch.load(patch_path)
    pid = patch_id or patch.id
    if not patch.id.startswith(pid):
        raise DataError(f"patch {patch_path} has id {patch.id[:12]}, not {pid[:12]}")
    summary = evaluation_summary(result, patch.id)
    out = Path(output) if output else eval_output(patch_path)
    OutputExistsError.check(out, overwrite)
    patch.evaluation = json.loads(json.dumps(summary, default=float))
    patch.save(out)
    return patch
