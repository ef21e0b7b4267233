"""What a checkpoint remembers about the patches applied to it, and how writes to it stay safe.

Layout inside a checkpoint folder (absent when nothing is applied):

    .patchkit/state.json                 applied patches, in order
    .patchkit/undo/<patch id>.safetensors   the original bytes of the rows each patch touched
    .patchkit/journal.safetensors        present only while an in-place write is under way

An in-place write goes: undo record, then journal (what puts back the rows about to be written,
and the state before), then the bytes, then the new state, then the journal is removed.
Any command that finds a journal rolls the checkpoint back to the state before, byte for byte.
A lock (flock on the checkpoint folder itself, so no file is left behind) keeps writers apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CheckpointError, LockedError
from .stfile import STFormatError, atomic_write_bytes, read_header, read_tensor, serialize_chunks, write_rows

STATE_DIR = ".patchkit"
STATE_FILE = "state.json"
JOURNAL = "journal.safetensors"


@dataclass
class AppliedRecord:
    id: str
    source: str | None
    rows: int
    forced: bool
    parents: list[str]
    tensors: dict[str, dict]  # name -> {"rows": n, "after_sha256": ...}

    def to_json(self) -> dict:
        return {
            "id": self.id, "source": self.source, "rows": self.rows, "forced": self.forced,
            "parents": self.parents, "tensors": self.tensors,
        }

    @classmethod
    def from_json(cls, d: dict) -> "AppliedRecord":
        return cls(d["id"], d.get("source"), int(d["rows"]), bool(d.get("forced")), list(d.get("parents", [])), dict(d["tensors"]))


@dataclass
class State:
    applied: list[AppliedRecord] = field(default_factory=list)

    def find(self, patch_id: str) -> AppliedRecord | None:
        return next((r for r in self.applied if r.id == patch_id), None)

    def to_bytes(self) -> bytes:
        doc = {"format": "patchkit.state", "version": 1, "applied": [r.to_json() for r in self.applied]}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def state_dir(ckpt_path: Path) -> Path:
    return Path(ckpt_path) / STATE_DIR


def load_state(ckpt_path: Path) -> State:
    p = state_dir(ckpt_path) / STATE_FILE
    if not p.exists():
        return State()
    try:
        doc = json.loads(p.read_text())
        return State([AppliedRecord.from_json(r) for r in doc["applied"]])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{p} is damaged; move it away to treat the checkpoint as unpatched") from None


def save_state(ckpt_path: Path, state: State, fsync: bool = True) -> None:
    d = state_dir(ckpt_path)
    if state.applied:
        d.mkdir(exist_ok=True)
        atomic_write_bytes(d / STATE_FILE, state.to_bytes(), fsync=fsync)
    elif (d / STATE_FILE).exists():
        os.unlink(d / STATE_FILE)


# ---- undo records ------------------------------------------------------------------------------
def undo_path(ckpt_path: Path, patch_id: str) -> Path:
    return state_dir(ckpt_path) / "undo" / f"{patch_id}.safetensors"


def write_undo(ckpt_path: Path, patch_id: str, originals: dict[str, tuple[np.ndarray, np.ndarray]], fsync: bool = True) -> Path:
    """originals: tensor name -> (rows int64, raw original bytes uint8 [n, row_bytes])."""
    p = undo_path(ckpt_path, patch_id)
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "patchkit.undo", "patch_id": patch_id}
    atomic_write_bytes(p, serialize_chunks(_row_arrays(originals, "::orig"), meta), fsync=fsync)
    return p


def read_undo(ckpt_path: Path, patch_id: str) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    p = undo_path(ckpt_path, patch_id)
    if not p.exists():
        return None
    try:
        return _read_row_arrays(p, read_header(p), "::orig")
    except (STFormatError, OSError, KeyError) as e:
        raise CheckpointError(f"undo record {p} is damaged ({e})") from None


def undo_rows(ckpt_path: Path, patch_id: str) -> dict[str, np.ndarray] | None:
    """The rows each tensor's undo record covers, without reading the bytes it keeps."""
    p = undo_path(ckpt_path, patch_id)
    if not p.exists():
        return None
    try:
        header = read_header(p)
        with open(p, "rb") as f:
            return {k[: -len("::rows")]: read_tensor(i, f) for k, i in header.tensors.items() if k.endswith("::rows")}
    except (STFormatError, OSError) as e:
        raise CheckpointError(f"undo record {p} is damaged ({e})") from None


