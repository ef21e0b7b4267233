"""Feature extraction with hooks, checked against the model's own output_hidden_states."""

from __future__ import annotations

import pytest
import torch

from helpers import llama_config, make_model, make_tokenizer
from patchkit.errors import DataError, UnsupportedError
from patchkit.method.activations import (
    FeatureCache,
    FeatureKey,
    decoder_parts,
    extract_features,
    extract_gate_inputs,
    hooked,
)

TEXTS = [
    "the good dog is kind",
    "hate",
    "a cat and a dog love the river in the city at night",
    "people help a friend",
    "fire water stone tree house road car red blue green happy sad calm angry",
    "the enemy was cruel",
]


@pytest.fixture(scope="module")
def model():
    return make_model(llama_config(), seed=3)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def reference(model, tok, texts, index, pool="mean"):
    """Pooled ``output_hidden_states[index]`` of one plain padded forward pass of the model."""
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states[index]
    mask = enc["attention_mask"]
    if pool == "mean":
        m = mask.unsqueeze(-1).float()
        return (hs * m).sum(1) / m.sum(1)
    return hs[torch.arange(len(texts)), mask.sum(1) - 1]


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_mean_pooled_final_state_equals_models_own_hidden_states(model, tok):
    feats = extract_features(model, tok, TEXTS, layer=-1, pool="mean", batch_size=4, progress=False)
    assert feats.dtype == torch.float32 and feats.shape == (len(TEXTS), 32)
    torch.testing.assert_close(feats, reference(model, tok, TEXTS, -1), rtol=1e-5, atol=1e-5)
    # padding really is masked out: an unmasked mean would differ
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        unmasked = model(**enc, output_hidden_states=True).hidden_states[-1].mean(1)
    assert (feats - unmasked).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_decoder_layer_i_is_hidden_states_i_plus_1(model, tok, layer, pool):
    feats = extract_features(model, tok, TEXTS, layer=layer, pool=pool, batch_size=3, progress=False)
    torch.testing.assert_close(feats, reference(model, tok, TEXTS, layer + 1, pool), rtol=1e-5, atol=1e-5)


def test_last_layer_index_is_the_pre_norm_output(model, tok):
    _base, layers, norm = decoder_parts(model)
    final = extract_features(model, tok, TEXTS, layer=-1, pool="last", progress=False)
    pre = extract_features(model, tok, TEXTS, layer=len(layers) - 1, pool="last", progress=False)
    torch.testing.assert_close(norm(pre), final, rtol=1e-5, atol=1e-5)
    assert (pre - final).abs().max() > 1e-3


def test_left_and_right_padding_and_batch_size_give_the_same_features(model, tok):
    for pool in ("mean", "last"):
        right = extract_features(model, tok, TEXTS, pool=pool, batch_size=6, padding_side="right", progress=False)
        left = extract_features(model, tok, TEXTS, pool=pool, batch_size=6, padding_side="left", progress=False)
        single = torch.cat([extract_features(model, tok, [t], pool=pool, progress=False) for t in TEXTS])
        torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(single, right, rtol=1e-4, atol=1e-5)


