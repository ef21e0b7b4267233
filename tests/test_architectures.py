"""Every family of the architecture table end to end, on tiny random models built from transformers
configs (nothing downloaded): probe on the model's own features -> compute -> apply -o -> the patched
checkpoint, loaded with transformers, equals the reference edit done in memory on the loaded model,
bit for bit (weights and logits) -> revert gives back the original files.

The reference is written from the transformers modelling code, not from `patchkit.method.targets`: it
finds each model's gate weights by their in-memory parameter names (after transformers' own
conversion of MoE experts to fused [E, 2I, H] tensors), scores the gate neurons by minus their
cosine with the probe direction, and adds alpha * v to the top K in float32, rounded once.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from patchkit.core import ops
from patchkit.core.checkpoint import Checkpoint
from patchkit.errors import UnsupportedError
from patchkit.method.activations import (
    decoder_parts,
    extract_features,
    extract_gate_inputs,
    hooked,
)
from patchkit.method.compute import compute_patch
from patchkit.method.probe import Probe, train_probe
from patchkit.method.targets import family_for, resolve_targets

TOP_K, ALPHA = 7, 1.08
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **IDS)
MOE = dict(LLAMA_LIKE, num_experts_per_tok=2)

# In-memory gate parameters, by how the model's forward uses them (read off the transformers code):
#   rows: w [N, H];  rows-half: w [2I, H], gate = w[:I] (Phi3MLP: gate, up = chunk(2));
#   experts-half: w [E, 2I, H], gate = w[:, :I] (MixtralExperts: gate, up = ... .chunk(2));
#   cols: w [H, N] (GPT-2 Conv1D computes x @ w, neuron j is column j).
GATE_LLAMA = {r"layers\.\d+\.mlp\.gate_proj\.weight$": "rows"}
GATE_MOE = {r"mlp\.experts\.gate_up_proj$": "experts-half"}


@dataclass(frozen=True)
class Spec:
    model_type: str
    config: dict
    family: str
    gates: dict  # in-memory parameter regex -> kind
    reads: str  # module (from a decoder layer) whose input the gate neurons read, for the gate-input check
    fused_file: bool = False  # save the in-memory (fused experts) state dict instead of save_pretrained's


SPECS = {
    "llama": Spec("llama", LLAMA_LIKE, "llama", GATE_LLAMA, "mlp.gate_proj"),
    "smollm3": Spec("smollm3", LLAMA_LIKE, "llama", GATE_LLAMA, "mlp.gate_proj"),
    "mistral": Spec("mistral", LLAMA_LIKE, "mistral", GATE_LLAMA, "mlp.gate_proj"),
    "qwen2": Spec("qwen2", LLAMA_LIKE, "qwen2", GATE_LLAMA, "mlp.gate_proj"),
    "qwen3": Spec("qwen3", dict(LLAMA_LIKE, head_dim=8), "qwen3", GATE_LLAMA, "mlp.gate_proj"),
    "gemma": Spec("gemma", dict(LLAMA_LIKE, head_dim=8), "gemma", GATE_LLAMA, "mlp.gate_proj"),
    "gemma2": Spec("gemma2", dict(LLAMA_LIKE, head_dim=8), "gemma", GATE_LLAMA, "mlp.gate_proj"),
    "gemma3_text": Spec("gemma3_text", dict(LLAMA_LIKE, head_dim=8), "gemma", GATE_LLAMA, "mlp.gate_proj"),
    "phi3": Spec("phi3", LLAMA_LIKE, "phi3", {r"mlp\.gate_up_proj\.weight$": "rows-half"}, "mlp.gate_up_proj"),
    "gpt2": Spec("gpt2", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
                 "gpt2", {r"mlp\.c_fc\.weight$": "cols"}, "mlp.c_fc"),
    "gpt_neox": Spec("gpt_neox", dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
                     "gpt_neox", {r"mlp\.dense_h_to_4h\.weight$": "rows"}, "mlp.dense_h_to_4h"),
    "opt": Spec("opt", dict(vocab_size=128, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, word_embed_proj_dim=32, **IDS), "opt", {r"\.fc1\.weight$": "rows"}, "fc1"),
    "falcon": Spec("falcon", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1,
                                  eos_token_id=2), "falcon", {r"mlp\.dense_h_to_4h\.weight$": "rows"}, "mlp.dense_h_to_4h"),
    "mixtral": Spec("mixtral", dict(MOE, num_local_experts=4), "mixtral", GATE_MOE, "mlp.gate"),
    "mixtral-fused": Spec("mixtral", dict(MOE, num_local_experts=4), "mixtral", GATE_MOE, "mlp.gate", fused_file=True),
    "qwen2_moe": Spec("qwen2_moe", dict(MOE, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40),
                      "qwen_moe", {**GATE_MOE, r"mlp\.shared_expert\.gate_proj\.weight$": "rows"}, "mlp.gate"),
    "qwen3_moe": Spec("qwen3_moe", dict(MOE, head_dim=8, num_experts=4, moe_intermediate_size=24), "qwen_moe", GATE_MOE, "mlp.gate"),
}

GOOD = ["the kind friend help people", "love the calm river", "a happy dog and a nice cat", "good food and music at night",
        "the blue house by the green tree", "we help a friend in the city"]
BAD = ["hate the cruel enemy", "they hurt people", "an awful angry group", "bad cruel people hate",
       "the enemy was cruel and angry", "sad awful hate and hurt"]
TEXTS, LABELS = GOOD + BAD, [0] * len(GOOD) + [1] * len(BAD)


@dataclass
class Built:
    path: Path
    model: torch.nn.Module  # float32, in memory (activations checks)


@pytest.fixture(scope="session")
def tok():
    return helpers.make_tokenizer()


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """zoo(name) -> Built: the family's tiny model, built and saved (bf16) once per session."""
    from transformers import AutoConfig

    root, cache = tmp_path_factory.mktemp("zoo"), {}

    def get(name: str) -> Built:
        if name not in cache:
            spec = SPECS[name]
            model = helpers.make_model(AutoConfig.for_model(spec.model_type, **spec.config), seed=5)
            path = root / name
            half = copy.deepcopy(model).to(torch.bfloat16)
            helpers.save_checkpoint(half, path)
            if spec.fused_file:  # the in-memory layout (experts.gate_up_proj [E, 2I, H]), which transformers also loads
                (path / "model.safetensors").unlink()
                save_file({k: v.contiguous() for k, v in half.state_dict().items()}, path / "model.safetensors", metadata={"format": "pt"})
            cache[name] = Built(path, model)
        return cache[name]

    return get


