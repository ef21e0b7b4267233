"""Models larger than memory, through accelerate's big-model inference (`device_map`, `max_memory`).

With most weights offloaded to disk (parameters on the meta device, loaded by accelerate's hooks
before each forward), a model gives the features and greedy generations of the same model loaded
whole; a patch applied in memory gives the logits of the patched checkpoint; reverting restores
every tensor bit for bit; and the checkpoint the offloaded weights are read from is never written.
"""

from __future__ import annotations

from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

from conftest import build_patch
from patchkit.core import ops
from patchkit.errors import BaseMismatchError

pytest.importorskip("accelerate")

from patchkit.evaluation.controls import make_controls, rows_intact  # noqa: E402
from patchkit.evaluation.evaluate import generate_batched  # noqa: E402
from patchkit.evaluation.inmemory import apply_in_memory, patched, revert_in_memory, state_tensors  # noqa: E402
from patchkit.method.activations import extract_features, extract_gate_inputs  # noqa: E402
from patchkit.method.pipeline import load_model  # noqa: E402

TEXTS = ["the good dog and the calm river", "they hate the cruel enemy", "love", "a happy friend in the city at night",
         "bad awful people hurt the group"]
PROMPTS = ["the kind friend", "they hate", "a dog and a cat by the river"]
IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 44, 100, 7]])


def on_disk(model) -> list[str]:
    """The tensors accelerate keeps out of the model (meta parameters): a test must have some."""
    return [k for k, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]


def weights(model) -> dict[str, torch.Tensor]:
    """Every tensor's current value, offloaded ones read through accelerate's hooks."""
    tensors = state_tensors(model)
    return {k: tensors[k].detach().clone() for k in tensors}


def assert_bitequal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].contiguous().view(torch.uint8)), k


def test_offloaded_model_gives_the_same_features_and_generations(ckpts):
    path = ckpts[("bf16", True)]
    whole, tok = load_model(path)
    small, _ = load_model(path, torch.float32, device_map="auto", max_memory="60KB")
    assert "disk" in small.hf_device_map.values()
    assert "model.layers.1.mlp.gate_proj.weight" in on_disk(small) and "lm_head.weight" in on_disk(small)
    for layer in (-1, 1):
        want = extract_features(whole, tok, TEXTS, layer=layer, batch_size=2, progress=False)
        got = extract_features(small, tok, TEXTS, layer=layer, batch_size=2, progress=False)
        assert torch.equal(got, want)
    want = extract_gate_inputs(whole, tok, TEXTS, batch_size=2, progress=False)
    got = extract_gate_inputs(small, tok, TEXTS, batch_size=2, progress=False)
    assert sorted(got) == sorted(want) == [0, 1, 2] and all(torch.equal(got[i], want[i]) for i in want)
    gens = generate_batched(small, tok, PROMPTS, max_new_tokens=6, batch_size=2)
    assert gens == generate_batched(whole, tok, PROMPTS, max_new_tokens=6, batch_size=2)
    assert any(g[0] for g in gens)


def test_patched_offloaded_model_equals_the_patched_checkpoint_and_reverts(ckpts, tmp_path):
    base = ckpts[("bf16", True)]
    files = helpers.weight_files(base)
    # dense, factored and replace edits; a 1-d norm, two MLP weights and lm_head, all offloaded
    p = build_patch(base, seed=4, scale=0.5, rows_per=12, kinds=["dense", "factored", "replace", "factored"])
    path = p.save(tmp_path / "p.safetensors")
    ops.apply(path, base, tmp_path / "patched")
    disk, tok = load_model(tmp_path / "patched", torch.bfloat16)
    model, _ = load_model(base, torch.bfloat16, device_map="auto", max_memory="30KB")
    assert set(p.edits) <= set(on_disk(model))
    original = weights(model)
    with torch.no_grad():
        base_logits = model(IDS).logits
        want = disk(IDS).logits
        with patched(model, path) as m:
            assert m is model
            assert torch.equal(model(IDS).logits, want)
            assert_bitequal(weights(model), dict(disk.state_dict()))
            assert generate_batched(model, tok, PROMPTS, max_new_tokens=6) == generate_batched(disk, tok, PROMPTS, max_new_tokens=6)
        assert not torch.equal(base_logits, want)  # the patch does something
        assert_bitequal(weights(model), original)
        assert torch.equal(model(IDS).logits, base_logits)
    assert helpers.weight_files(base) == files  # the offloaded weights' files were only read


def test_stacked_patches_on_offloaded_weights_revert_in_order(ckpts, tmp_path):
    """eval's apply / revert: two patches on the same rows, each revert gives back the bytes before it."""
    base = ckpts[("fp16", True)]
    p1 = build_patch(base, seed=1, kinds=["replace", "dense", "factored", "dense"])
    ops.apply(p1.save(tmp_path / "p1.safetensors"), base, tmp_path / "mid")
    p2 = build_patch(tmp_path / "mid", seed=2, rows_per=20)  # on top of p1, overlapping rows
    ops.apply(p2.save(tmp_path / "p2.safetensors"), tmp_path / "mid", tmp_path / "both")
    model, _ = load_model(base, torch.float16, device_map="auto", max_memory="30KB")
    assert set(p1.edits) <= set(on_disk(model))
    original = weights(model)
    u1 = apply_in_memory(model, p1)
    u2 = apply_in_memory(model, tmp_path / "p2.safetensors")
    assert_bitequal(weights(model), dict(load_model(tmp_path / "both", torch.float16)[0].state_dict()))
    revert_in_memory(model, u2)
    assert_bitequal(weights(model), dict(load_model(tmp_path / "mid", torch.float16)[0].state_dict()))
    revert_in_memory(model, u1)
    assert_bitequal(weights(model), original)
    # a patch for another model is refused before anything changes
    with pytest.raises(BaseMismatchError, match="differ from the patch's base"):
        apply_in_memory(model, build_patch(tmp_path / "both", seed=3))
    assert_bitequal(weights(model), original)


