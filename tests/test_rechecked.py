"""Rows read again when they are written: checked against the plan, and records byte for byte as before.

A plan keeps hashes, not row bytes; the writers read each tensor's rows again (from the shard in
place, from the copy with -o), check them against the plan's hashes and make the new rows then.
Rows that changed in between fail the command with a typed error and leave nothing written (rolled
back when the journal was already in place). The undo records and the journal, written tensor by
tensor, are the very bytes of a safetensors file serialised whole from the rows in memory.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from conftest import build_patch
from helpers import snapshot
from patchkit.core import journal as jn
from patchkit.core import ops, stfile, writes
from patchkit.core import state as st
from patchkit.core.checkpoint import Checkpoint
from patchkit.core.patchfile import Patch
from patchkit.errors import CheckpointError


def reference_record(arrays: dict, meta: dict) -> bytes:
    """A record as patchkit has always written it: the arrays in memory, serialised whole, with
    sha256 over the canonical metadata then the sha256 of each array's bytes in name order."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        h.update(hashlib.sha256(np.ascontiguousarray(arrays[name][1]).tobytes()).digest())
    return stfile.serialize(arrays, {**meta, "sha256": h.hexdigest()})


def row_arrays(rows_by_tensor: dict, ck: Checkpoint, suffix: str) -> dict:
    out = {}
    for name, rows in rows_by_tensor.items():
        out[f"{name}::rows"] = ("I64", rows)
        out[f"{name}{suffix}"] = ("U8", ck.read_rows(name, rows))
    return out


@pytest.mark.parametrize("target", ["in-place", "output"])
def test_the_streamed_undo_record_is_the_record_serialised_whole(target, copy_ckpt, tmp_path):
    ck = copy_ckpt("bf16", True)
    p1 = build_patch(ck, seed=30, rows_per=7)
    mid = tmp_path / "mid"
    ops.apply(p1, ck, mid)
    p2 = build_patch(mid, seed=31, rows_per=9)  # on top of p1, on the same tensors: rows overlap
    assert any(np.intersect1d(p1.edits[n].rows, p2.edits[n].rows).size for n in p1.edits)
    # p1's record keeps the base's rows, p2's the rows as p1 left them
    want = {}
    for patch, source in ((p1, Checkpoint(ck)), (p2, Checkpoint(mid))):
        arrays = row_arrays({n: e.rows for n, e in patch.edits.items()}, source, "::orig")
        want[patch.id] = reference_record(arrays, {"format": "patchkit.undo", "patch_id": patch.id})
    out = ck if target == "in-place" else tmp_path / "out"
    if target == "in-place":
        ops.apply([p1, p2], ck, in_place=True)
    else:
        ops.apply([p1, p2], ck, out)
    assert {pid: st.undo_path(out, pid).read_bytes() for pid in want} == want


def test_the_streamed_journal_of_a_revert_is_the_journal_serialised_whole(copy_ckpt, monkeypatch):
    ck = copy_ckpt("fp16", True)
    patch = build_patch(ck, seed=32, rows_per=6)
    ops.apply(patch, ck, in_place=True)
    # the journal keeps the rows about to be written as they are now, and the state before
    arrays = row_arrays({n: e.rows for n, e in patch.edits.items()}, Checkpoint(ck), "::bytes")
    meta = {"format": "patchkit.journal", "mode": "rows", "undo_ids": "[]",
            "state_before": st.load_state(ck).to_bytes().decode()}
    kept = {}
    monkeypatch.setattr(jn, "clear_journal", lambda path, fsync=True: kept.setdefault(
        "journal", (st.state_dir(path) / jn.JOURNAL).read_bytes()))
    ops.revert(patch, ck, in_place=True)
    assert kept["journal"] == reference_record(arrays, meta)


