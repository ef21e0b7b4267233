"""Hostile checkpoints and tampered `.patchkit/` state: one line and a non-zero exit, nothing written
outside the checkpoint (a sentinel folder beside it stays byte-identical), and the checkpoint itself
byte-identical or recoverable. Failed writes roll back at once and name the file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import build_patch, run_cli_subprocess
from helpers import snapshot
from patchkit.core import journal as jn
from patchkit.core import ops, records, writes
from patchkit.core import state as st
from patchkit.core import stfile, tensorio
from patchkit.core.checkpoint import Checkpoint
from patchkit.errors import CheckpointError
from test_safety import assert_clean_error

GATE = "model.layers.0.mlp.gate_proj.weight"


@pytest.fixture
def world(ckpts, tmp_path):
    """A private sharded checkpoint, a patch for it, and a sentinel folder outside it."""
    ck = tmp_path / "ck"
    shutil.copytree(ckpts[("bf16", True)], ck)
    patch = build_patch(ck, seed=3).save(tmp_path / "p.safetensors")
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("mine")
    (sentinel / ".a.tmp").write_text("also mine")
    shutil.copy(ck / "model-00001-of-00002.safetensors", sentinel / "outside.safetensors")
    return ck, patch, sentinel


def _index(ck: Path) -> Path:
    return next(ck.glob("*.safetensors.index.json"))


def _set_index_entry(ck: Path, value) -> None:
    p = _index(ck)
    doc = json.loads(p.read_text())
    name = next(iter(sorted(doc["weight_map"])))
    doc["weight_map"] = {k: (value if v == doc["weight_map"][name] else v) for k, v in doc["weight_map"].items()}
    p.write_text(json.dumps(doc))


def _all_commands(ck, patch, tmp_path):
    return [("apply", patch, ck, "--in-place"), ("apply", patch, ck, "-o", tmp_path / "out"),
            ("apply", patch, ck, "--in-place", "--dry-run"), ("revert", patch, ck, "--in-place"), ("status", ck)]


# ---- 1. index paths that leave the folder ---------------------------------------------------------------
@pytest.mark.parametrize("entry", ["../ck/model-00001-of-00002.safetensors", "../sentinel/outside.safetensors",
                                   "ABSOLUTE", "sub/x.safetensors", "..", ".", "", 7, None, ["a.safetensors"],
                                   "model-00001-of-00002.safetensors\x00.txt"], ids=repr)
def test_index_entries_must_be_plain_file_names(entry, world, tmp_path, cli_runner):
    ck, patch, sentinel = world
    if entry == "ABSOLUTE":
        entry = str(sentinel / "outside.safetensors")
    _set_index_entry(ck, entry)
    before, outside = snapshot(ck), snapshot(sentinel)
    for args in _all_commands(ck, patch, tmp_path):
        r = cli_runner(*args)
        assert_clean_error(r, CheckpointError.exit_code)
        assert "index" in r.stderr or "weight_map" in r.stderr
    assert snapshot(ck) == before and snapshot(sentinel) == outside
    assert not (tmp_path / "out").exists()


def test_a_fifo_or_folder_as_a_shard_is_refused(world, tmp_path, cli_runner):
    ck, patch, _ = world
    shard = ck / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    r = run_cli_subprocess(["status", ck], timeout=30)
    assert r.returncode == CheckpointError.exit_code and "not a regular file" in r.stderr, r.stderr
    shard.unlink()
    shard.mkdir()
    assert_clean_error(cli_runner("apply", patch, ck, "--in-place"), CheckpointError.exit_code, "not a regular file")


# ---- 2. journal and undo records are checked before a byte is written from them ----------------------
def _forge_rows_journal(ck: Path, rows, row_bytes: int, name: str = GATE) -> Path:
    """A journal that passes its checksum (written the way patchkit writes one) but names bad rows."""
    rows = np.asarray(rows, dtype=np.int64)
    raw = np.full((len(rows), row_bytes), 0xAB, dtype=np.uint8)
    jn.write_journal(ck, st.State(), rows={name: (rows, raw)})
    return ck / ".patchkit" / "journal.safetensors"


@pytest.mark.parametrize("rows", [[-1], [10**9], [3, 2], [1, 1]], ids=["negative", "huge", "unsorted", "duplicate"])
def test_a_journal_with_bad_rows_is_refused_and_kept(rows, world, tmp_path, cli_runner):
    ck, patch, _ = world
    info = Checkpoint(ck).tensors[GATE]
    journal = _forge_rows_journal(ck, rows, info.row_bytes)
    before = snapshot(ck)
    sizes = {p.name: p.stat().st_size for p in ck.glob("*.safetensors")}
    for args in (("status", ck), ("apply", patch, ck, "--in-place"), ("revert", patch, ck, "--in-place", "--force")):
        assert_clean_error(cli_runner(*args), CheckpointError.exit_code, str(journal))
    assert snapshot(ck) == before and journal.exists()
    assert {p.name: p.stat().st_size for p in ck.glob("*.safetensors")} == sizes


def test_a_journal_with_rows_of_the_wrong_width_or_tensor_is_refused(world, cli_runner):
    ck, patch, _ = world
    info = Checkpoint(ck).tensors[GATE]
    _forge_rows_journal(ck, [0], info.row_bytes + 2)
    before = snapshot(ck)
    assert_clean_error(cli_runner("status", ck), CheckpointError.exit_code, "rows of")
    (ck / ".patchkit" / "journal.safetensors").unlink()
    _forge_rows_journal(ck, [0], info.row_bytes, name="no.such.tensor")
    assert_clean_error(cli_runner("status", ck), CheckpointError.exit_code, "no such tensor")
    assert {k: v for k, v in snapshot(ck).items() if "journal" not in k} == {k: v for k, v in before.items() if "journal" not in k}


@pytest.mark.parametrize("tamper", ["row-negative", "row-out-of-range", "checksum", "other-patch"])
def test_a_tampered_undo_record_is_refused_even_with_force(tamper, world, cli_runner):
    ck, patch, _ = world
    assert cli_runner("apply", patch, ck, "--in-place").exit_code == 0
    (rec,) = st.load_state(ck).applied
    path = st.undo_path(ck, rec.id)
    undo = st.read_undo(ck, rec.id)
    rows, raw = undo[GATE]
    if tamper == "checksum":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        bad = rows.copy()
        bad[0] = -1 if tamper == "row-negative" else 10**6
        undo[GATE] = (np.sort(bad) if tamper == "row-out-of-range" else bad, raw)
        pid = "0" * 64 if tamper == "other-patch" else rec.id
        if tamper == "other-patch":
            undo[GATE] = (rows, raw)
        records.write_record(path, records.row_arrays(undo, "::orig"), {"format": "patchkit.undo", "patch_id": pid})
    before = snapshot(ck)
    for extra in ([], ["--force"]):
        assert_clean_error(cli_runner("revert", patch, ck, "--in-place", *extra), CheckpointError.exit_code, str(path))
    assert snapshot(ck) == before


# ---- 3. symlinks and odd files in .patchkit/ ---------------------------------------------------------------
@pytest.mark.parametrize("where", [".patchkit", ".patchkit/undo", ".patchkit/state.json", ".patchkit/journal.safetensors"])
def test_state_paths_that_are_symlinks_are_never_followed(where, world, tmp_path, cli_runner):
    ck, patch, sentinel = world
    assert cli_runner("apply", patch, ck, "--in-place").exit_code == 0
    target = ck / where
    if target.exists():
        shutil.move(target, sentinel / target.name) if target.is_dir() else shutil.copy(target, sentinel / "copied")
        if target.exists():
            target.unlink()
    (sentinel / f".{'0' * 64}.safetensors.abcdefgh.tmp").write_text("looks like ours, is not in the checkpoint")
    os.symlink(sentinel if target.name != "state.json" and target.suffix != ".safetensors" else sentinel / "keep.txt", target)
    before, outside = snapshot(ck), snapshot(sentinel)
    for args in (("status", ck), ("apply", build_patch(ck, seed=9).save(tmp_path / "q.safetensors"), ck, "--in-place"),
                 ("revert", patch, ck, "--in-place")):
        r = cli_runner(*args)
        assert_clean_error(r, CheckpointError.exit_code)
        assert "symlink" in r.stderr or "not a regular file" in r.stderr, r.stderr
    assert snapshot(sentinel) == outside and snapshot(ck) == before


def test_garbage_collection_removes_only_names_patchkit_makes(world, cli_runner):
    ck, patch, _ = world
    assert cli_runner("apply", patch, ck, "--in-place").exit_code == 0
    undo = ck / ".patchkit" / "undo"
    mine = {undo / f"{'a' * 64}.safetensors", undo / f".{'b' * 64}.safetensors.x1y2z3w4.tmp",
            ck / ".patchkit" / ".state.json.abcdefgh.tmp", ck / ".model-00001-of-00002.safetensors.q9w8e7r6.tmp"}
    theirs = {undo / "notes.txt", undo / "ABC.safetensors", ck / ".patchkit" / "README", ck / ".patchkit" / ".x.tmp",
              ck / ".model-00001-of-00002.safetensors.backup", undo / f".{'b' * 64}.safetensors.tmp"}
    for p in mine | theirs:
        p.write_text("x")
    assert cli_runner("status", ck).exit_code == 0
    assert not any(p.exists() for p in mine)
    assert all(p.exists() for p in theirs)


# ---- 4. a shard rewritten between plan and write ----------------------------------------------------------
def _resave_with_longer_header(path: Path) -> bytes:
    h = stfile.read_header(path)
    arrays = {n: (i.dtype, tensorio.read_tensor(i)) for n, i in h.tensors.items()}
    data = stfile.serialize(arrays, {**h.metadata, "note": "x" * 200})
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("target", ["in-place", "output"])
def test_a_shard_rewritten_after_planning_is_not_written(target, world, tmp_path):
    ck, patch, _ = world
    c = Checkpoint(ck)
    plan = ops.plan_apply([patch], ck, _ckpt=c)
    shard = c.info(GATE).file
    data = _resave_with_longer_header(shard)
    before = snapshot(ck)
    with pytest.raises(CheckpointError, match="changed on disk since patchkit read it"):
        if target == "in-place":
            writes.write_in_place(plan)
        else:
            writes.write_output(plan, tmp_path / "out", False, False)
    assert shard.read_bytes() == data and snapshot(ck) == before
    assert not (tmp_path / "out").exists() and not (ck / ".patchkit").exists()


# ---- 5. failed writes roll back at once and name the file ---------------------------------------------------
def _fail_on(monkeypatch, fn_owner, name, when, err=errno.ENOSPC):
    real = getattr(fn_owner, name)
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if when(calls["n"], a):
            raise OSError(err, os.strerror(err))
        return real(*a, **k)

    monkeypatch.setattr(fn_owner, name, flaky)
    return calls


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM])
def test_a_failed_row_write_is_rolled_back_at_once(err, world, monkeypatch, cli_runner):
    ck, patch, _ = world
    before = snapshot(ck)
    second = "model-00002-of-00002.safetensors"
    _fail_on(monkeypatch, writes, "write_rows", lambda n, a: a[0].file.name == second, err)
    r = cli_runner("apply", patch, ck, "--in-place")
    assert_clean_error(r, CheckpointError.exit_code, "rolled back")
    assert second in r.stderr and os.strerror(err) in r.stderr
    assert snapshot(ck) == before and not (ck / ".patchkit").exists()
    monkeypatch.undo()
    assert cli_runner("apply", patch, ck, "--in-place").exit_code == 0


def test_disk_full_writing_the_state_rolls_back(world, monkeypatch, cli_runner):
    ck, patch, _ = world
    before = snapshot(ck)
    _fail_on(monkeypatch, st, "atomic_write_bytes", lambda n, a: Path(a[0]).name == "state.json")
    r = cli_runner("apply", patch, ck, "--in-place")
    assert_clean_error(r, CheckpointError.exit_code, "rolled back")
    assert "state" in r.stderr and "No space left on device" in r.stderr
    assert snapshot(ck) == before


def test_disk_full_writing_the_undo_record_leaves_nothing(world, monkeypatch, cli_runner):
    ck, patch, _ = world
    before = snapshot(ck)
    _fail_on(monkeypatch, records, "atomic_write_bytes", lambda n, a: "undo" in str(a[0]))
    r = cli_runner("apply", patch, ck, "--in-place")
    assert_clean_error(r, CheckpointError.exit_code, "nothing was written")
    assert "undo" in r.stderr
    assert snapshot(ck) == before and not (ck / ".patchkit").exists()  # no empty undo/ left either


def test_when_the_rollback_cannot_write_either_the_message_says_how_to_finish(world, monkeypatch, cli_runner):
    ck, patch, _ = world
    before = snapshot(ck)
    second = "model-00002-of-00002.safetensors"
    _fail_on(monkeypatch, writes, "write_rows", lambda n, a: a[0].file.name == second, errno.EIO)
    _fail_on(monkeypatch, jn, "write_rows", lambda n, a: True, errno.EIO)
    r = cli_runner("apply", patch, ck, "--in-place")
    assert_clean_error(r, CheckpointError.exit_code, "rolling back")
    assert "patchkit status" in r.stderr and "journal" in r.stderr
    assert (ck / ".patchkit" / "journal.safetensors").exists()
    monkeypatch.undo()  # the cause is fixed
    s = cli_runner("status", ck)
    assert s.exit_code == 0 and "rolled back" in s.output
    assert snapshot(ck) == before


def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_a_read_only_shard_is_found_before_any_write(world, cli_runner):
    ck, patch, _ = world
    shard = ck / "model-00002-of-00002.safetensors"
    if not (_mount(["--bind", str(shard), str(shard)])):
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if not _mount(["-o", "remount,ro,bind", str(shard)]):
            pytest.skip("cannot remount read-only here")
        before = snapshot(ck)
        r = cli_runner("apply", patch, ck, "--in-place")
        assert_clean_error(r, CheckpointError.exit_code, "nothing was written")
        assert "Read-only file system" in r.stderr and shard.name in r.stderr
        assert snapshot(ck) == before
    finally:
        subprocess.run(["umount", str(shard)], capture_output=True)


def test_a_full_disk_is_found_before_any_write(world, tmp_path, cli_runner):
    ck, patch, _ = world
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = sum(p.stat().st_size for p in ck.rglob("*") if p.is_file())
    if not _mount(["-t", "tmpfs", "-o", f"size={size + 512 * 1024}", "tmpfs", str(mnt)]):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        small = mnt / "ck"
        shutil.copytree(ck, small)
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        before = snapshot(small)
        r = cli_runner("apply", patch, small, "--in-place")
        assert_clean_error(r, CheckpointError.exit_code)
        assert "free space" in r.stderr or "No space left" in r.stderr
        assert str(small) in r.stderr
        assert snapshot(small) == before
        r = cli_runner("apply", patch, small, "-o", mnt / "out")
        assert_clean_error(r, CheckpointError.exit_code, "No space left on device")
        assert str(mnt / "out") in r.stderr or ".out." in r.stderr  # the destination, not the source
        assert not (mnt / "out").exists() and not [p for p in mnt.iterdir() if p.name.startswith(".out.")]
        filler.unlink()
        r = cli_runner("apply", patch, small, "--in-place")
        assert r.exit_code == 0, r.output
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---- 6. stray copies of shards ---------------------------------------------------------------------------------
def test_a_killed_shard_copy_is_cleaned_and_never_copied_into_an_output(world, tmp_path, cli_runner):
    ck, patch, _ = world
    linked = tmp_path / "linked"
    r = cli_runner("apply", build_patch(ck, seed=1, tensors=(GATE,)).save(tmp_path / "g.safetensors"), ck, "-o", linked, "--link")
    assert r.exit_code == 0
    before = snapshot(linked)
    r = run_cli_subprocess(["apply", patch, linked, "--in-place"], {"PATCHKIT_CRASH_AT": "own-copy"})
    assert r.returncode == -9
    strays = [p for p in linked.iterdir() if p.name.endswith(".tmp")]
    assert strays, "the kill should have left the copy"
    out = tmp_path / "out"
    assert cli_runner("revert", tmp_path / "g.safetensors", linked, "-o", out).exit_code == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert cli_runner("status", linked).exit_code == 0
    assert not [p for p in linked.iterdir() if p.name.endswith(".tmp")]
    assert snapshot(linked) == before


# ---- 9. tampered state.json, one line each, nothing written -------------------------------------------------
def _edit_state(ck: Path, fn, checksum: bool = True):
    p = ck / ".patchkit" / "state.json"
    doc = json.loads(p.read_text())
    doc.pop("sha256")
    fn(doc)
    if checksum:
        doc["sha256"] = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    p.write_text(json.dumps(doc))


STATE_TAMPERS = {
    "empty-tensors": lambda d: d["applied"][0].update(tensors={}),
    "tensor-is-a-number": lambda d: d["applied"][0]["tensors"].update({GATE: 5}),
    "integer-id": lambda d: d["applied"][0].update(id=12345),
    "short-id": lambda d: d["applied"][0].update(id="abc"),
    "rows-negative": lambda d: d["applied"][0].update(rows=-1),
    "parents-not-list": lambda d: d["applied"][0].update(parents="x"),
    "applied-not-list": lambda d: d.update(applied={}),
    "duplicate": lambda d: d["applied"].append(d["applied"][0]),
    "future-version": lambda d: d.update(version=99),
    "deep-source": "DEEP",
}


@pytest.mark.parametrize("tamper", list(STATE_TAMPERS))
def test_a_tampered_state_is_refused_with_one_line(tamper, world, cli_runner, tmp_path):
    ck, patch, _ = world
    assert cli_runner("apply", patch, ck, "--in-place").exit_code == 0
    if tamper == "deep-source":  # nesting deeper than any parser's recursion
        p = ck / ".patchkit" / "state.json"
        p.write_text(p.read_text().replace('"source": ', '"source": ' + "[" * 100_000 + "]" * 100_000 + ', "x": ', 1))
    else:
        _edit_state(ck, STATE_TAMPERS[tamper])
    before = snapshot(ck)
    for args in _all_commands(ck, patch, tmp_path):
        assert_clean_error(cli_runner(*args), CheckpointError.exit_code, "state.json")
    assert snapshot(ck) == before


def test_an_edited_id_without_checksum_never_deletes_the_real_undo_record(world, cli_runner):
    ck, patch, _ = world
    assert cli_runner("apply", patch, ck, "--in-place").exit_code == 0
    undo = list((ck / ".patchkit" / "undo").iterdir())
    _edit_state(ck, lambda d: d["applied"][0].update(id="f" * 64), checksum=False)
    before = snapshot(ck)
    assert_clean_error(cli_runner("status", ck), CheckpointError.exit_code, "checksum")
    assert all(p.exists() for p in undo) and snapshot(ck) == before


@pytest.mark.parametrize("field,value", [("state_before", "[1, 2]"), ("state_before", "{}"), ("undo_ids", '{"a": 1}'),
                                         ("undo_ids", '["nothex"]'), ("undo_ids", json.dumps(["0" * 64]))])
def test_a_journal_with_malformed_metadata_is_refused_before_writing(field, value, world, cli_runner):
    ck, patch, _ = world
    assert cli_runner("apply", patch, ck, "--in-place").exit_code == 0
    meta = {"format": "patchkit.journal", "mode": "undo", "undo_ids": "[]", "state_before": st.State().to_bytes().decode()}
    meta[field] = value
    records.write_record(ck / ".patchkit" / "journal.safetensors", {}, meta)
    before = snapshot(ck)
    for args in (("status", ck), ("revert", patch, ck, "--in-place")):
        assert_clean_error(cli_runner(*args), CheckpointError.exit_code, "journal.safetensors")
    assert snapshot(ck) == before


def test_state_written_by_an_older_patchkit_still_reads(world, cli_runner):
    """Version 1 state files carry no checksum; they are checked field by field instead."""
    ck, patch, _ = world
    assert cli_runner("apply", patch, ck, "--in-place").exit_code == 0
    _edit_state(ck, lambda d: d.update(version=1), checksum=False)
    assert cli_runner("status", ck).exit_code == 0
    assert cli_runner("revert", patch, ck, "--in-place").exit_code == 0


def test_the_names_of_the_record_formats_are_stable(world, cli_runner):
    """The format names inside .patchkit/ are data on disk, not module paths: a checkpoint patched by
    an earlier patchkit must still read."""
    ck, patch, _ = world
    assert cli_runner("apply", patch, ck, "--in-place").exit_code == 0
    assert json.loads((ck / ".patchkit" / "state.json").read_text())["format"] == "patchkit.state"
    (undo,) = (ck / ".patchkit" / "undo").iterdir()
    assert stfile.read_header(undo).metadata["format"] == "patchkit.undo"
    jn.write_journal(ck, st.load_state(ck), undo_ids=[])
    assert stfile.read_header(ck / ".patchkit" / "journal.safetensors").metadata["format"] == "patchkit.journal"
