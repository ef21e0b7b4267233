"""Bad inputs fail with one line, a non-zero exit and no change on disk; crashes and concurrent
writers never leave a checkpoint half-written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from conftest import build_patch, run_cli_subprocess
from helpers import snapshot
from patchkit.core import ops
from patchkit.core import journal as jn
from patchkit.core import state as st
from patchkit.core.checkpoint import Checkpoint
from patchkit.core.patchfile import Patch, make_edit
from patchkit.core.stfile import serialize
from patchkit.errors import (
    BaseMismatchError, CheckpointError, LockedError, NonFiniteError, OutputExistsError, PatchFormatError,
)


def assert_clean_error(r, exit_code=None, match=None):
    """A failed command: non-zero exit through click (not an escaped exception), no traceback,
    one `error: ...` line on stderr that names the problem."""
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), f"uncaught {r.exception!r}"
    assert "Traceback" not in r.output
    if exit_code is not None:
        assert r.exit_code == exit_code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    if match is not None:
        assert match in lines[0], lines[0]


def folder_state(root: Path) -> dict:
    """Everything under `root`, so that a failed command can be shown to have left it unchanged."""
    return {"files": snapshot(root), "entries": sorted(os.listdir(root))}


# ---- bad inputs ---------------------------------------------------------------------------------------------
def _forged_nan_patch(ck: Path, path: Path) -> Path:
    """A well-formed file (valid content id) whose deltas hold a NaN."""
    p = build_patch(ck, tensors=("model.layers.0.mlp.gate_proj.weight",), kinds=["dense"])
    e = p.edits["model.layers.0.mlp.gate_proj.weight"]
    arrays = e.arrays()
    bad = e.delta.copy()
    bad[0, 0] = np.nan
    arrays[f"{e.name}::delta"] = ("F32", bad)
    meta = p._metadata()
    meta["id"] = hashlib.sha256(serialize(arrays, meta)).hexdigest()
    path.write_bytes(serialize(arrays, meta))
    return path


def _overflow_patch(ck: Path, path: Path) -> Path:
    c = Checkpoint(ck)
    name = "model.layers.1.mlp.up_proj.weight"
    info = c.tensors[name]
    rows = np.array([2, 9], dtype=np.int64)
    raw = c.read_rows(name, rows)
    delta = np.full((2, info.n_cols), 3.4e38, dtype=np.float32)  # finite in float32, inf once rounded to bf16
    return Patch(edits={name: make_edit(name, info.shape, info.dtype, rows, raw, delta=delta)}).save(path)


BAD_INPUTS = {
    # name: (make(tmp_path, ckpts, ck) -> (patch argument, checkpoint argument), exit code, words in the message)
    "missing-patch": (lambda t, c, ck: (t / "nope.safetensors", ck), PatchFormatError.exit_code, "does not exist"),
    "garbage-patch": (lambda t, c, ck: (_write(t / "g.safetensors", b"\x89PNG garbage" * 50), ck),
                      PatchFormatError.exit_code, "not a readable safetensors file"),
    "truncated-patch": (lambda t, c, ck: (_truncated(t, ck), ck), PatchFormatError.exit_code, "truncated"),
    "other-model": (lambda t, c, ck: (build_patch(c[("bf16-other", False)]).save(t / "o.safetensors"), ck),
                    BaseMismatchError.exit_code, "made for another base"),
    "dtype-mismatch": (lambda t, c, ck: (build_patch(c[("fp16", False)]).save(t / "f.safetensors"), ck),
                       BaseMismatchError.exit_code, "is BF16 [128, 32] in the checkpoint, F16 [128, 32] in the patch"),
    "shape-mismatch": (lambda t, c, ck: (build_patch(helpers.tiny_llama(t / "wide", torch.bfloat16, intermediate_size=64),
                                                     tensors=("model.layers.0.mlp.gate_proj.weight",))
                                         .save(t / "w.safetensors"), ck),
                       BaseMismatchError.exit_code, "[48, 32] in the checkpoint, BF16 [64, 32] in the patch"),
    "nan-deltas": (lambda t, c, ck: (_forged_nan_patch(ck, t / "nan.safetensors"), ck), PatchFormatError.exit_code, "NaN"),
    "bf16-overflow": (lambda t, c, ck: (_overflow_patch(ck, t / "big.safetensors"), ck), NonFiniteError.exit_code,
                      "would overflow tensor model.layers.1.mlp.up_proj.weight to inf"),
    "missing-checkpoint": (lambda t, c, ck: (build_patch(ck).save(t / "p.safetensors"), t / "no-such-folder"),
                           CheckpointError.exit_code, "does not exist"),
    "pickle-only-checkpoint": (lambda t, c, ck: (build_patch(ck).save(t / "p.safetensors"), _pickle_only(t)),
                               CheckpointError.exit_code, "pickled weights"),
    "patch-is-a-folder": (lambda t, c, ck: (ck, ck), PatchFormatError.exit_code, "folder"),
}


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _truncated(t: Path, ck: Path) -> Path:
    data = build_patch(ck).to_bytes()
    return _write(t / "trunc.safetensors", data[: len(data) - 7])


def _pickle_only(t: Path) -> Path:
    d = t / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip, and never opened")
    return d


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("target", ["in-place", "output"])
def test_bad_input_one_line_error_nothing_changes(case, target, ckpts, tmp_path, cli_runner):
    work = tmp_path / "work"
    work.mkdir()
    ck = work / "ck"
    shutil.copytree(ckpts[("bf16", True)], ck)
    make, code, words = BAD_INPUTS[case]
    patch, checkpoint = make(tmp_path, ckpts, ck)
    before = folder_state(work)
    args = ["apply", patch, checkpoint] + (["--in-place"] if target == "in-place" else ["-o", work / "out"])
    r = cli_runner(*args)
    assert_clean_error(r, code, words)
    assert folder_state(work) == before  # no output folder, no hidden temp folder, checkpoint unchanged


def test_bad_patch_through_the_real_entry_point(ckpts, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(ckpts[("bf16", False)], ck)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    r = run_cli_subprocess(["apply", tmp_path / "bad.safetensors", ck, "--in-place"])
    assert r.returncode == PatchFormatError.exit_code
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert snapshot(ck) == snapshot(ckpts[("bf16", False)])


@pytest.mark.parametrize("args", [[], ["--in-place", "-o", "OUT"]], ids=["neither", "both"])
def test_both_or_neither_target(args, copy_ckpt, make_patch, tmp_path, cli_runner):
    ck = copy_ckpt()
    p = make_patch(ck)
    before = folder_state(tmp_path)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    for cmd in ("apply", "revert"):
        r = cli_runner(cmd, p, ck, *args)
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
        assert "Traceback" not in r.output and "exactly one of -o/--output or --in-place" in r.output
    assert folder_state(tmp_path) == before


def test_revert_bad_inputs(copy_ckpt, make_patch, tmp_path, cli_runner):
    ck = copy_ckpt("bf16", True)
    p = make_patch(ck)
    ops.apply(p, ck, in_place=True)
    before = folder_state(tmp_path)
    assert_clean_error(cli_runner("revert", tmp_path / "nope.safetensors", ck, "--in-place"), match="does not exist")
    other = build_patch(copy_ckpt("fp16", False, name="fp16")).save(tmp_path / "f.safetensors")
    before = folder_state(tmp_path)
    assert_clean_error(cli_runner("revert", other, ck, "--in-place"), BaseMismatchError.exit_code, "shape or dtype")
    assert folder_state(tmp_path) == before


def test_output_exists_and_overwrite(copy_ckpt, make_patch, tmp_path, cli_runner):
    ck = copy_ckpt("bf16", True)
    p = make_patch(ck)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not lose me")
    before = folder_state(tmp_path)
    assert_clean_error(cli_runner("apply", p, ck, "-o", out), OutputExistsError.exit_code, "already exists")
    assert folder_state(tmp_path) == before
    r = cli_runner("apply", p, ck, "-o", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "precious.txt").exists()
    ref = tmp_path / "ref"
    ops.apply(p, ck, ref)
    assert snapshot(out) == snapshot(ref)
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".")]  # no temp or trash folders left
    # the output may not be the checkpoint itself or lie inside it
    assert_clean_error(cli_runner("apply", p, ck, "-o", ck / "sub"), CheckpointError.exit_code, "inside")
    assert_clean_error(cli_runner("apply", p, ck, "-o", ck, "--overwrite"), CheckpointError.exit_code, "--in-place")
    assert_clean_error(cli_runner("apply", p, ck, "-o", tmp_path / "no" / "such" / "out"), CheckpointError.exit_code, "does not exist")
    # nor contain it: replacing it would delete the checkpoint being read
    before = folder_state(tmp_path)
    assert_clean_error(cli_runner("apply", p, ck, "-o", tmp_path, "--overwrite"), CheckpointError.exit_code, "contains the checkpoint")
    assert_clean_error(cli_runner("revert", p, ck, "-o", tmp_path, "--overwrite"), CheckpointError.exit_code, "contains the checkpoint")
    assert folder_state(tmp_path) == before


def test_force_onto_a_mismatching_base(ckpts, copy_ckpt, tmp_path, cli_runner):
    ck = copy_ckpt("bf16", False)
    p = build_patch(ckpts[("bf16-other", False)]).save(tmp_path / "other.safetensors")
    assert_clean_error(cli_runner("apply", p, ck, "--in-place"), BaseMismatchError.exit_code, "--force")
    r = cli_runner("apply", p, ck, "--in-place", "--force", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["forced"] == [Patch.load(p).id]
    s = json.loads(cli_runner("status", ck, "--json").stdout)
    assert s["applied"][0]["forced"] is True and s["applied"][0]["intact"] is True
    assert "(forced)" in cli_runner("status", ck).output
    # forced or not, the undo record takes it out again exactly
    ops.revert(p, ck, in_place=True)
    assert snapshot(ck) == snapshot(ckpts[("bf16", False)])


# ---- crashes ------------------------------------------------------------------------------------------------
IN_PLACE_POINTS = ["after-undo", "after-journal", "mid-write", "after-write", "after-state"]


def _stacked(ckpts, tmp_path) -> tuple[Path, Path, Path]:
    """A sharded checkpoint with patch p0 applied in place, and p1 (touching both shards) ready."""
    ck = tmp_path / "ck"
    shutil.copytree(ckpts[("bf16", True)], ck)
    p0 = build_patch(ck, seed=20, tensors=("model.layers.0.mlp.gate_proj.weight", "lm_head.weight")).save(tmp_path / "p0.safetensors")
    ops.apply(p0, ck, in_place=True)
    p1 = build_patch(ck, seed=21, rows_per=9).save(tmp_path / "p1.safetensors")
    return ck, p0, p1


@pytest.mark.parametrize("point", IN_PLACE_POINTS)
@pytest.mark.parametrize("op", ["apply-clean", "apply-stacked", "revert-stacked", "revert-last"])
def test_crash_in_place_leaves_before_or_after(op, point, ckpts, tmp_path, cli_runner):
    ck, p0, p1 = _stacked(ckpts, tmp_path)
    if op == "apply-clean":
        shutil.rmtree(ck)
        shutil.copytree(ckpts[("bf16", True)], ck)
        p1 = build_patch(ck, seed=21, rows_per=9).save(tmp_path / "p1-clean.safetensors")
    if op == "revert-stacked":
        ops.apply(p1, ck, in_place=True)
    cmd, patch = {"apply-clean": ("apply", p1), "apply-stacked": ("apply", p1), "revert-stacked": ("revert", p1),
                  "revert-last": ("revert", p0)}[op]
    before = snapshot(ck)
    # what the operation gives when it is not interrupted
    done = tmp_path / "done"
    shutil.copytree(ck, done)
    r = cli_runner(cmd, patch, done, "--in-place")
    assert r.exit_code == 0, r.output
    after = snapshot(done)
    assert after != before

    r = run_cli_subprocess([cmd, patch, ck, "--in-place"], {"PATCHKIT_CRASH_AT": point})
    assert r.returncode == -9, (r.returncode, r.stderr)  # it did reach the crash point
    s = cli_runner("status", ck, "--json")
    assert s.exit_code == 0, s.output
    now = snapshot(ck)
    assert now in (before, after), sorted(set(now) ^ set(before))
    assert not (ck / ".patchkit" / "journal.safetensors").exists()
    # and the checkpoint is usable: the operation goes through now (or has already)
    if now == before:
        r = cli_runner(cmd, patch, ck, "--in-place")
        assert r.exit_code == 0, r.output
    assert snapshot(ck) == after


@pytest.mark.parametrize("cmd", ["apply", "revert"])
def test_crash_while_writing_an_output_leaves_no_output(cmd, ckpts, tmp_path):
    ck, p0, p1 = _stacked(ckpts, tmp_path)
    patch = p1 if cmd == "apply" else p0
    before = snapshot(ck)
    out = tmp_path / "out"
    r = run_cli_subprocess([cmd, patch, ck, "-o", out], {"PATCHKIT_CRASH_AT": "output-copied"})
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert not out.exists()
    assert snapshot(ck) == before
    assert run_cli_subprocess(["status", ck]).returncode == 0
    assert snapshot(ck) == before
    # the killed run left its hidden folder (a whole checkpoint's worth); the next run to that output
    # removes it, and is not disturbed by it
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".patchkit-tmp")
    r = run_cli_subprocess([cmd, patch, ck, "-o", out])
    assert r.returncode == 0, r.stderr
    assert out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_folder_another_run_is_still_building_is_left_alone(ckpts, make_patch, tmp_path):
    import fcntl

    ck = ckpts[("bf16", False)]
    patch = make_patch(ck)
    out = tmp_path / "out"
    busy, dead = tmp_path / ".out.busy0000.patchkit-tmp", tmp_path / ".out.dead0000.patchkit-tmp"  # as mkdtemp names them
    for d in (busy, dead):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the run building it holds it
        ops.apply(patch, ck, out)
        assert busy.exists() and not dead.exists() and out.exists()
    finally:
        os.close(fd)
    ops.apply(patch, ck, out, overwrite=True)  # its builder has gone: now it is a leftover
    assert not busy.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_leftover_undo_record_is_cleaned_by_the_next_command(ckpts, tmp_path, cli_runner):
    # a kill right after the undo record is written leaves a file no applied patch refers to
    ck, p0, p1 = _stacked(ckpts, tmp_path)
    before = snapshot(ck)
    r = run_cli_subprocess(["apply", p1, ck, "--in-place"], {"PATCHKIT_CRASH_AT": "after-undo"})
    assert r.returncode == -9
    assert snapshot(ck) != before  # the orphan record is there...
    r = cli_runner("apply", p1, ck, "--in-place", "--dry-run")
    assert r.exit_code == 0
    r = cli_runner("apply", p1, ck, "--in-place")
    assert r.exit_code == 0
    r = cli_runner("revert", p1, ck, "--in-place")
    assert r.exit_code == 0
    assert snapshot(ck) == before  # ...and gone once a command has run


# ---- locking ------------------------------------------------------------------------------------------------
def test_a_locked_checkpoint_is_refused(copy_ckpt, make_patch, tmp_path, cli_runner):
    ck = copy_ckpt("bf16", True)
    p = make_patch(ck)
    before = folder_state(tmp_path)
    with jn.locked(ck):
        assert_clean_error(cli_runner("apply", p, ck, "--in-place"), LockedError.exit_code, "another patchkit process is writing")
        assert_clean_error(cli_runner("apply", p, ck, "-o", tmp_path / "out"), LockedError.exit_code, "another patchkit process")
        assert_clean_error(cli_runner("revert", p, ck, "--in-place"), LockedError.exit_code, "another patchkit process")
        with pytest.raises(LockedError):
            ops.apply(p, ck, in_place=True)
        # status waits for a write in progress (a read in its middle could see half of it), then says so
        assert_clean_error(cli_runner("status", ck, "--wait", "0.2"), LockedError.exit_code, "is writing")
    # a reader's shared lock lets other readers (status, apply -o) go on, and keeps writers out
    with jn.locked(ck, exclusive=False):
        assert cli_runner("status", ck, "--wait", "0").exit_code == 0
        assert cli_runner("apply", p, ck, "-o", tmp_path / "out2").exit_code == 0
        assert_clean_error(cli_runner("apply", p, ck, "--in-place"), LockedError.exit_code, "another patchkit process")
    shutil.rmtree(tmp_path / "out2", ignore_errors=True)
    assert folder_state(tmp_path) == before
    # released: it goes through
    assert cli_runner("apply", p, ck, "--in-place").exit_code == 0


@pytest.mark.parametrize("fsync", [False, True], ids=["plain", "fsync"])
@pytest.mark.parametrize("point", ["after-journal", "mid-write", "after-write", "after-state"])
def test_crash_applying_overlapping_patches_in_one_pass(point, fsync, ckpts, tmp_path, cli_runner):
    """Two patches over the same rows in one apply: the rollback must restore the bytes from before both."""
    ck = tmp_path / "ck"
    shutil.copytree(ckpts[("bf16", True)], ck)
    pa = build_patch(ck, seed=30, rows_per=6).save(tmp_path / "pa.safetensors")
    done = tmp_path / "done"
    shutil.copytree(ck, done)
    ops.apply(pa, done, in_place=True)
    pb = build_patch(done, seed=30, rows_per=6, scale=0.08).save(tmp_path / "pb.safetensors")  # same rows, on top of pa
    assert all(np.array_equal(Patch.load(pa).edits[n].rows, Patch.load(pb).edits[n].rows) for n in Patch.load(pa).edits)
    shutil.rmtree(done)
    shutil.copytree(ck, done)
    before = snapshot(ck)
    extra = ["--fsync"] if fsync else []
    r = cli_runner("apply", pa, pb, done, "--in-place", *extra)
    assert r.exit_code == 0, r.output
    after = snapshot(done)
    r = run_cli_subprocess(["apply", pa, pb, ck, "--in-place", *extra], {"PATCHKIT_CRASH_AT": point})
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert cli_runner("status", ck).exit_code == 0
    assert snapshot(ck) in (before, after)


def test_a_journal_of_an_unknown_kind_is_left_alone_with_a_clear_error(ckpts, tmp_path, cli_runner):
    """A committed journal may mean weight bytes were written: one this version cannot read is not dropped."""
    ck = tmp_path / "ck"
    shutil.copytree(ckpts[("bf16", False)], ck)
    (ck / ".patchkit").mkdir()
    meta = {"format": "patchkit.journal", "mode": "from-the-future", "state_before": st.State().to_bytes().decode()}
    (ck / ".patchkit" / "journal.safetensors").write_bytes(serialize({}, meta))
    before = snapshot(ck)
    p = build_patch(ckpts[("bf16", False)]).save(tmp_path / "p.safetensors")
    for args in (("apply", p, ck, "--in-place"), ("status", ck)):
        r = cli_runner(*args)
        assert r.exit_code != 0 and "unfinished write of a kind" in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1
    assert snapshot(ck) == before