def test_gate_inputs_are_what_gate_proj_reads(model, tok):
    _base, layers, _norm = decoder_parts(model)
    seen = {}

    def keep(i):
        def hook(_m, args, out):
            seen[i] = out

        return hook

    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with hooked([(layers[i].post_attention_layernorm, "forward", keep(i)) for i in range(len(layers))]):
        with torch.no_grad():
            model(**enc)
    before = all_hooks(model)  # transformers may keep output-capturing hooks of its own
    got = extract_gate_inputs(model, tok, TEXTS, batch_size=4, progress=False)
    assert sorted(got) == list(range(len(layers)))
    m = enc["attention_mask"].unsqueeze(-1).float()
    for i in range(len(layers)):
        torch.testing.assert_close(got[i], (seen[i] * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-5)
    some = extract_gate_inputs(model, tok, TEXTS, layers=[1], progress=False)
    assert list(some) == [1]
    torch.testing.assert_close(some[1], got[1])
    assert all_hooks(model) == before


def test_hooks_are_removed_even_when_the_forward_pass_fails(model, tok):
    _base, layers, _norm = decoder_parts(model)
    before = all_hooks(model)

    def boom(*_a):
        raise RuntimeError("boom")

    handle = layers[0].self_attn.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            extract_features(model, tok, TEXTS, layer=1, progress=False)
        with pytest.raises(RuntimeError, match="boom"):
            extract_gate_inputs(model, tok, TEXTS, progress=False)
        assert all_hooks(model) == before + 1  # only the test's own hook is left
    finally:
        handle.remove()
    with pytest.raises(KeyError):
        with hooked([(layers[0], "forward", lambda *a: None), (layers[1].mlp, "pre", lambda *a: None)]):
            assert all_hooks(model) == before + 2
            raise KeyError("inside")
    assert all_hooks(model) == before
    extract_features(model, tok, TEXTS, layer=0, progress=False)  # stops early via an exception
    assert all_hooks(model) == before


def test_no_grad_eval_mode_restored_and_bf16_gives_float32(tok):
    m = make_model(llama_config(), seed=1)
    m.train()
    feats = extract_features(m, tok, TEXTS[:2], progress=False)
    assert m.training and not feats.requires_grad
    half = make_model(llama_config(), seed=1, dtype=torch.bfloat16)
    f16 = extract_features(half, tok, TEXTS[:2], progress=False)
    assert f16.dtype == torch.float32


def test_bad_arguments(model, tok):
    with pytest.raises(UnsupportedError):
        extract_features(model, tok, TEXTS, layer=3, progress=False)
    with pytest.raises(UnsupportedError):
        extract_gate_inputs(model, tok, TEXTS, layers=[5], progress=False)
    with pytest.raises(ValueError):
        extract_features(model, tok, TEXTS, pool="max", progress=False)
    with pytest.raises(DataError):
        extract_features(model, tok, [], progress=False)
    with pytest.raises(UnsupportedError):
        extract_features(torch.nn.Linear(2, 2), tok, TEXTS, progress=False)


def test_feature_cache_skips_the_second_extraction(model, tok, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    key = FeatureKey(model="fp1", data="d1", layer=-1, pool="mean", max_length=256)
    calls = []

    def compute():
        calls.append(1)
        return extract_features(model, tok, TEXTS, progress=False)

    first = cache.features(key, compute)
    second = cache.features(key, compute)
    assert len(calls) == 1 and torch.equal(first, second)
    assert cache.path(key).suffix == ".safetensors" and cache.path(key).read_bytes()[8:9] == b"{"
    # any part of the key changes the entry
    for other in (
        FeatureKey("fp2", "d1", -1, "mean", 256),
        FeatureKey("fp1", "d2", -1, "mean", 256),
        FeatureKey("fp1", "d1", 0, "mean", 256),
        FeatureKey("fp1", "d1", -1, "last", 256),
        FeatureKey("fp1", "d1", -1, "mean", 128),
    ):
        assert cache.path(other) != cache.path(key) and cache.load(other) is None
    # a damaged entry is a miss and is rewritten
    cache.path(key).write_bytes(b"junk")
    assert cache.load(key) is None
    cache.features(key, compute)
    assert len(calls) == 2 and cache.load(key) is not None
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_feature_cache_for_gate_inputs(model, tok, tmp_path):
    cache = FeatureCache(tmp_path)
    key = FeatureKey("fp", "d", "gate-inputs", "mean", 256)
    calls = []

    def compute():
        calls.append(1)
        return extract_gate_inputs(model, tok, TEXTS, progress=False)

    a = cache.gate_inputs(key, compute)
    b = cache.gate_inputs(key, compute)
    assert len(calls) == 1 and list(b) == [0, 1, 2]
    assert all(torch.equal(a[i], b[i]) for i in a)
