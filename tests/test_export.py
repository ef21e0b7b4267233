"""export --to peft: LoRA factors, refusals, and a round trip through PEFT against the patched checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np

from conftest import build_patch, load_tensors
from patchkit.core import ops
from patchkit.core.patchfile import TensorEdit
from patchkit.errors import MergeError, OutputExistsError, UnsupportedError
from patchkit.share.export import export_peft, lora_factors

LINEAR = ("model.layers.0.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight", "lm_head.weight",
          "model.layers.1.self_attn.q_proj.weight")


def dense_edit(delta, rows) -> TensorEdit:
    return TensorEdit("m.weight", (48, delta.shape[1]), "BF16", np.asarray(rows, dtype=np.int64), "dense", "0" * 64,
                      delta=delta.astype(np.float32))


def test_factored_is_rank_one_and_exact_dense_at_its_rank():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(16).astype(np.float32)
    f = TensorEdit("m.weight", (48, 16), "BF16", np.array([3, 7], dtype=np.int64), "factored", "0" * 64,
                   direction=v, scale=np.array([1.08, -2.0], dtype=np.float32))
    b, a, rep = lora_factors(f)
    assert b.shape == (48, 1) and a.shape == (1, 16) and rep["exact"] and rep["rank"] == 1
    assert np.array_equal((b @ a)[[3, 7]], f.deltas()) and not np.delete(b, [3, 7], axis=0).any()
    full = dense_edit(rng.standard_normal((4, 16)) * 0.05, [0, 5, 6, 40])
    b, a, rep = lora_factors(full)
    assert rep["rank"] == 4 and rep["method"] == "rows" and rep["exact"]
    low = dense_edit(rng.standard_normal((5, 2)) @ rng.standard_normal((2, 16)), [1, 2, 3, 4, 5])
    b, a, rep = lora_factors(low)
    assert rep["rank"] == 2 and rep["method"] == "svd" and rep["rel_error"] < 1e-6
    b, a, rep = lora_factors(low, rank=1)
    assert rep["rank"] == 1 and a.shape == (1, 16) and rep["rel_error"] > 1e-3 and not rep["exact"]


def test_unsupported_tensors_are_named_or_skipped_with_a_list(ckpts, tmp_path):
    base = ckpts[("bf16", False)]
    norm, emb = "model.layers.1.input_layernorm.weight", "model.embed_tokens.weight"
    p = build_patch(base, tensors=(LINEAR[0], norm, emb, LINEAR[1]), kinds=("dense", "factored", "dense", "replace"))
    with pytest.raises(UnsupportedError, match=rf"cannot export tensor {emb} as LoRA: it is an embedding.*and 2 more: {norm}, {LINEAR[1]}\); pass --skip-unsupported") as ei:
        export_peft(p, tmp_path / "a")
    assert sorted(ei.value.tensors) == sorted([LINEAR[1], norm, emb]) and not (tmp_path / "a").exists()
    r = export_peft(p, tmp_path / "a", skip_unsupported=True)
    assert {s["tensor"]: s["reason"] for s in r["skipped"]} == {
        LINEAR[1]: "its rows are replaced whole (no delta)", norm: "it is 1-d; LoRA adapts 2-d Linear weights",
        emb: "it is an embedding, not a Linear layer"}
    assert [m["module"] for m in r["modules"]] == ["model.layers.0.mlp.gate_proj"]
    with pytest.raises(OutputExistsError):
        export_peft(p, tmp_path / "a", skip_unsupported=True)


def test_peft_round_trip_matches_the_patched_checkpoint(ckpts, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = ckpts[("bf16", False)]
    patch = build_patch(base, seed=5, tensors=LINEAR, rows_per=6, scale=0.2)
    assert {e.encoding for e in patch.edits.values()} == {"dense", "factored"}
    ops.apply([patch], base, tmp_path / "patched")
    r = export_peft(patch, tmp_path / "lora")
    assert r["exact"] and r["base_model"] == "tiny-llama"
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] == 1
    assert sorted(cfg["target_modules"]) == sorted(n[: -len(".weight")] for n in LINEAR)
    assert all(cfg["alpha_pattern"][k] == v for k, v in cfg["rank_pattern"].items())
    w = load_np(tmp_path / "lora" / "adapter_model.safetensors")
    assert w["base_model.model.lm_head.lora_A.weight"].shape[1] == 32
    assert w["base_model.model.lm_head.lora_B.weight"].shape[0] == 128

    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        patched = AutoModelForCausalLM.from_pretrained(tmp_path / "patched", dtype=torch.bfloat16).eval()
        want = patched(ids).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
        unpatched = plain(ids).logits.float()
        model = peft.PeftModel.from_pretrained(plain, tmp_path / "lora").eval()
        got = model(ids).logits.float()
        merged = model.merge_and_unload()
    edited = (want - unpatched).abs().max().item()
    diff = (got - want).abs().max().item()
    sd, ref = merged.state_dict(), load_tensors(tmp_path / "patched")
    differing = {n: int((sd[n] != ref[n]).sum()) for n in patch.edits}
    with capsys.disabled():
        print(f"\n[peft round trip, bf16] max |logit diff| {diff:.4g} (the patch moves logits by up to {edited:.3g}; "
              f"max |logit| {want.abs().max().item():.3g}); merge_and_unload weights differing from the patched "
              f"checkpoint: {differing}")
    assert not any(differing.values())  # PEFT's merge rounds W + B @ A once, like apply (peft 0.21)
    assert edited > 0.05  # the edit is visible, so the comparison means something
    scale = want.abs().max().item()
    assert diff <= 2**-6 * scale  # a few bf16 roundings of the logits


def test_cli_merge_and_export(ckpts, tmp_path, cli_runner):
    from patchkit.cli import cli

    if "merge" not in cli.commands or "export" not in cli.commands:
        pytest.skip("the merge and export commands are not in patchkit.cli yet")
    base = ckpts[("bf16", False)]
    a = build_patch(base, seed=1, tensors=LINEAR[:1]).save(tmp_path / "a.safetensors")
    b = build_patch(base, seed=2, tensors=LINEAR[:2], kinds=("factored", "dense")).save(tmp_path / "b.safetensors")
    r = cli_runner("merge", a, b, "-o", tmp_path / "m.safetensors")
    assert r.exit_code == MergeError.exit_code and "--base CHECKPOINT" in r.output
    r = cli_runner("merge", a, b, "-o", tmp_path / "m.safetensors", "--base", base, "--weights", "1,0.5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["base_check"] == "checkpoint" and len(out["parts"]) == 2
    r = cli_runner("merge", a, b, "-o", tmp_path / "m.safetensors", "--base", base)
    assert r.exit_code == 7
    r = cli_runner("export", tmp_path / "m.safetensors", "--to", "peft", "-o", tmp_path / "lora", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "lora" / "adapter_config.json").exists() and (tmp_path / "lora" / "adapter_model.safetensors").exists()


def test_conv1d_weights_are_named_not_exported(tmp_path):
    from patchkit.core.patchfile import make_edit
    from patchkit.share.export import unsupported_reason

    raw = np.zeros((3, 16 * 4), dtype=np.uint8)  # three F32 rows of 16 elements
    delta = np.ones((3, 16), np.float32)
    conv = make_edit("transformer.h.0.mlp.c_fc.weight", (4, 16), "F32", np.arange(3), raw, delta=delta)
    assert "Conv1D" in unsupported_reason(conv)
    linear = make_edit("model.layers.0.mlp.gate_proj.weight", (4, 16), "F32", np.arange(3), raw, delta=delta)
    assert unsupported_reason(linear) is None


def test_a_column_edit_exports_and_merges_to_the_patched_weights(ckpts, tmp_path):
    """An axis-1 edit (neurons along columns: every row changes at the chosen columns) is stored as a
    factored edit over all rows; as LoRA it is B = per-row scale, A = the columns' indicator, and
    PEFT's merge gives exactly the weights apply writes."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.patchfile import Patch
    from patchkit.method.compute import target_edit
    from patchkit.method.targets import Layout

    base = ckpts[("bf16", False)]
    name = "model.layers.1.mlp.down_proj.weight"
    info = Checkpoint(base).info(name)
    lay = Layout(tuple(info.shape), axis=1)
    vector = np.random.default_rng(2).standard_normal(lay.inputs).astype(np.float32) * 0.3
    edit = target_edit(info, lay, np.array([3, 10, 11], dtype=np.int64), vector, alpha=1.08)
    assert edit.encoding == "factored" and edit.n_rows == info.shape[0]
    patch = Patch(edits={name: edit})
    ops.apply([patch], base, tmp_path / "patched")
    r = export_peft(patch, tmp_path / "lora")
    assert r["exact"] and r["modules"][0]["rank"] == 1
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    merged = peft.PeftModel.from_pretrained(plain, tmp_path / "lora").merge_and_unload()
    got, want = merged.state_dict()[name], load_tensors(tmp_path / "patched")[name]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    before = load_tensors(base)[name]
    changed = (got != before).any(dim=0).nonzero().flatten().tolist()
    assert changed == [3, 10, 11]  # only the chosen columns moved


