"""Chains end to end: compute on a patched checkpoint records parents; apply and revert respect them; merge folds them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_tensors
from helpers import snapshot
from patchkit.core import ops
from patchkit.core.checkpoint import Checkpoint
from patchkit.core.merge import MergeError, merge_patches
from patchkit.core.patchfile import Patch
from patchkit.errors import BaseMismatchError, StateError
from patchkit.method.compute import compute_patch
from patchkit.method.probe import Probe


def make_probe(ck: Checkpoint, seed: int) -> Probe:
    g = torch.Generator().manual_seed(seed)
    return Probe(weight=torch.randn(2, ck.config["hidden_size"], generator=g), bias=torch.zeros(2),
                 label_names=("ok", "toxic"), model_fingerprint="", n_examples=10, train_accuracy=1.0)


@pytest.fixture
def chain(copy_ckpt, tmp_path):
    """base, parent P computed on it, P applied in place to a copy, child C computed on that copy."""
    base = copy_ckpt("bf16", name="base")
    parent = compute_patch(base, make_probe(Checkpoint(base), 3), top_k=12, alpha=1.08)
    p_path = parent.save(tmp_path / "parent.safetensors")
    patched = copy_ckpt("bf16", name="patched")
    ops.apply(p_path, patched, in_place=True)
    child = compute_patch(patched, make_probe(Checkpoint(patched), 4), top_k=12, alpha=0.5)
    c_path = child.save(tmp_path / "child.safetensors")
    return base, patched, Patch.load(p_path), Patch.load(c_path)


def test_compute_on_a_patched_checkpoint_records_the_parent(chain):
    _, _, parent, child = chain
    assert parent.parents == [] and child.parents == [parent.id]


def test_apply_child_without_parent_is_refused_naming_the_parent(chain, tmp_path, cli_runner):
    base, _, parent, child = chain
    before = snapshot(base)
    with pytest.raises(StateError, match=f"on top of patch {parent.id[:12]}.*apply it first") as ei:
        ops.apply(child.path, base, tmp_path / "out")
    assert ei.value.parent == parent.id
    r = cli_runner("apply", child.path, base, "-o", tmp_path / "out2")
    assert r.exit_code == 6 and parent.id[:12] in r.output and "apply it first" in r.output
    with pytest.raises(StateError, match="apply it first"):  # the order inside one apply matters too
        ops.apply([child.path, parent.path], base, tmp_path / "out3")
    assert snapshot(base) == before and not (tmp_path / "out").exists()
    r = ops.apply([parent.path, child.path], base, tmp_path / "both")
    assert r["applied"] == [parent.id, child.id]


def test_revert_parent_while_child_applied_is_refused_naming_the_child(chain, cli_runner):
    base, patched, parent, child = chain
    ops.apply(child.path, patched, in_place=True)
    before = snapshot(patched)
    with pytest.raises(StateError, match=f"patch {child.id[:12]} was made on top of patch {parent.id[:12]}: revert it first") as ei:
        ops.revert(parent.path, patched, in_place=True)
    assert ei.value.child == child.id
    r = cli_runner("revert", parent.id[:12], patched, "--in-place")
    assert r.exit_code == 6 and child.id[:12] in r.output
    assert snapshot(patched) == before
    ops.revert(child.path, patched, in_place=True)
    ops.revert(parent.path, patched, in_place=True)
    assert snapshot(patched) == snapshot(base)
    assert json.loads(json.dumps(ops.status(patched)))["applied"] == []


def test_merge_of_parent_and_child(chain, tmp_path):
    """Allowed, parent first; the result has the parent's parents and applies to the parent's base."""
    base, patched, parent, child = chain
    shared = [n for n in child.edits if n in parent.edits and not np.array_equal(child.edits[n].rows, parent.edits[n].rows)]
    if shared:
        with pytest.raises(MergeError, match="--base CHECKPOINT"):
            merge_patches([parent, child])
    with pytest.raises(MergeError, match="before it"):
        merge_patches([child, parent], base=base)
    merged = merge_patches([parent, child], base=base)
    assert merged.parents == parent.parents == []
    assert merged.provenance["base_check"] == "checkpoint"
    ops.apply([merged], base, tmp_path / "merged")
    ops.apply(child.path, patched, tmp_path / "seq")
    got, want = load_tensors(tmp_path / "merged"), load_tensors(tmp_path / "seq")
    overlap = any(np.intersect1d(e.rows, child.edits[n].rows).size for n, e in parent.edits.items() if n in child.edits)
    for name in want:  # bit for bit where no row is edited by both (tests/test_merge.py measures the overlapping case)
        if overlap:
            diff = (got[name].float() - want[name].float()).abs()
            assert float(diff.max()) <= 2.0**-7 * max(1.0, float(want[name].float().abs().max())), name
        else:
            assert torch.equal(got[name], want[name]), name
    # the merged patch on a checkpoint that has the parent applied: refused (its base is the parent's)
    with pytest.raises(BaseMismatchError, match="another base"):
        ops.apply([merged], patched, tmp_path / "twice")
