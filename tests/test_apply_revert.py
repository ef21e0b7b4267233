"""apply / revert / status on tiny Llama checkpoints (bf16, fp16, fp32; single file and sharded),
through the library and through the command line, bit for bit against a torch reference."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_tensors_bitequal, build_patch, load_tensors, reference_apply
from helpers import snapshot
from patchkit.core import ops
from patchkit.core.checkpoint import Checkpoint
from patchkit.core.dtypes import to_float, ulp
from patchkit.core.patchfile import Patch
from patchkit.errors import PatchkitError, StateError


def do_apply(via, cli_runner, patches, ckpt, out=None, **kw):
    """Apply through the library or the CLI; returns the summary dict."""
    patches = [str(p) for p in (patches if isinstance(patches, list) else [patches])]
    if via == "lib":
        return ops.apply(patches, ckpt, out, in_place=out is None, **kw)
    args = ["apply", *patches, ckpt] + (["-o", out] if out is not None else ["--in-place"]) + ["--json"]
    args += [f"--{k.replace('_', '-')}" for k, v in kw.items() if v]
    r = cli_runner(*args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def do_revert(via, cli_runner, patch, ckpt, out=None, **kw):
    if via == "lib":
        return ops.revert(str(patch), ckpt, out, in_place=out is None, **kw)
    args = ["revert", patch, ckpt] + (["-o", out] if out is not None else ["--in-place"]) + ["--json"]
    args += [f"--{k.replace('_', '-')}" for k, v in kw.items() if v]
    r = cli_runner(*args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


VIA = pytest.mark.parametrize("via", ["lib", "cli"])


@VIA
def test_apply_output_equals_torch_reference(variant, ckpts, make_patch, tmp_path, cli_runner, via):
    base = ckpts[variant]
    kinds = ["dense", "factored", "replace", "dense"]
    p = make_patch(base, seed=3, kinds=kinds)
    before = snapshot(base)
    out = tmp_path / "out"
    r = do_apply(via, cli_runner, p, base, out)
    assert r["output"] == str(out) and r["applied"] == [Patch.load(p).id]
    assert r["rows"] == Patch.load(p).rows == 16
    assert snapshot(base) == before  # the source is never touched by -o
    expected = reference_apply(load_tensors(base), Patch.load(p))
    got = load_tensors(out)
    assert_tensors_bitequal(got, expected)
    # the edit did change the touched rows
    for name in Patch.load(p).edits:
        assert not torch.equal(got[name], load_tensors(base)[name])


@VIA
def test_in_place_apply_then_revert_is_byte_identical(variant, copy_ckpt, make_patch, cli_runner, via):
    ck = copy_ckpt(*variant)
    p = make_patch(ck, seed=1)
    before = snapshot(ck)
    r = do_apply(via, cli_runner, p, ck)
    assert r["output"] == str(ck)
    mid = snapshot(ck)
    assert mid != before
    assert ".patchkit/state.json" in mid
    assert_tensors_bitequal(load_tensors(ck), reference_apply({k: v for k, v in _tensors_of(before, ck).items()}, Patch.load(p)))
    do_revert(via, cli_runner, p, ck)
    after = snapshot(ck)
    assert after == before
    assert not (ck / ".patchkit").exists()


def _tensors_of(snap: dict[str, bytes], ck: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    out = {}
    for k, v in snap.items():
        if k.endswith(".safetensors") and "/" not in k:
            out.update(load(v))
    return out


@VIA
def test_output_then_revert_output_gives_back_base_bytes(variant, ckpts, make_patch, tmp_path, cli_runner, via):
    base = ckpts[variant]
    p = make_patch(base, seed=2, kinds=["dense", "replace", "factored", "dense"])
    do_apply(via, cli_runner, p, base, tmp_path / "patched")
    assert (tmp_path / "patched" / ".patchkit" / "state.json").exists()
    r = do_revert(via, cli_runner, p, tmp_path / "patched", tmp_path / "restored")
    assert r["exact"] is True
    assert snapshot(tmp_path / "restored") == snapshot(base)


@pytest.mark.parametrize("variant_", [("bf16", True), ("fp16", False), ("fp32", True)], ids=str)
def test_several_patches_in_one_apply_equal_sequential(variant_, ckpts, tmp_path, cli_runner):
    base = ckpts[variant_]
    p1 = build_patch(base, seed=10).save(tmp_path / "p1.safetensors")
    ops.apply(p1, base, tmp_path / "mid")
    # the second patch is made on top of the first, on overlapping tensors (and likely rows)
    p2 = build_patch(tmp_path / "mid", seed=11, rows_per=20).save(tmp_path / "p2.safetensors")
    ids = [Patch.load(p1).id, Patch.load(p2).id]

    r = do_apply("cli", cli_runner, [p1, p2], base, tmp_path / "batch")
    assert r["applied"] == ids
    ops.apply(p2, tmp_path / "mid", tmp_path / "seq")
    assert snapshot(tmp_path / "batch") == snapshot(tmp_path / "seq")
    # and in place, one pass against two
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(base, a)
    shutil.copytree(base, b)
    ops.apply([p1, p2], a, in_place=True)
    ops.apply(p1, b, in_place=True)
    ops.apply(p2, b, in_place=True)
    assert snapshot(a) == snapshot(b)
    assert [x["id"] for x in ops.status(a)["applied"]] == ids
    # reverting in reverse order gives back the base
    ops.revert(p2, a, in_place=True)
    ops.revert(p1, a, in_place=True)
    assert snapshot(a) == snapshot(base)


def test_revert_out_of_order_is_refused_when_rows_overlap(ckpts, tmp_path):
    base = ckpts[("bf16", False)]
    p1 = build_patch(base, seed=10, rows_per=48).save(tmp_path / "p1.safetensors")
    ops.apply(p1, base, tmp_path / "mid")
    p2 = build_patch(tmp_path / "mid", seed=11, rows_per=48).save(tmp_path / "p2.safetensors")
    ops.apply(p2, tmp_path / "mid", in_place=True)
    before = snapshot(tmp_path / "mid")
    with pytest.raises(StateError, match="revert it first"):
        ops.revert(p1, tmp_path / "mid", in_place=True)
    assert snapshot(tmp_path / "mid") == before


def test_applying_twice_is_a_state_error(copy_ckpt, make_patch, tmp_path, cli_runner):
    ck = copy_ckpt("bf16", True)
    p = make_patch(ck)
    ops.apply(p, ck, in_place=True)
    before = snapshot(ck)
    with pytest.raises(StateError, match="already applied"):
        ops.apply(p, ck, in_place=True)
    with pytest.raises(StateError, match="already applied"):
        ops.apply(p, ck, tmp_path / "o")
    r = cli_runner("apply", p, ck, "--in-place")
    assert r.exit_code == StateError.exit_code and "already applied" in r.output
    # the same patch twice in one command
    ck2 = copy_ckpt("bf16", False)
    p2 = make_patch(ck2, name="x.safetensors")
    with pytest.raises(StateError, match="already applied"):
        ops.apply([p2, p2], ck2, in_place=True)
    assert snapshot(ck) == before
    assert not (tmp_path / "o").exists()


def test_revert_of_a_patch_not_applied_is_an_error(copy_ckpt, make_patch, cli_runner):
    ck = copy_ckpt("fp16", False)
    p = make_patch(ck)
    before = snapshot(ck)
    with pytest.raises(StateError, match="not applied"):
        ops.revert(p, ck, in_place=True)
    r = cli_runner("revert", p, ck, "--in-place")
    assert r.exit_code != 0 and "not applied" in r.output and "Traceback" not in r.output
    # an unknown id prefix
    r = cli_runner("revert", "0123456789ab", ck, "--in-place")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert snapshot(ck) == before


def test_dry_run_writes_nothing(copy_ckpt, make_patch, tmp_path, cli_runner):
    ck = copy_ckpt("bf16", True)
    p = make_patch(ck)
    before = snapshot(ck)
    r = cli_runner("apply", p, ck, "--in-place", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["rows"] == Patch.load(p).rows
    assert sorted(plan["files"]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    r = cli_runner("apply", p, ck, "-o", tmp_path / "out", "--dry-run")
    assert r.exit_code == 0 and "would apply" in r.output
    assert snapshot(ck) == before
    assert not (tmp_path / "out").exists()
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".out")]
    # and for revert
    ops.apply(p, ck, in_place=True)
    mid = snapshot(ck)
    r = cli_runner("revert", p, ck, "--in-place", "--dry-run")
    assert r.exit_code == 0 and "would revert" in r.output
    assert snapshot(ck) == mid


def test_link_hard_links_only_untouched_shards(ckpts, make_patch, tmp_path):
    base = ckpts[("bf16", True)]
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    # a patch that touches only tensors in shard 2
    p = make_patch(base, tensors=("model.layers.2.mlp.up_proj.weight", "lm_head.weight"))
    ops.apply(p, base, tmp_path / "out", link=True)
    out = tmp_path / "out"
    assert (out / shard1).stat().st_ino == (base / shard1).stat().st_ino
    assert (out / shard2).stat().st_ino != (base / shard2).stat().st_ino
    assert (out / shard2).read_bytes() != (base / shard2).read_bytes()
    # non-weight files are copies, not links
    assert (out / "config.json").stat().st_ino != (base / "config.json").stat().st_ino
    # a patch touching both shards links neither
    p2 = make_patch(base, seed=5, name="both.safetensors")
    ops.apply(p2, base, tmp_path / "out2", link=True)
    for shard in (shard1, shard2):
        assert (tmp_path / "out2" / shard).stat().st_ino != (base / shard).stat().st_ino
    # without --link nothing is linked
    ops.apply(p, base, tmp_path / "out3")
    assert (tmp_path / "out3" / shard1).stat().st_ino != (base / shard1).stat().st_ino
    assert (tmp_path / "out3" / shard1).read_bytes() == (base / shard1).read_bytes()


@pytest.mark.parametrize("sharded", [False, True])
def test_non_weight_files_are_carried_unchanged(ckpts, make_patch, tmp_path, sharded):
    base = ckpts[("fp16", sharded)]
    p = make_patch(base)
    ops.apply(p, base, tmp_path / "out")
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    if sharded:
        names.append("model.safetensors.index.json")
    for n in names:
        assert (base / n).exists()
        assert (tmp_path / "out" / n).read_bytes() == (base / n).read_bytes(), n
    src, dst = set(snapshot(base)), set(snapshot(tmp_path / "out"))
    assert src <= dst and {x for x in dst - src if not x.startswith(".patchkit/")} == set()


def test_status_lists_patches_in_order_and_detects_changes(copy_ckpt, make_patch, cli_runner, tmp_path):
    ck = copy_ckpt("bf16", True)
    p1 = make_patch(ck, seed=1, tensors=("model.layers.0.mlp.gate_proj.weight",))
    p2 = make_patch(ck, seed=2, tensors=("lm_head.weight", "model.layers.2.mlp.up_proj.weight"))
    id1, id2 = Patch.load(p1).id, Patch.load(p2).id
    assert ops.status(ck)["applied"] == []
    ops.apply(p1, ck, in_place=True)
    ops.apply(p2, ck, in_place=True)
    s = ops.status(ck)
    assert [a["id"] for a in s["applied"]] == [id1, id2]
    assert all(a["intact"] for a in s["applied"]) and not any(a["forced"] for a in s["applied"])
    r = cli_runner("status", ck, "--json")
    assert [a["id"] for a in json.loads(r.stdout)["applied"]] == [id1, id2]
    # someone edits a touched row of lm_head by hand
    info = Checkpoint(ck).tensors["lm_head.weight"]
    row = int(Patch.load(p2).edits["lm_head.weight"].rows[0])
    with open(info.file, "r+b") as f:
        off = info.offset + row * info.row_bytes
        b = os.pread(f.fileno(), 2, off)
        os.pwrite(f.fileno(), bytes([b[0] ^ 1, b[1]]), off)
    s = ops.status(ck)
    assert s["applied"][0]["intact"] is True
    assert s["applied"][1]["intact"] is False and s["applied"][1]["changed_tensors"] == ["lm_head.weight"]
    r = cli_runner("status", ck)
    assert r.exit_code == 0 and "CHANGED: lm_head.weight" in r.output
    # reverting the changed patch needs --force, which restores the recorded bytes
    with pytest.raises(StateError, match="changed after patch"):
        ops.revert(p2, ck, in_place=True)
    ops.revert(p2, ck, in_place=True, force=True)
    ops.revert(p1, ck, in_place=True)
    assert snapshot(ck) == snapshot(copy_ckpt("bf16", True))


def _error_ulps(restored: np.ndarray, base: np.ndarray, dtype: str) -> float:
    ok = np.isfinite(base) & np.isfinite(restored)
    err = np.abs(restored[ok].astype(np.float64) - base[ok].astype(np.float64))
    return float((err / ulp(restored[ok], dtype)).max()) if ok.any() else 0.0


@pytest.mark.parametrize("exact_case", [True, False], ids=["exact", "approx"])
def test_revert_without_undo_record(variant, ckpts, tmp_path, exact_case, cli_runner):
    base = ckpts[variant]
    ck = Checkpoint(base)
    names = ("model.layers.0.mlp.gate_proj.weight", "lm_head.weight")
    from patchkit.core.patchfile import make_edit

    edits = {}
    rng = np.random.default_rng(7)
    for name in names:
        info = ck.tensors[name]
        rows = np.arange(0, info.n_rows, 3, dtype=np.int64)
        raw = ck.read_rows(name, rows)
        w = to_float(raw, info.dtype)
        if exact_case:
            delta = w.astype(np.float32)  # w + w = 2w and 2w - w = w: exact in every dtype
        else:
            delta = (rng.standard_normal(w.shape) * 0.37).astype(np.float32)
        edits[name] = make_edit(name, info.shape, info.dtype, rows, raw, delta=delta)
    p = Patch(edits=edits).save(tmp_path / "p.safetensors")
    ops.apply(p, base, tmp_path / "patched")
    # the patched checkpoint travels without its .patchkit folder
    shutil.copytree(tmp_path / "patched", tmp_path / "copy", ignore=shutil.ignore_patterns(".patchkit"))
    assert not (tmp_path / "copy" / ".patchkit").exists()
    r = cli_runner("revert", p, tmp_path / "copy", "--in-place", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    restored = Checkpoint(tmp_path / "copy")
    same = all(
        (restored.tensors[n].file.read_bytes() == ck.tensors[n].file.read_bytes()) for n in names
    )
    assert res["exact"] is same
    assert same is exact_case  # the test's own premise: w + w - w is exact, random deltas are not
    assert np.isfinite(res["max_error_ulps"])
    if same:
        assert res["max_error_ulps"] == 0
    else:
        assert res["max_error_ulps"] > 0
        for name in names:
            e = edits[name]
            got = to_float(restored.read_rows(name, e.rows), e.dtype)
            want = to_float(ck.read_rows(name, e.rows), e.dtype)
            assert _error_ulps(got, want, e.dtype) <= res["max_error_ulps"]
    assert not (tmp_path / "copy" / ".patchkit").exists()
    # the untouched tensors are exactly the base
    got, want = load_tensors(tmp_path / "copy"), load_tensors(base)
    assert_tensors_bitequal({n: got[n] for n in got if n not in names}, {n: want[n] for n in want if n not in names})


def test_revert_by_id_prefix(copy_ckpt, make_patch):
    ck = copy_ckpt("bf16", False)
    before = snapshot(ck)
    p = make_patch(ck)
    pid = Patch.load(p).id
    ops.apply(p, ck, in_place=True)
    os.unlink(p)  # the patch file is gone; its id is enough
    ops.revert(pid[:12], ck, in_place=True)
    assert snapshot(ck) == before


def test_library_refuses_both_or_neither_target(copy_ckpt, make_patch, tmp_path):
    ck = copy_ckpt()
    p = make_patch(ck)
    with pytest.raises(PatchkitError, match="exactly one"):
        ops.apply(p, ck)
    with pytest.raises(PatchkitError, match="exactly one"):
        ops.apply(p, ck, tmp_path / "o", in_place=True)


def test_in_place_write_never_reaches_a_linked_base(ckpts, copy_ckpt, make_patch, tmp_path):
    # apply -o --link shares the untouched shard's inode with the base; a later in-place apply on
    # the output that touches that shard must not write through the link into the base
    base = copy_ckpt("bf16", True, name="base")
    shard1 = "model-00001-of-00002.safetensors"
    p1 = make_patch(base, tensors=("lm_head.weight",), name="p1.safetensors")  # shard 2 only
    ops.apply(p1, base, tmp_path / "out", link=True)
    assert (tmp_path / "out" / shard1).stat().st_ino == (base / shard1).stat().st_ino
    before = snapshot(base)
    p2 = make_patch(base, seed=3, tensors=("model.layers.0.mlp.gate_proj.weight",), name="p2.safetensors")  # shard 1
    ops.apply(p2, tmp_path / "out", in_place=True)
    assert snapshot(base) == before
    assert (tmp_path / "out" / shard1).read_bytes() != (base / shard1).read_bytes()
    assert [a["id"] for a in ops.status(tmp_path / "out")["applied"]] == [Patch.load(p1).id, Patch.load(p2).id]
    ops.revert(p2, tmp_path / "out", in_place=True)
    assert (tmp_path / "out" / shard1).read_bytes() == (base / shard1).read_bytes()


def test_in_place_write_never_reaches_a_symlink_target(ckpts, tmp_path, make_patch):
    # a Hub cache snapshot holds symlinks to shared blobs: the blob must stay as it is
    src = ckpts[("fp16", False)]
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    ck = tmp_path / "snapshot"
    ck.mkdir()
    for f in os.listdir(src):
        shutil.copyfile(src / f, blobs / f)
        os.symlink(blobs / f, ck / f)
    blob_bytes = snapshot(blobs)
    p = make_patch(ck)
    ops.apply(p, ck, in_place=True)
    assert snapshot(blobs) == blob_bytes
    assert not (ck / "model.safetensors").is_symlink() and (ck / "config.json").is_symlink()
    assert_tensors_bitequal(load_tensors(ck), reference_apply(load_tensors(src), Patch.load(p)))
    ops.revert(p, ck, in_place=True)
    assert (ck / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


@pytest.mark.parametrize("sharded", [False, True])
def test_thread_count_does_not_change_a_single_byte(ckpts, make_patch, tmp_path, monkeypatch, sharded):
    """Planning and writing run per tensor / per file on several threads: one thread gives the same files."""
    ck = ckpts[("bf16", sharded)]
    patch = make_patch(ck, rows_per=40)
    outs = {}
    for threads in ("1", "4"):
        monkeypatch.setenv("PATCHKIT_THREADS", threads)
        out = tmp_path / f"out-{threads}"
        ops.apply(patch, ck, out)
        outs[threads] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert outs["1"] == outs["4"]


def test_status_checks_rows_against_what_the_patch_declares(copy_ckpt, tmp_path):
    """apply records a patch's result_sha256 on the base it was made for; a patch whose declared result
    is not what it writes is therefore reported as changed right away, instead of passing unnoticed."""
    ck = copy_ckpt("bf16")
    good = build_patch(ck, seed=3)
    bad = build_patch(ck, seed=3, scale=0.07)
    name = sorted(bad.edits)[0]
    bad.edits[name].result_sha256 = good.edits[name].result_sha256  # a wrong claim for this tensor
    ops.apply(good, ck, in_place=True)
    assert ops.status(ck)["applied"][0]["intact"]
    ops.revert(good, ck, in_place=True)
    ops.apply(bad, ck, in_place=True)
    s = ops.status(ck)["applied"][0]
    assert not s["intact"] and s["changed_tensors"] == [name]
    ops.revert(bad, ck, in_place=True, force=True)  # the undo record still restores the original bytes
    assert ops.status(ck)["applied"] == []


def test_applying_to_a_checkpoint_that_already_holds_the_patch_says_so(ckpts, make_patch, tmp_path, cli_runner):
    """A checkpoint patched elsewhere (or uploaded without .patchkit/) is not 'another base'; one that
    holds the patch's result in some tensors only is, and the first such tensor is named."""
    from patchkit.core import state as st
    from patchkit.core.tensorio import write_rows

    base = ckpts[("bf16", False)]
    path = make_patch(base)
    ck = tmp_path / "patched"
    ops.apply(path, base, ck)
    undo = st.read_undo(ck, Patch.load(path).id)
    shutil.rmtree(ck / ".patchkit")  # as a Hub upload of it would be
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    r = cli_runner("apply", path, ck, "--in-place")
    assert r.exit_code == StateError.exit_code and "is already in" in r.output and "Traceback" not in r.output
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    # put the first tensor's original rows back: the others still hold the result
    first, *rest = sorted(undo)
    info = Checkpoint(ck).info(first)
    with open(info.file, "r+b") as f:
        write_rows(info, undo[first][0], undo[first][1], f)
    r = cli_runner("apply", path, ck, "--in-place")
    assert r.exit_code == 5 and f"tensor {rest[0]} differ" in r.output
