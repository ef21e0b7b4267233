"""Patches in memory equal patches on disk: same weights, same logits; `patched()` restores bit for bit."""

from __future__ import annotations

import numpy as np
import helpers
import pytest
import torch

from conftest import TORCH_DTYPES, assert_tensors_bitequal, build_patch, load_tensors
from patchkit.core import ops
from patchkit.errors import BaseMismatchError
from patchkit.evaluation.inmemory import apply_in_memory, patched, revert_in_memory


def load_model(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 44, 100, 7]])


@pytest.mark.parametrize("variant_", [("bf16", False), ("fp16", True), ("fp32", True)], ids=str)
def test_patched_checkpoint_gives_the_logits_of_the_patch_in_memory(variant_, ckpts, tmp_path):
    base = ckpts[variant_]
    dtype = TORCH_DTYPES[variant_[0]]
    # large enough deltas that the logits move; dense, factored and replace edits, a 1-d tensor
    p = build_patch(base, seed=4, scale=0.5, rows_per=12, kinds=["dense", "factored", "replace", "factored"])
    path = p.save(tmp_path / "p.safetensors")
    ops.apply(path, base, tmp_path / "patched")

    disk = load_model(tmp_path / "patched", dtype)
    model = load_model(base, dtype)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_logits = model(IDS).logits
        want = disk(IDS).logits
        with patched(model, path) as m:
            assert m is model
            got = model(IDS).logits
            # the weights in memory are the weights on disk, bit for bit
            assert_tensors_bitequal({k: v for k, v in model.state_dict().items()}, dict(disk.state_dict()))
        assert torch.equal(got, want)
        assert not torch.equal(base_logits, want)  # the patch does something
        assert_tensors_bitequal(dict(model.state_dict()), original)
        assert torch.equal(model(IDS).logits, base_logits)


def test_patched_restores_after_an_exception(ckpts, tmp_path):
    base = ckpts[("bf16", False)]
    model = load_model(base, torch.bfloat16)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    p = build_patch(base, seed=1, scale=0.3)
    with pytest.raises(RuntimeError, match="boom"):
        with patched(model, p):
            assert not torch.equal(model.state_dict()["lm_head.weight"], original["lm_head.weight"])
            raise RuntimeError("boom")
    assert_tensors_bitequal(dict(model.state_dict()), original)


def test_state_dict_apply_and_revert(ckpts, tmp_path):
    base = ckpts[("fp16", False)]
    sd = load_tensors(base)
    original = {k: v.clone() for k, v in sd.items()}
    p1 = build_patch(base, seed=1, kinds=["replace", "dense", "factored", "dense"])
    ops.apply(p1.save(tmp_path / "p1.safetensors"), base, tmp_path / "mid")
    p2 = build_patch(tmp_path / "mid", seed=2, rows_per=20)  # on top of p1, overlapping rows
    ops.apply(p2.save(tmp_path / "p2.safetensors"), tmp_path / "mid", tmp_path / "both")
    u1 = apply_in_memory(sd, p1)
    u2 = apply_in_memory(sd, tmp_path / "p2.safetensors")
    assert_tensors_bitequal(sd, load_tensors(tmp_path / "both"))
    revert_in_memory(sd, u2)
    assert_tensors_bitequal(sd, load_tensors(tmp_path / "mid"))
    revert_in_memory(sd, u1)
    assert_tensors_bitequal(sd, original)


def test_patch_for_another_model_is_refused_and_changes_nothing(ckpts):
    sd = load_tensors(ckpts[("bf16", False)])
    original = {k: v.clone() for k, v in sd.items()}
    other = build_patch(ckpts[("bf16-other", False)])
    with pytest.raises(BaseMismatchError, match="differ from the patch's base"):
        apply_in_memory(sd, other)
    with pytest.raises(BaseMismatchError, match="F16"):
        apply_in_memory(sd, build_patch(ckpts[("fp16", False)]))
    assert_tensors_bitequal(sd, original)
    del sd["lm_head.weight"]
    with pytest.raises(BaseMismatchError, match="no tensor lm_head.weight"):
        apply_in_memory(sd, build_patch(ckpts[("bf16", False)]))
    # check=False adds the deltas anyway
    sd = load_tensors(ckpts[("bf16", False)])
    undo = apply_in_memory(sd, other, check=False)
    assert not torch.equal(sd["lm_head.weight"], original["lm_head.weight"])
    revert_in_memory(sd, undo)
    assert_tensors_bitequal(sd, original)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_patches_apply_in_memory_to_fused_experts(family, tmp_path):
    """transformers saves experts one by one but holds them fused in memory: the names are mapped."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    from patchkit.core import ops
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.evaluation.inmemory import patched
    from patchkit.method.compute import compute_patch
    from patchkit.method.probefile import ProbeArrays

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2)
    if family == "mixtral":
        cfg = MixtralConfig(intermediate_size=48, num_local_experts=4, **common)
    else:
        cfg = Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4, **common)
    model = helpers.make_model(cfg, seed=1, dtype=torch.float32)
    base = helpers.save_checkpoint(model, tmp_path / "base")
    probe = ProbeArrays(np.random.default_rng(2).standard_normal((2, 32)).astype(np.float32), np.zeros(2, np.float32),
                        {"behavior_index": 1})
    patch = compute_patch(Checkpoint(base), probe, top_k=12, alpha=2.0)
    assert any("experts." in n for n in patch.edits)
    ops.apply(patch, base, tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), patched(model, patch):
        got = model(ids).logits
    assert torch.equal(got, expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # and `eval`, with its controls, runs on the fused layout and restores the weights
    from patchkit.evaluation import judges as J
    from patchkit.evaluation.evaluate import evaluate

    path = patch.save(tmp_path / "moe.safetensors")
    r = evaluate(base, [path], prompts=["the good dog", "a cruel group"], benign=["the river is calm"],
                 judges=[J.lexical(["cruel"])], controls=True, control_seeds=1, max_new_tokens=2, batch_size=2)
    assert r.reverted_bit_identical and len(r.conditions) == 4