def test_controls_read_offloaded_rows(ckpts):
    """eval's controls draw rows from the offloaded tensors as from the whole model."""
    base = ckpts[("bf16", True)]
    p = build_patch(base, seed=5, kinds=["dense", "factored", "dense", "factored"])
    whole, _ = load_model(base, torch.bfloat16)
    model, _ = load_model(base, torch.bfloat16, device_map="auto", max_memory="30KB")
    got, want = make_controls(model, p, seed=3), make_controls(whole, p, seed=3)
    assert [(k, c.id) for k, c in got] == [(k, c.id) for k, c in want]
    assert rows_intact(model, p)
    with patched(model, p):
        assert not rows_intact(model, p)
    assert rows_intact(model, p)


def test_tied_embeddings_offloaded_separately_are_patched_together(tmp_path):
    """Dispatched to disk, tied input and output embeddings are loaded each on its own: both get the rows."""
    base = helpers.tiny_llama(tmp_path / "tied", torch.bfloat16, tie_word_embeddings=True)
    p = build_patch(base, seed=4, scale=0.5, rows_per=12, tensors=("model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight"))
    ops.apply(p, base, tmp_path / "patched")
    disk, _ = load_model(tmp_path / "patched", torch.bfloat16)
    files = helpers.weight_files(base)
    for budget in ("30KB", "1KB"):  # tied embeddings in memory, the layers on disk; everything on disk
        model, _ = load_model(base, torch.bfloat16, device_map="auto", max_memory=budget)
        assert "model.layers.0.mlp.gate_proj.weight" in on_disk(model)
        assert ("lm_head.weight" in on_disk(model)) == (budget == "1KB")
        original = weights(model)
        with torch.no_grad():
            base_logits = model(IDS).logits
            with patched(model, p):
                assert torch.equal(model(IDS).logits, disk(IDS).logits)
                assert helpers.weight_files(base) == files  # rows patched in place are not the file's
            assert torch.equal(model(IDS).logits, base_logits)
        assert_bitequal(weights(model), original)


def test_moe_experts_offloaded_to_a_folder(tmp_path):
    """Mixtral's experts are fused when loaded, so accelerate writes them to the offload folder: the
    patch reaches the fused tensors there, features match, and everything is restored."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from patchkit.core.checkpoint import Checkpoint
    from patchkit.method.compute import compute_patch
    from patchkit.method.probefile import ProbeArrays

    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2, num_local_experts=4,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = helpers.save_checkpoint(helpers.make_model(cfg, seed=1), tmp_path / "base")
    probe = ProbeArrays(np.random.default_rng(2).standard_normal((2, 32)).astype(np.float32), np.zeros(2, np.float32),
                        {"behavior_index": 1})
    patch = compute_patch(Checkpoint(base), probe, top_k=12, alpha=2.0)
    assert any(".experts." in n for n in patch.edits)
    ops.apply(patch, base, tmp_path / "out")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    whole, tok = load_model(base)
    model = AutoModelForCausalLM.from_pretrained(base, device_map="auto", max_memory={"cpu": "150KB"},
                                                 offload_folder=str(tmp_path / "offload")).eval()
    assert any(".experts." in k for k in on_disk(model))
    want = extract_gate_inputs(whole, tok, TEXTS, progress=False)
    got = extract_gate_inputs(model, tok, TEXTS, progress=False)
    assert all(torch.equal(got[i], want[i]) for i in want)
    original = weights(model)
    with torch.no_grad():
        base_logits = model(IDS).logits
        with patched(model, patch):
            assert torch.equal(model(IDS).logits, expected(IDS).logits)
        assert not torch.equal(base_logits, expected(IDS).logits)
        assert torch.equal(model(IDS).logits, base_logits)
    assert_bitequal(weights(model), original)


def test_a_model_wholly_on_disk_gives_the_same_features(ckpts):
    """Even the embeddings offloaded: the inputs go to accelerate's execution device, not to meta."""
    path = ckpts[("bf16", True)]
    whole, tok = load_model(path)
    disk, _ = load_model(path, torch.float32, device_map={"": "disk"})
    assert "model.embed_tokens.weight" in on_disk(disk)
    assert torch.equal(extract_features(disk, tok, TEXTS, layer=1, batch_size=2, progress=False),
                       extract_features(whole, tok, TEXTS, layer=1, batch_size=2, progress=False))


def test_load_model_placed_keeps_the_checkpoint_dtype_and_cleans_its_offload_folder(tmp_path):
    import gc
    import glob
    import tempfile

    from transformers import MixtralConfig

    from patchkit.evaluation.evaluate import float32_view
    from patchkit.method.pipeline import memory_budget

    assert memory_budget("30000")["cpu"] == 30000 and memory_budget("2GiB")["cpu"] == "2GiB"
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2, num_local_experts=4,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = helpers.save_checkpoint(helpers.make_model(cfg, seed=1, dtype=torch.bfloat16), tmp_path / "base")
    before = set(glob.glob(f"{tempfile.gettempdir()}/patchkit-offload-*"))
    model, _ = load_model(base, device_map="auto", max_memory="40KB")  # experts spill to a folder of its own
    assert any(".experts." in k for k in on_disk(model))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # meta tensors keep their dtype
    with float32_view(model) as m:  # an offloaded model cannot be moved: judged as it is
        assert m is model
    made = set(glob.glob(f"{tempfile.gettempdir()}/patchkit-offload-*")) - before
    assert len(made) == 1
    del model, m
    gc.collect()
    assert not any(Path(p).exists() for p in made)
