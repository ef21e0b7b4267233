"""The paper's method (model surgery: gate_proj rows moved along a probe direction) in the benchmark:
one patch per editing probe x strategy at the shipped patch's edit size, and its random-rows and
random-direction controls at matched KL."""

from __future__ import annotations

from .common import ALPHA, FRACTION, edit_ratio, match_kl, run_tox, say

STRATEGIES = ("paper", "layer-matched")
ORDER = (("toxigen", "paper"), ("self", "paper"), ("self", "layer-matched"), ("toxigen", "layer-matched"))
PAPER_PARTS = tuple(f"{p}-{s}" for p, s in ORDER)
SELF_EPOCHS = 25  # ~2,400 examples: 25 epochs are ~3,800 steps, more than the ToxiGen probe's 100 epochs x 10 batches


def train_probes(self_spec, parts):
    """{probe name: {strategy: Probe}} for the paper parts asked for, and always toxigen/paper (it sets the
    edit size of every patch). toxigen: builtin:toxicity; self: ``self_spec``."""
    from patchkit.method.pipeline import train_probe_for

    need = {("toxigen", "paper")} | {o for o in ORDER if f"{o[0]}-{o[1]}" in parts}
    probes = {"toxigen": {}, "self": {}}
    for pname, strategy in sorted(need):
        spec, kw = ("builtin:toxicity", {}) if pname == "toxigen" else (self_spec, {"epochs": SELF_EPOCHS})
        probes[pname][strategy] = train_probe_for("embedded", spec, layer_matched=strategy == "layer-matched", progress=False, **kw).probe
        say(f"probe {pname} {strategy} on {spec} trained")
    return probes


def paper_sweep(R, probes, prompts, judges, cfg, out, parts):
    """Per probe x strategy asked for, one patch (same edit-norm ratio as paper/toxigen at ALPHA) and its
    controls, appended to ``out`` (a list that saves itself)."""
    from patchkit.evaluation.controls import make_controls
    from patchkit.method.compute import compute_patch

    # every patch gets the ||alpha v|| / ||row|| of the paper patch of the toxigen probe at ALPHA
    target_ratio = edit_ratio(R.model, compute_patch(R.path, probes["toxigen"]["paper"], fraction=FRACTION, alpha=ALPHA))
    for pname, strategy in [o for o in ORDER if f"{o[0]}-{o[1]}" in parts]:
        probe = probes[pname][strategy]
        patch = compute_patch(R.path, probe, fraction=FRACTION, alpha=ALPHA, strategy=strategy)
        ratio = edit_ratio(R.model, patch)
        a = ALPHA
        if abs(ratio / target_ratio - 1) > 1e-9:  # the same ||alpha v|| / ||row|| as the paper patch of the toxigen probe
            a = ALPHA * target_ratio / ratio
            patch = compute_patch(R.path, probe, fraction=FRACTION, alpha=a, strategy=strategy)
            ratio = edit_ratio(R.model, patch)
        cap = R.cap(patch)
        conts, scores, secs = run_tox(R.model, R.tok, patch, prompts, cfg["samples"], judges, R.args.seed)
        tag = f"{pname} {strategy}"
        out.append({"name": tag, "kind": "patch", "method": "model-surgery", "probe": pname, "strategy": strategy,
                    "k": patch.provenance["params"]["k"], "alpha": a, "edit_norm_ratio": ratio, "patch_id": patch.id, "capability": cap,
                    "continuations": conts, "scores": scores, "seconds": secs})
        say(f"toxicity: {tag} (alpha {a:.3g}, ratio {ratio:.2f}) KL {cap['kl']:.4f} ppl {cap['perplexity']:.2f}, {secs:.1f} s")
        for ci, kind in enumerate(("random-rows", "random-direction")):
            start = a
            for seed in range(R.args.seed, R.args.seed + cfg["seeds"]):
                def make(c, ci=ci, seed=seed):
                    p = compute_patch(R.path, probe, fraction=FRACTION, alpha=c, strategy=strategy)
                    return make_controls(R.model, p, seed=seed)[ci][1]
                (ca, ccap, cp), same_kl, evals = match_kl(R.cap, make, cap["kl"], start, a)
                start = ca  # the next seed starts from this one's alpha
                conts, scores, secs = run_tox(R.model, R.tok, cp, prompts, 0, judges, R.args.seed)
                out.append({"name": f"{tag} / {kind} #{seed}", "kind": kind, "of": tag, "seed": seed, "alpha": ca,
                            "edit_norm_ratio": edit_ratio(R.model, cp), "kl_at_patch_alpha": same_kl, "kl_search_evals": evals,
                            "capability": ccap, "continuations": conts, "scores": scores, "seconds": secs})
                say(f"toxicity:   {kind} #{seed}: alpha {ca:.3g} KL {ccap['kl']:.4f} ({evals} KL evals), {secs:.1f} s")
    return out
