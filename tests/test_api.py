"""The top-level Python API named in the README: lazy names that resolve and work together."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from conftest import build_patch
from helpers import snapshot

import patchkit
from patchkit.core.checkpoint import Checkpoint
from patchkit.method.probe import Probe


def test_readme_api_round_trip(copy_ckpt, tmp_path):
    base = copy_ckpt("bf16", True)
    before = snapshot(base)
    fix = build_patch(base, seed=3).save(tmp_path / "fix.safetensors")
    patch = patchkit.Patch.load(fix)
    assert patchkit.apply(fix, base, tmp_path / "fixed")["rows"] == patch.rows
    ck = Checkpoint(base)
    probe = Probe(weight=torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), bias=torch.zeros(2),
                  model_fingerprint=ck.fingerprint())
    detox = patchkit.compute_patch(base, probe, top_k=6, alpha=1.08)
    both = patchkit.merge_patches([patch, detox], on_overlap="sum", base=base)
    assert both.rows == len({(n, r) for p in (patch, detox) for n, e in p.edits.items() for r in e.rows.tolist()})
    patchkit.apply(both, base, in_place=True)
    assert patchkit.status(base)["applied"][0]["id"] == both.id
    patchkit.revert(both, base, in_place=True)
    assert snapshot(base) == before
    diffed = patchkit.diff(base, tmp_path / "fixed", max_changed=1.0)  # the patch edits a 1-d norm: one row
    assert set(diffed.edits) == set(patch.edits)
    assert np.array_equal(diffed.edits[sorted(patch.edits)[0]].rows, patch.edits[sorted(patch.edits)[0]].rows)


def test_import_patchkit_does_not_import_torch():
    code = "import sys, patchkit; patchkit.Patch; patchkit.apply; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
