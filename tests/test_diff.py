"""diff(base, edited) then apply(base) gives back `edited` bit for bit; bad pairs are refused clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from conftest import assert_tensors_bitequal, load_tensors
from helpers import snapshot
from patchkit.core import ops
from patchkit.core.diff import TooDenseError, diff
from patchkit.core.patchfile import Patch
from patchkit.errors import BaseMismatchError, PatchkitError


def edited_copy(base: Path, dst: Path, edit_fn) -> Path:
    """A copy of `base` whose tensors are passed through edit_fn(name, tensor) (in place)."""
    shutil.copytree(base, dst)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        for name, t in tensors.items():
            edit_fn(name, t)
        f.unlink()
        save_file(tensors, f, metadata={"format": "pt"})
    return dst


def rows2d(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1) if t.ndim <= 1 else t.view(-1, t.shape[-1])


def surgery(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)

    def fn(name, t):
        w = rows2d(t)
        if name == "model.layers.0.mlp.gate_proj.weight":  # the paper's edit: w + alpha * v on some rows
            v = torch.randn(w.shape[1], generator=gen) * 0.1
            rows = torch.tensor([1, 5, 6, 20])
            w[rows] = (w[rows].float() + 0.75 * v).to(dtype)
        elif name == "model.layers.1.self_attn.o_proj.weight":  # arbitrary new rows
            rows = torch.tensor([0, 31])
            w[rows] = (torch.randn(2, w.shape[1], generator=gen) * 0.05).to(dtype)
        elif name == "model.layers.2.post_attention_layernorm.weight":  # a 1-d tensor, with an inf
            w[0, 3] = float("inf")
            w[0, 4] = w[0, 4] * 2
        elif name == "lm_head.weight" and dtype == torch.float32:
            # values whose float32 delta from the base cannot reproduce them exactly: replace
            rows = torch.tensor([2, 3])
            w[rows] = torch.randn(2, w.shape[1], generator=gen) * 1e-12
        elif name == "model.embed_tokens.weight":  # a single element of one row
            w[7, 0] = -w[7, 0]

    return fn


def test_diff_then_apply_reproduces_edited(variant, ckpts, tmp_path, cli_runner):
    base = ckpts[variant]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[variant[0]]
    edited = edited_copy(base, tmp_path / "edited", surgery(dtype))
    before = snapshot(base)
    # a 1-d tensor is one row, so changing it is changing 100% of its rows: allow that here
    r = cli_runner("diff", base, edited, "-o", tmp_path / "d.safetensors", "--json", "--max-changed", "1")
    assert r.exit_code == 0, r.output
    patch = Patch.load(tmp_path / "d.safetensors")
    assert json.loads(r.stdout)["id"] == patch.id
    expected_tensors = {
        "model.layers.0.mlp.gate_proj.weight": 4, "model.layers.1.self_attn.o_proj.weight": 2,
        "model.layers.2.post_attention_layernorm.weight": 1, "model.embed_tokens.weight": 1,
    }
    if dtype == torch.float32:
        expected_tensors["lm_head.weight"] = 2
        assert patch.edits["lm_head.weight"].encoding == "replace"
    assert {n: e.n_rows for n, e in patch.edits.items()} == expected_tensors
    assert patch.edits["model.layers.2.post_attention_layernorm.weight"].encoding == "replace"  # inf delta
    # w + alpha*v rounded to bf16/fp16 diffs to deltas that differ from row to row by rounding; diff
    # still finds one vector that reproduces every row: a factored edit with one scale, not dense
    gate = patch.edits["model.layers.0.mlp.gate_proj.weight"]
    assert gate.encoding == "factored" and len(gate.scale) == 1
    ops.apply(tmp_path / "d.safetensors", base, tmp_path / "out")
    assert_tensors_bitequal(load_tensors(tmp_path / "out"), load_tensors(edited))
    assert snapshot(base) == before
    # in place too, and the revert gives back the base
    ck = tmp_path / "inplace"
    shutil.copytree(base, ck)
    ops.apply(tmp_path / "d.safetensors", ck, in_place=True)
    assert_tensors_bitequal(load_tensors(ck), load_tensors(edited))
    ops.revert(tmp_path / "d.safetensors", ck, in_place=True)
    assert snapshot(ck) == before


def test_diff_reproduces_subnormal_and_huge_fp32_changes(ckpts, tmp_path):
    base = ckpts[("fp32", False)]

    def fn(name, t):
        if name == "model.layers.0.self_attn.q_proj.weight":
            t[0, :4] = torch.tensor([1e-42, -1e-45, 3e38, -0.0])
            t[1, :] = t[1, :] + 1e-3  # representable-ish small deltas
            t[2, 0] = t[2, 0] * (1 + 2**-23)

    edited = edited_copy(base, tmp_path / "e", fn)
    p = diff(base, edited, tmp_path / "p.safetensors")
    assert sorted(p.edits) == ["model.layers.0.self_attn.q_proj.weight"]
    ops.apply(tmp_path / "p.safetensors", base, tmp_path / "out")
    assert_tensors_bitequal(load_tensors(tmp_path / "out"), load_tensors(edited))


def test_different_tensor_sets_are_refused(ckpts, tmp_path):
    base = ckpts[("bf16", False)]
    other = tmp_path / "other"
    shutil.copytree(base, other)
    t = load_file(other / "model.safetensors")
    del t["model.norm.weight"]
    (other / "model.safetensors").unlink()
    save_file(t, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BaseMismatchError, match="only the base has model.norm.weight"):
        diff(base, other)
    with pytest.raises(BaseMismatchError, match="only the edited checkpoint has model.norm.weight"):
        diff(other, base)


def test_different_shapes_or_dtypes_are_refused(ckpts, tmp_path, cli_runner):
    base = ckpts[("bf16", False)]
    wider = helpers.tiny_llama(tmp_path / "wider", torch.bfloat16, intermediate_size=64)
    with pytest.raises(BaseMismatchError, match=r"mlp\.\w+_proj\.weight is BF16 \[.*\] in the base but BF16"):
        diff(base, wider)
    with pytest.raises(BaseMismatchError, match=r"is BF16 \[.*\] in the base but F16"):
        diff(base, ckpts[("fp16", False)])
    r = cli_runner("diff", base, ckpts[("fp32", False)], "-o", tmp_path / "x.safetensors")
    assert r.exit_code == BaseMismatchError.exit_code and "Traceback" not in r.output
    assert "in the base but F32" in r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_too_dense_is_refused_unless_full(ckpts, tmp_path, cli_runner):
    base = ckpts[("bf16", True)]

    def fn(name, t):
        if name == "model.layers.1.mlp.up_proj.weight":
            t[:30] = (t[:30].float() * 1.5).to(t.dtype)  # 30 of 48 rows: 62%
        if name == "model.layers.0.mlp.gate_proj.weight":
            t[3] = 0  # one row

    edited = edited_copy(base, tmp_path / "e", fn)
    with pytest.raises(TooDenseError, match=r"model\.layers\.1\.mlp\.up_proj\.weight \(62%\)") as ei:
        diff(base, edited)
    assert ei.value.tensors == ["model.layers.1.mlp.up_proj.weight"]
    r = cli_runner("diff", base, edited, "-o", tmp_path / "x.safetensors")
    assert r.exit_code == TooDenseError.exit_code and "--full" in r.output and "up_proj" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "x.safetensors").exists()
    # a higher threshold lets it through as changed rows only
    p = diff(base, edited, max_changed=0.7)
    assert p.edits["model.layers.1.mlp.up_proj.weight"].n_rows == 30
    # --full includes the whole tensor
    r = cli_runner("diff", base, edited, "-o", tmp_path / "full.safetensors", "--full", "--json")
    assert r.exit_code == 0, r.output
    p = Patch.load(tmp_path / "full.safetensors")
    assert p.edits["model.layers.1.mlp.up_proj.weight"].n_rows == 48
    assert p.edits["model.layers.0.mlp.gate_proj.weight"].n_rows == 1
    ops.apply(tmp_path / "full.safetensors", base, tmp_path / "out")
    assert_tensors_bitequal(load_tensors(tmp_path / "out"), load_tensors(edited))


def test_identical_checkpoints_are_an_error(ckpts, tmp_path, cli_runner):
    base = ckpts[("fp16", True)]
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    with pytest.raises(PatchkitError, match="identical"):
        diff(base, copy)
    r = cli_runner("diff", base, copy, "-o", tmp_path / "x.safetensors")
    assert r.exit_code != 0 and "identical" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_diff_output_exists(ckpts, tmp_path, cli_runner):
    base = ckpts[("bf16", False)]
    edited = edited_copy(base, tmp_path / "e", surgery(torch.bfloat16))
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"keep me")
    r = cli_runner("diff", base, edited, "-o", out)
    assert r.exit_code != 0 and "already exists" in r.output
    assert out.read_bytes() == b"keep me"
    r = cli_runner("diff", base, edited, "-o", out, "--overwrite", "--full")
    assert r.exit_code == 0, r.output
    assert Patch.load(out).rows > 0


@pytest.mark.parametrize("block", [7 * 96, 1 << 16], ids=["blocks-of-7-rows", "one-block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_diff_recovers_a_shared_delta_through_rounding(tmp_path, dtype, block, monkeypatch):
    """The paper's edit, made the naive way (float32 add, rounded once), on many rows and with weights
    of every magnitude: the diff is a small factored patch, and applying it gives the edited bytes."""
    import patchkit.core.diff

    monkeypatch.setattr(patchkit.core.diff, "BOUNDS_BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(512, 96, generator=gen) * torch.logspace(-6, 0, 96)  # columns from 1e-6 to 1
    w = w.to(dtype)
    rows = torch.randperm(512, generator=gen)[:200].sort().values
    v = (torch.randn(96, generator=gen) * 0.02).float()
    edited = w.clone()
    edited[rows] = (w[rows].float() + 1.08 * v).to(dtype)
    base_dir, ed_dir = tmp_path / "base", tmp_path / "edited"
    for d, t in ((base_dir, w), (ed_dir, edited)):
        d.mkdir()
        save_file({"model.layers.0.mlp.gate_proj.weight": t.contiguous()}, d / "model.safetensors", metadata={"format": "pt"})
    p = diff(base_dir, ed_dir, tmp_path / "p.safetensors")
    e = p.edits["model.layers.0.mlp.gate_proj.weight"]
    assert e.encoding == "factored" and len(e.scale) == 1
    assert (tmp_path / "p.safetensors").stat().st_size < 20_000  # a dense float32 patch would be ~77 KB
    ops.apply(tmp_path / "p.safetensors", base_dir, tmp_path / "out")
    assert_tensors_bitequal(load_tensors(tmp_path / "out"), load_tensors(ed_dir))


@pytest.mark.parametrize("block", [3 * 32, 1 << 16], ids=["blocks-of-3-rows", "one-block"])
def test_diff_of_rows_with_different_deltas_stays_exact(tmp_path, block, monkeypatch):
    """Rows that got different vectors have no shared delta: the diff falls back and is still exact."""
    import patchkit.core.diff

    monkeypatch.setattr(patchkit.core.diff, "BOUNDS_BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(64, 32, generator=gen) * 0.02).to(torch.bfloat16)
    edited = w.clone()
    edited[:8] = (w[:8].float() + torch.randn(8, 32, generator=gen) * 0.01).to(torch.bfloat16)
    for d, t in ((tmp_path / "a", w), (tmp_path / "b", edited)):
        d.mkdir()
        save_file({"lm_head.weight": t.contiguous()}, d / "model.safetensors", metadata={"format": "pt"})
    p = diff(tmp_path / "a", tmp_path / "b", tmp_path / "p.safetensors")
    assert p.edits["lm_head.weight"].encoding == "dense"
    ops.apply(tmp_path / "p.safetensors", tmp_path / "a", tmp_path / "out")
    assert_tensors_bitequal(load_tensors(tmp_path / "out"), load_tensors(tmp_path / "b"))
