"""The projection and damping conditions of the final run: each patch with greedy + sampled
continuations, and its own controls (patchkit.evaluation.controls: projection -> random-direction and
label-shuffled, damping -> random-neurons), each seed's strength searched until its KL on benign text
is within 10 % of the patch's; the controls are greedy only."""

from __future__ import annotations

from .common import edit_ratio, match_kl, run_tox, say
from .methods import spec_name

# chosen by the quick search (benchmarks/BEHAVIOR.md, "Search"); the keys are --parts names
CONDITIONS = {
    "proj-self": dict(method="projection", data="self", lam=0.3, layers="15-29", modules=("mlp",), rank=2),
    "proj-self-35": dict(method="projection", data="self", lam=0.35, layers="15-29", modules=("mlp",), rank=2),
    "proj-self-file": dict(method="projection", data="self", lam=0.35, layers="15-29", modules=("mlp",), rank=2,
                           file="patches/smollm2-135m-instruct-detox-projection.safetensors"),
    "proj-self-attn": dict(method="projection", data="self", lam=0.3, layers="15-29", modules=("mlp", "attn"), rank=2),
    "proj-toxigen": dict(method="projection", data="toxigen", lam=0.5, layers="15-29", modules=("mlp",)),
    "damp-self": dict(method="damping", data="self", fraction=0.03),
}
QUICK_CONDITIONS = ("proj-self",)


def method_sweep(R, M, prompts, judges, cfg, out, parts):
    """Per condition asked for: the patch and its controls at matched KL, appended to ``out``."""
    for part in [p for p in CONDITIONS if p in parts]:
        spec = CONDITIONS[part]
        name = spec_name(spec)
        patch = M.make(spec)
        strength = spec.get("lam", 1.0)
        cap = R.cap(patch)
        conts, scores, secs = run_tox(R.model, R.tok, patch, prompts, cfg["samples"], judges, R.args.seed)
        out.append({"name": name, "kind": "patch", "method": spec["method"], "part": part,
                    "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}, "alpha": strength,
                    "edit_norm_ratio": edit_ratio(R.model, patch), "patch_id": patch.id, "provenance": patch.provenance,
                    "capability": cap, "continuations": conts, "scores": scores, "seconds": secs})
        say(f"toxicity: {name}: KL {cap['kl']:.4f} ppl {cap['perplexity']:.2f}, {secs:.1f} s")
        start = {}
        for seed in range(R.args.seed, R.args.seed + cfg["seeds"]):
            for kind, build in M.controls(spec, patch, seed):
                (s, ccap, cp), same_kl, evals = match_kl(R.cap, build, cap["kl"], start.get(kind, 1.0), 1.0, lo_bound=0.02, hi_bound=64.0)
                start[kind] = s  # the next seed starts from this one's strength
                conts, scores, secs = run_tox(R.model, R.tok, cp, prompts, 0, judges, R.args.seed)
                out.append({"name": f"{name} / {kind} #{seed}", "kind": kind, "of": name, "seed": seed, "alpha": s * strength,
                            "strength": s, "edit_norm_ratio": edit_ratio(R.model, cp), "kl_at_patch_alpha": same_kl,
                            "kl_search_evals": evals, "provenance": cp.provenance, "capability": ccap, "continuations": conts,
                            "scores": scores, "seconds": secs})
                say(f"toxicity:   {kind} #{seed}: strength {s:.3g} KL {ccap['kl']:.4f} ({evals} KL evals), {secs:.1f} s")
    return out