def _touch_row_keeping_identity(ck, name: str, row: int) -> None:
    """Flip a byte of one row of a shard, keeping its size and mtime: the shard-identity check
    cannot see it, only the rows' hashes can."""
    info = Checkpoint(ck).info(name)
    st_ = os.stat(info.file)
    with open(info.file, "r+b") as f:
        at = info.offset + row * info.row_bytes
        b = os.pread(f.fileno(), 1, at)
        os.pwrite(f.fileno(), bytes([b[0] ^ 0x01]), at)
    os.utime(info.file, ns=(st_.st_atime_ns, st_.st_mtime_ns))


@pytest.mark.parametrize("target", ["in-place", "output"])
def test_rows_changed_after_planning_are_refused_and_nothing_is_written(target, copy_ckpt, tmp_path):
    ck = copy_ckpt("bf16", True)
    patch = build_patch(ck, seed=33)
    c = Checkpoint(ck)
    plan = ops.plan_apply([patch], ck, _ckpt=c)
    name = sorted(patch.edits)[-1]
    _touch_row_keeping_identity(ck, name, int(patch.edits[name].rows[0]))
    assert all(c.unchanged(c.path / f) for f in c.files)  # the identity check passes
    before = snapshot(ck)
    with pytest.raises(CheckpointError, match=f"changed on disk since patchkit read it: the rows of tensor {name}") as ei:
        if target == "in-place":
            writes.write_in_place(plan)
        else:
            writes.write_output(plan, tmp_path / "out", False, False)
    assert ("nothing was written" if target == "in-place" else "was not written") in str(ei.value)
    assert ei.value.tensor == name
    assert snapshot(ck) == before and not (tmp_path / "out").exists() and not (ck / ".patchkit").exists()


@pytest.mark.parametrize("action", ["apply", "revert"])
def test_rows_changed_under_the_journal_are_refused_and_rolled_back(action, copy_ckpt, monkeypatch, tmp_path):
    """Rows that change after the journal is written (after the undo record read them) are found
    before they are written over; what was written is rolled back from the journal at once."""
    ck = copy_ckpt("bf16", True)
    patch = build_patch(ck, seed=34).save(tmp_path / "p.safetensors")
    if action == "revert":
        ops.apply(patch, ck, in_place=True)
    edits = Patch.load(patch).edits
    name = sorted(edits)[-1]  # written last: the others are written, then rolled back
    before = snapshot(ck)
    real = jn.write_journal

    def journal_then_tamper(*a, **k):
        real(*a, **k)
        _touch_row_keeping_identity(ck, name, int(edits[name].rows[0]))

    monkeypatch.setattr(jn, "write_journal", journal_then_tamper)
    monkeypatch.setenv("PATCHKIT_THREADS", "1")
    with pytest.raises(CheckpointError, match="the write was rolled back") as ei:
        getattr(ops, action)(patch, ck, in_place=True)
    assert f"the rows of tensor {name}" in str(ei.value)
    assert snapshot(ck) == before  # the tampered row too: it is one the journal puts back
    assert not jn.has_journal(ck)


def test_an_undo_record_changed_after_its_check_is_refused(copy_ckpt, monkeypatch, tmp_path):
    ck = copy_ckpt("bf16", False)
    patch = build_patch(ck, seed=35).save(tmp_path / "p.safetensors")
    ops.apply(patch, ck, in_place=True)
    before = snapshot(ck)
    path = st.undo_path(ck, Patch.load(patch).id)
    real = jn.write_journal

    name = sorted(Patch.load(patch).edits)[-1]
    at = stfile.read_header(path).tensors[f"{name}::orig"].offset  # the original bytes it keeps

    def journal_then_tamper(*a, **k):
        real(*a, **k)
        data = bytearray(path.read_bytes())
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))

    monkeypatch.setattr(jn, "write_journal", journal_then_tamper)
    with pytest.raises(CheckpointError, match=f"{path} changed on disk since patchkit checked it"):
        ops.revert(patch, ck, in_place=True)
    after = snapshot(ck)
    undo = str(path.relative_to(ck))
    assert {k: v for k, v in after.items() if k != undo} == {k: v for k, v in before.items() if k != undo}