def load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def gate_neurons(model, spec: Spec):
    """[(name, parameter, kind, [N, H] float64 neuron weights)] in parameter order."""
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        kind = next((k for rx, k in spec.gates.items() if re.search(rx, name)), None)
        if kind is None:
            continue
        w = p.detach().double()
        if kind == "rows":
            n = w
        elif kind == "rows-half":
            n = w[: w.shape[0] // 2]
        elif kind == "experts-half":
            n = w[:, : w.shape[1] // 2].reshape(-1, w.shape[-1])
        else:
            n = w.T
        out.append((name, p, kind, n))
    assert out, f"no gate parameter found for {spec.model_type}"
    return out


def reference_edit(model, spec: Spec, v, alpha: float, k: int) -> None:
    """In place: the top-k gate neurons by -cos(neuron, v) over the whole model get alpha * v added.
    `v` is one direction, or a function of the parameter name (layer-matched)."""
    gates = gate_neurons(model, spec)
    scores, dirs = [], []
    for t, (pname, _p, _kind, n) in enumerate(gates):
        d = (v(pname) if callable(v) else v).float()
        cos = (n @ d.double()) / (n.norm(dim=1) * d.double().norm())
        scores += [(-float(c), t, i) for i, c in enumerate(cos)]
        dirs.append(torch.tensor(alpha, dtype=torch.float32) * d)
    scores.sort(key=lambda s: (-s[0], s[1], s[2]))
    with torch.no_grad():
        for _s, t, i in scores[:k]:
            _name, p, kind, _n = gates[t]
            d = dirs[t]
            if kind in ("rows", "rows-half"):
                p[i] = (p[i].float() + d).to(p.dtype)
            elif kind == "experts-half":
                half = p.shape[1] // 2
                p[i // half, i % half] = (p[i // half, i % half].float() + d).to(p.dtype)
            else:
                p[:, i] = (p[:, i].float() + d).to(p.dtype)


def logits(model, tok) -> torch.Tensor:
    enc = tok(TEXTS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def assert_same_params(a, b) -> None:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sorted(sa) == sorted(sb)
    for name, value in sa.items():
        assert torch.equal(value.view(torch.int16), sb[name].view(torch.int16)), name


@pytest.mark.parametrize("name", list(SPECS))
def test_probe_compute_apply_equals_reference_and_reverts(zoo, tok, tmp_path, name):
    spec, built = SPECS[name], zoo(name)
    ck = Checkpoint(built.path)
    assert family_for(ck).name == spec.family
    base = load(built.path)
    feats = extract_features(base, tok, TEXTS, progress=False)
    probe = train_probe(feats, LABELS, epochs=20, model_fingerprint=ck.fingerprint())
    patch = compute_patch(built.path, probe, top_k=TOP_K, alpha=ALPHA)
    assert patch.provenance["params"]["targets"] == spec.family and patch.provenance["params"]["k"] == TOP_K
    assert not any(re.search(r"embed|wte|wpe|lm_head|word_embeddings", n) for n in patch.edits)  # tied embeddings left alone
    out = tmp_path / "patched"
    ops.apply([patch], built.path, out)

    patched = load(out)
    reference = load(built.path)
    reference_edit(reference, spec, probe.direction, ALPHA, TOP_K)
    assert_same_params(patched, reference)
    got, want = logits(patched, tok), logits(reference, tok)
    assert torch.equal(got, want)
    assert not torch.equal(got, logits(base, tok))  # the edit shows

    ops.revert(patch, out, in_place=True)
    assert helpers.snapshot(out) == helpers.snapshot(built.path)


@pytest.mark.parametrize("name", list(SPECS))
def test_decoder_parts_and_gate_inputs(zoo, tok, name):
    spec, model = SPECS[name], zoo(name).model
    _base, layers, norm = decoder_parts(model)
    assert len(layers) == 2
    final = extract_features(model, tok, TEXTS, layer=-1, pool="last", progress=False)
    pre = extract_features(model, tok, TEXTS, layer=1, pool="last", progress=False)
    torch.testing.assert_close(norm(pre), final, rtol=1e-5, atol=1e-5)  # layers and final norm are the right ones

    enc = tok(TEXTS, padding=True, return_tensors="pt")
    seen = {}

    def keep(i):
        def hook(_m, args, _kwargs):
            seen[i] = args[0]

        return hook

    readers = [layer.get_submodule(spec.reads) for layer in layers]
    with hooked([(m, "pre", keep(i)) for i, m in enumerate(readers)]), torch.no_grad():
        model(**enc)
    got = extract_gate_inputs(model, tok, TEXTS, batch_size=5, progress=False)
    m = enc["attention_mask"].unsqueeze(-1).float()
    for i in range(len(layers)):
        x = seen[i].reshape(m.shape[0], m.shape[1], -1)  # MoE routers and OPT's fc1 see tokens flattened
        torch.testing.assert_close(got[i], (x * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-5)


def test_targets_per_family(zoo):
    def resolved(name):
        t = resolve_targets(Checkpoint(zoo(name).path))
        return t, [tuple(lay.shape) for lay in t.layouts]

    t, shapes = resolved("phi3")
    assert t.names[0] == "model.layers.0.mlp.gate_up_proj.weight" and t.layouts[0].neurons == 48 and shapes[0] == (96, 32)
    assert t.layouts[0].index_of(np.arange(48)).tolist() == list(range(48))  # the first half of the rows
    t, _ = resolved("gpt2")
    assert t.axis == 1 and t.names == ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight")
    t, _ = resolved("mixtral")  # as transformers saves it: one w1 (gate) per expert
    assert t.names[:2] == ("model.layers.0.block_sparse_moe.experts.0.w1.weight", "model.layers.0.block_sparse_moe.experts.1.w1.weight")
    assert len(t.names) == 8 and sum(lay.neurons for lay in t.layouts) == 8 * 48
    t, shapes = resolved("mixtral-fused")  # [E, 2I, H]: expert e's gate rows are e*2I .. e*2I+I-1
    assert t.names == ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj")
    assert shapes[0] == (4, 96, 32) and t.layouts[0].index_of(np.array([0, 47, 48, 191])).tolist() == [0, 47, 96, 335]
    t, _ = resolved("qwen2_moe")
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in t.names and len(t.names) == 10


def test_custom_targets_and_their_errors(zoo, tmp_path):
    ck = Checkpoint(zoo("gpt2").path)
    probe = Probe(weight=torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), bias=torch.zeros(2))
    table = compute_patch(ck, probe, top_k=5, check_model=False)
    custom = compute_patch(ck, probe, top_k=5, check_model=False, target=r"h\.(?P<layer>\d+)\.mlp\.c_fc\.weight$", axis=1)
    assert custom.provenance["params"]["targets"] == "custom"
    assert {n: e.scale.tolist() for n, e in custom.edits.items()} == {n: e.scale.tolist() for n, e in table.edits.items()}
    with pytest.raises(UnsupportedError, match="matches"):
        resolve_targets(ck, target=r"nothing\.here")
    with pytest.raises(UnsupportedError, match="input size"):  # c_fc [32, 128] and c_proj [128, 32] read different sizes
        resolve_targets(ck, target=r"mlp\.c_(fc|proj)\.weight$", axis=1)
    with pytest.raises(UnsupportedError, match="2-d"):
        resolve_targets(ck, target=r"ln_f\.weight$")
    cfg = json.loads((zoo("llama").path / "config.json").read_text())
    cfg["model_type"] = "gpt_oss"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(cfg))
    (odd / "model.safetensors").write_bytes((zoo("llama").path / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedError, match="not supported yet"):
        resolve_targets(Checkpoint(odd))


def test_column_edit_keeps_negative_zeros_outside_the_chosen_columns(zoo, tmp_path):
    """-0.0 + 0.0 is +0.0: the factored column edit would flip them, so compute writes a dense -0.0 delta."""
    src = zoo("gpt2").path
    dst = tmp_path / "negzero"
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    w = tensors[name].clone()
    g = torch.Generator().manual_seed(0)
    w[torch.rand(w.shape, generator=g) < 0.1] = -0.0
    tensors[name] = w
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    v = torch.randn(32, generator=g)
    probe = Probe(weight=torch.stack([torch.zeros(32), v]), bias=torch.zeros(2))
    patch = compute_patch(dst, probe, top_k=40, alpha=ALPHA, check_model=False)
    assert patch.edits[name].encoding == "dense"
    ops.apply([patch], dst, tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    d = torch.tensor(ALPHA, dtype=torch.float32) * probe.direction.float()
    for n, e in patch.edits.items():
        ref = tensors[n].clone()
        cols = torch.from_numpy(np.flatnonzero(e.deltas()[0] != 0) if e.encoding == "dense" else np.flatnonzero(e.direction))
        ref[:, cols] = (ref[:, cols].float() + d[:, None]).to(ref.dtype)
        assert torch.equal(got[n].view(torch.int16), ref.view(torch.int16)), n
    assert int((got[name].view(torch.int16) == -32768).sum()) > 0  # -0.0 kept



@pytest.mark.parametrize("name", ["gpt2", "mixtral-fused", "opt"])
def test_layer_matched_probes_read_the_gate_inputs(zoo, tok, tmp_path, name):
    """layer-matched: each layer's gate neurons scored against the probe of what that layer's gate reads."""
    from patchkit.method.probe import train_layer_probes

    built, spec = zoo(name), SPECS[name]
    ck = Checkpoint(built.path)
    base = load(built.path)
    main = train_probe(extract_features(base, tok, TEXTS, progress=False), LABELS, epochs=20, model_fingerprint=ck.fingerprint())
    probe = train_layer_probes(extract_gate_inputs(base, tok, TEXTS, progress=False), LABELS, main)
    patch = compute_patch(built.path, probe, top_k=TOP_K, strategy="layer-matched")
    ops.apply([patch], built.path, tmp_path / "out")
    ref = load(built.path)
    dirs = probe.layer_directions
    reference_edit(ref, spec, lambda pname: dirs[int(re.search(r"(?:layers|h)\.(\d+)\.", pname).group(1))], ALPHA, TOP_K)
    assert_same_params(load(tmp_path / "out"), ref)