# ---- format v1.1 ------------------------------------------------------------------------------------------------
def test_lowrank_exports_as_its_rank_and_peft_merges_to_the_applied_weights(ckpts, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.patchfile import Patch, make_edit

    base = ckpts[("bf16", False)]
    ck = Checkpoint(base)
    rng = np.random.default_rng(7)
    edits = {}
    for name, r in zip(LINEAR, (1, 2, 3, 1)):
        info = ck.info(name)
        rows = np.sort(rng.choice(info.n_rows, 6, replace=False)).astype(np.int64)
        u = rng.standard_normal((6, r)).astype(np.float32)
        v = (rng.standard_normal((r, info.n_cols)) * 0.1).astype(np.float32)
        edits[name] = make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows), u=u, v=v)
    patch = Patch(edits=edits, base_model="tiny-llama", provenance={"method": "test"})
    b, a, rep = lora_factors(edits[LINEAR[1]])
    assert rep["rank"] == 2 and rep["method"] == "lowrank" and b.shape[1] == 2 and np.array_equal(a, edits[LINEAR[1]].v)
    assert np.array_equal(b[edits[LINEAR[1]].rows], edits[LINEAR[1]].u) and np.count_nonzero(b.any(axis=1)) == 6
    ops.apply([patch], base, tmp_path / "patched")
    r = export_peft(patch, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 1 and all(cfg["alpha_pattern"][k] == v for k, v in cfg["rank_pattern"].items())
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
        merged = peft.PeftModel.from_pretrained(plain, tmp_path / "lora").eval().merge_and_unload()
    sd, ref = merged.state_dict(), load_tensors(tmp_path / "patched")
    differing = {n: int((sd[n] != ref[n]).sum()) for n in patch.edits}
    with capsys.disabled():
        print(f"\n[peft lowrank, bf16] merge_and_unload weights differing from the patched checkpoint: {differing}")
    # rank 1: B @ A is the patch's own product, bit for bit; rank r > 1: the matrix product may sum in
    # another order, which the bf16 rounding almost always hides
    assert differing[LINEAR[0]] == differing[LINEAR[3]] == 0
    assert sum(differing.values()) <= 3


def test_scale_edits_are_refused_by_name_and_exceptions_mark_a_module_inexact(ckpts, tmp_path):
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.patchfile import Patch, make_edit

    ck = Checkpoint(ckpts[("bf16", False)])
    name = LINEAR[0]
    info = ck.info(name)
    rows = np.array([1, 2], dtype=np.int64)
    s = make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows), gamma=np.array([0.5, 2.0], np.float32))
    with pytest.raises(UnsupportedError, match="scale edit"):
        export_peft(Patch(edits={name: s}, provenance={"method": "t"}), tmp_path / "lora")
    x = make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows), u=np.ones((2, 1), np.float32),
                  v=np.full((1, info.n_cols), 0.25, np.float32), exceptions=(np.array([0]), np.array([0x3F80], np.uint16)))
    rep = lora_factors(x)[2]
    assert not rep["exact"] and rep["exceptions"] == 1
