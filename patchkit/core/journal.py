"""How in-place writes to a checkpoint stay safe: the lock, the journal, and rolling back.

An in-place write goes: undo record, then journal (what puts back the rows about to be written,
and the state before), then the bytes, then the new state, then the journal is removed. Any
command that finds a journal rolls the checkpoint back to the state before, byte for byte, after
checking the journal (its checksum, and every row it would write against the checkpoint).
A lock (flock on the checkpoint folder itself, so no file is left behind) keeps writers apart;
readers take it shared.

A journal is written whole and renamed into place, so one that is not even a safetensors file was
never committed (no weight byte was written after it) and is dropped; one that is readable but
fails its checks is refused, and nothing is written.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, LockedError
from .records import Deferred, Stored, read_record, regular_file, row_arrays, rows_from_arrays, write_record
from .state import ID, State, checked_state_dir, collect_garbage, load_state, read_undo, save_state, state_dir
from .stfile import STFormatError
from .tensorio import write_rows

JOURNAL = "journal.safetensors"


# ---- lock ----------------------------------------------------------------------------------------
@contextmanager
def locked(ckpt_path: Path, exclusive: bool = True, wait: float = 0.0):
    """Hold a lock on the checkpoint folder; wait up to `wait` seconds for another process to let
    go, then fail naming it."""
    fd = os.open(ckpt_path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pid = lock_holder(fd)
                    who = f" (pid {pid})" if pid else ""
                    raise LockedError(f"another patchkit process{who} is writing {ckpt_path}; "
                                      "try again when it has finished", pid=pid) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def lock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file behind `fd`, from /proc/locks where there is one."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == key and parts[4].isdigit() and int(parts[4]) != os.getpid():
                    return int(parts[4])
    except OSError:
        pass
    return None


# ---- journal -------------------------------------------------------------------------------------
# An in-place write is journaled in one of two ways, both no bigger than the rows written:
# - "undo": apply. The undo records of the patches (written whole before the journal) hold the bytes
#   to put back; recovery writes them back, newest patch first, and restores the state before.
# - "rows": revert. The journal holds, per tensor, the rows about to be overwritten and their current
#   bytes; recovery writes them back and restores the state before.
def write_journal(ckpt_path: Path, state_before: State, *, undo_ids: list[str] | None = None,
                  rows: dict[str, tuple[np.ndarray, np.ndarray | Deferred]] | None = None, fsync: bool = True) -> None:
    """undo_ids: patches whose undo records roll the write back; or rows: tensor name -> (row
    indices, their current bytes uint8 [n, row_bytes], or a `records.Deferred` that reads them when
    the journal is written, so that one tensor's rows are in memory at a time)."""
    meta = {
        "format": "patchkit.journal",
        "mode": "undo" if undo_ids is not None else "rows",
        "undo_ids": json.dumps(undo_ids or []),
        "state_before": state_before.to_bytes().decode(),
    }
    d = checked_state_dir(ckpt_path, create=True)
    write_record(d / JOURNAL, row_arrays(rows or {}, "::bytes"), meta, fsync=fsync)
    if fsync:
        fsync_dir(d)


def clear_journal(ckpt_path: Path, fsync: bool = True) -> None:
    p = state_dir(ckpt_path) / JOURNAL
    if checked_state_dir(ckpt_path) is not None and regular_file(p):
        p.unlink()
        if fsync:
            fsync_dir(p.parent)


def has_journal(ckpt_path: Path) -> bool:
    return checked_state_dir(ckpt_path) is not None and regular_file(state_dir(ckpt_path) / JOURNAL)


def _invalid(p: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{p} is invalid: {why}; nothing was written. If no patchkit write was "
                           "interrupted here, move it away", path=p)


def rollback_plan(ckpt_path: Path, ckpt) -> tuple[State, list[dict]] | None:
    """Check the journal and return (the state before, the row records to write back, in order, their
    bytes left in their files as `records.Stored`); None when the journal was never committed.
    Raises when it cannot be trusted."""
    p = state_dir(ckpt_path) / JOURNAL
    try:
        meta, arrays = read_record(p, "patchkit.journal", lazy=True)
    except STFormatError:
        return None
    mode = meta.get("mode")
    if mode not in ("undo", "rows"):
        raise CheckpointError(f"{p} is an unfinished write of a kind this patchkit does not know ({mode}); "
                              "finish it with the patchkit version that started it", path=p)
    try:
        before = State.from_bytes(meta["state_before"].encode())
        undo_ids = json.loads(meta.get("undo_ids", "[]"))
    except (KeyError, ValueError, RecursionError) as e:
        raise _invalid(p, f"its state before ({e})") from None
    if not isinstance(undo_ids, list) or not all(isinstance(i, str) and ID.fullmatch(i) for i in undo_ids):
        raise _invalid(p, "undo_ids is not a list of patch ids")
    if mode == "rows":
        return before, [rows_from_arrays(p, arrays, "::bytes", ckpt)]
    if arrays:
        raise _invalid(p, "an undo journal holds rows")
    records = []
    for pid in reversed(undo_ids):
        rec = read_undo(ckpt_path, pid, ckpt, lazy=True)
        if rec is None:
            raise _invalid(p, f"the undo record of patch {pid[:12]} it names is missing")
        records.append(rec)
    return before, records


def write_back(ckpt, records: list[dict], fsync: bool = True) -> None:
    """Write checked row records into the checkpoint's files, in order, a tensor's rows at a time
    (read again from the record, and checked against its checksum, just before they are written)."""
    for record in records:
        for name, (rows, raw) in record.items():
            info = ckpt.info(name)
            with open(info.file, "r+b") as f:
                write_rows(info, rows, raw.read() if isinstance(raw, Stored) else raw, f)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())


def recover(ckpt_path: Path) -> bool:
    """Roll back an interrupted in-place write, if any. Returns True when it did. Needs the lock."""
    if not has_journal(ckpt_path):
        collect_garbage(ckpt_path)
        return False
    from .checkpoint import Checkpoint

    ck = Checkpoint(ckpt_path)
    plan = rollback_plan(ckpt_path, ck)
    p = state_dir(ckpt_path) / JOURNAL
    if plan is not None:
        before, records = plan
        try:
            write_back(ck, records)
            if load_state(ckpt_path).to_bytes() != before.to_bytes():
                save_state(ckpt_path, before)
        except OSError as e:
            raise CheckpointError(
                f"rolling back the interrupted write of {ckpt_path} failed ({e.strerror or e}: {e.filename or p}); "
                f"the journal {p} still holds what puts it back: fix the cause, then run `patchkit status {ckpt_path}`",
                path=ckpt_path) from None
    clear_journal(ckpt_path)
    collect_garbage(ckpt_path)
    return True


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