def _row_arrays(records: dict[str, tuple[np.ndarray, np.ndarray]], suffix: str) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (rows, raw bytes) as the arrays NAME::rows (I64) and NAME<suffix> (U8) of a safetensors file."""
    arrays = {}
    for name, (rows, raw) in records.items():
        arrays[f"{name}::rows"] = ("I64", rows)
        arrays[f"{name}{suffix}"] = ("U8", raw)
    return arrays


def _read_row_arrays(path: Path, header, suffix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """NAME::rows and NAME<suffix> arrays of a safetensors file -> name -> (rows, raw bytes)."""
    with open(path, "rb") as f:
        arrays = {n: read_tensor(i, f) for n, i in header.tensors.items()}
    return {
        key[: -len("::rows")]: (arrays[key], arrays[key[: -len("::rows")] + suffix])
        for key in arrays if key.endswith("::rows")
    }


def collect_garbage(ckpt_path: Path) -> None:
    """Remove undo records no applied patch refers to, and the state folder when it is empty."""
    d = state_dir(ckpt_path)
    if not d.exists():
        return
    keep = {r.id for r in load_state(ckpt_path).applied}
    undo = d / "undo"
    if undo.exists():
        for p in undo.iterdir():
            if p.name.endswith(".safetensors") and p.name[: -len(".safetensors")] in keep:
                continue
            p.unlink()
        if not any(undo.iterdir()):
            undo.rmdir()
    for p in d.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink()
    if not any(d.iterdir()):
        d.rmdir()


# ---- lock ----------------------------------------------------------------------------------------
@contextmanager
def locked(ckpt_path: Path, exclusive: bool = True):
    """Hold a lock on the checkpoint folder; fail at once when another process holds it."""
    fd = os.open(ckpt_path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"another patchkit process is using {ckpt_path}; try again when it has finished") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# ---- journal -------------------------------------------------------------------------------------
# An in-place write is journaled in one of two ways, both no bigger than the rows written:
# - "undo": apply. The undo records of the patches (written whole before the journal) hold the bytes
#   to put back; recovery writes them back, newest patch first, and restores the state before.
# - "rows": revert. The journal holds, per tensor, the rows about to be overwritten and their current
#   bytes; recovery writes them back and restores the state before.
def write_journal(ckpt_path: Path, state_before: State, *, undo_ids: list[str] | None = None,
                  rows: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, fsync: bool = True) -> None:
    """undo_ids: patches whose undo records roll the write back; or rows: tensor name -> (row
    indices, their current bytes uint8 [n, row_bytes])."""
    arrays = _row_arrays(rows or {}, "::bytes")
    meta = {
        "format": "patchkit.journal",
        "mode": "undo" if undo_ids is not None else "rows",
        "undo_ids": json.dumps(undo_ids or []),
        "state_before": state_before.to_bytes().decode(),
    }
    d = state_dir(ckpt_path)
    d.mkdir(exist_ok=True)
    atomic_write_bytes(d / JOURNAL, serialize_chunks(arrays, meta), fsync=fsync)
    if fsync:
        _fsync_dir(d)


def clear_journal(ckpt_path: Path, fsync: bool = True) -> None:
    p = state_dir(ckpt_path) / JOURNAL
    if p.exists():
        p.unlink()
        if fsync:
            _fsync_dir(p.parent)


def recover(ckpt_path: Path) -> bool:
    """Roll back an interrupted in-place write, if any. Returns True when it did. Needs the lock."""
    p = state_dir(ckpt_path) / JOURNAL
    if not p.exists():
        collect_garbage(ckpt_path)
        return False
    try:
        header = read_header(p)
        mode = header.metadata["mode"]
        undo_ids = json.loads(header.metadata.get("undo_ids", "[]"))
        before = json.loads(header.metadata["state_before"])
    except (STFormatError, KeyError, json.JSONDecodeError, OSError):
        # The journal is written whole and renamed into place: a damaged one was never committed,
        # so no weight byte was written after it. Drop it.
        p.unlink()
        collect_garbage(ckpt_path)
        return True
    if mode not in ("undo", "rows"):
        raise CheckpointError(f"{p} is an unfinished write of a kind this patchkit does not know ({mode}); "
                              "finish it with the patchkit version that started it")
    from .checkpoint import Checkpoint

    ck = Checkpoint(ckpt_path)
    if mode == "undo":
        records = [read_undo(ckpt_path, pid) or {} for pid in reversed(undo_ids)]
    else:
        records = [_read_row_arrays(p, header, "::bytes")]
    for record in records:
        for name, (rows, raw) in record.items():
            info = ck.info(name)
            with open(info.file, "r+b") as f:
                write_rows(info, rows, raw, f)
                f.flush()
                os.fsync(f.fileno())
    state = State([AppliedRecord.from_json(r) for r in before["applied"]])
    save_state(ckpt_path, state)
    clear_journal(ckpt_path)
    collect_garbage(ckpt_path)
    return True


def has_journal(ckpt_path: Path) -> bool:
    return (state_dir(ckpt_path) / JOURNAL).exists()


def has_leftovers(ckpt_path: Path) -> bool:
    """Files an interrupted write left without a journal: undo records no applied patch refers to
    (a kill after the undo record, before the journal), temporary files, an empty state folder."""
    d = state_dir(ckpt_path)
    if not d.is_dir():
        return False
    keep = {r.id for r in load_state(ckpt_path).applied}
    undo = d / "undo"
    if undo.is_dir() and any(
        not (p.name.endswith(".safetensors") and p.name[: -len(".safetensors")] in keep) for p in undo.iterdir()
    ):
        return True
    return any(p.name.startswith(".") and p.name.endswith(".tmp") for p in d.iterdir()) or not any(d.iterdir())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crashpoint(name: str) -> None:
    """Fault injection for the crash tests: PATCHKIT_CRASH_AT=name kills the process here."""
    if os.environ.get("PATCHKIT_CRASH_AT") == name:
        os.kill(os.getpid(), 9)


def copy_state(src: Path, dst: Path) -> None:
    """Carry the applied-patch records (not a journal) from one checkpoint folder to another."""
    s = state_dir(src)
    if not (s / STATE_FILE).exists():
        return
    d = state_dir(dst)
    d.mkdir(exist_ok=True)
    shutil.copy2(s / STATE_FILE, d / STATE_FILE)
    if (s / "undo").exists():
        shutil.copytree(s / "undo", d / "undo", dirs_exist_ok=True)
