"""What a checkpoint remembers about the patches applied to it: the state file and the undo records.

Layout inside a checkpoint folder (absent when nothing is applied):

    .patchkit/state.json                    applied patches, in order
    .patchkit/undo/<patch id>.safetensors   the original bytes of the rows each patch touched
    .patchkit/journal.safetensors           present only while an in-place write is under way
                                            (see `patchkit.core.journal`)

Everything here is read as untrusted input, with the strictness of a patch file: the folder and
its files must be a plain folder and regular files inside the checkpoint (never symlinks, FIFOs or
anything that leads out); every record carries a sha256 over its content, checked on reading; ids,
row indices, shapes and dtypes are checked against the checkpoint before a single byte is written
from them. Deletion is only of names patchkit itself makes, matched exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .fsutil import is_own_temp
from .records import canonical, check_rows, read_record, regular_file, row_arrays, rows_from_arrays, write_record
from .stfile import STFormatError, atomic_write_bytes, open_regular, read_header
from .tensorio import read_tensor

STATE_DIR = ".patchkit"
STATE_FILE = "state.json"
UNDO_DIR = "undo"
MAX_STATE_BYTES = 64 * 1024 * 1024
ID = re.compile(r"[0-9a-f]{64}")


def _is_id(x) -> bool:
    return isinstance(x, str) and ID.fullmatch(x) is not None


# ---- the folder ---------------------------------------------------------------------------------
def state_dir(ckpt_path: Path) -> Path:
    return Path(ckpt_path) / STATE_DIR


def _plain_dir(p: Path, create: bool = False) -> bool:
    """Whether the folder `p` exists; it must be a real folder, not a symlink or a file. With `create`
    a missing one is made."""
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        if not create:
            return False
        p.mkdir()
        return True
    if not stat.S_ISDIR(mode):
        what = "a symlink" if stat.S_ISLNK(mode) else "not a folder"
        raise CheckpointError(
            f"{p} is {what}: patchkit keeps its records in a plain folder inside the checkpoint and never "
            "follows one out; move it away (nothing was written)", path=p)
    return True


def checked_state_dir(ckpt_path: Path, create: bool = False) -> Path | None:
    """`.patchkit/` (and its `undo/`) after checking they are plain folders; None when absent."""
    d = state_dir(ckpt_path)
    if not _plain_dir(d, create):
        return None
    _plain_dir(d / UNDO_DIR)
    return d


def read_small(p: Path, limit: int = MAX_STATE_BYTES) -> bytes:
    """The bytes of the regular file `p` (never through a symlink, never blocking on a FIFO)."""
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{p} is not a regular file; move it away (nothing was written)", path=p)
        if st.st_size > limit:
            raise CheckpointError(f"{p} is {st.st_size} bytes, more than patchkit ever writes there; move it away", path=p)
        return os.pread(fd, st.st_size, 0)
    finally:
        os.close(fd)


# ---- state.json -----------------------------------------------------------------------------------
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
    def from_json(cls, d) -> "AppliedRecord":
        """A record as written by `to_json`; ValueError naming the field for anything else."""
        if not isinstance(d, dict):
            raise ValueError("an applied record is not an object")
        if not _is_id(d.get("id")):
            raise ValueError("an applied record's id is not a patch id")
        src, rows, forced, parents, tensors = (d.get(k) for k in ("source", "rows", "forced", "parents", "tensors"))
        if src is not None and not isinstance(src, str):
            raise ValueError("source is not a string")
        if not _count(rows):
            raise ValueError("rows is not a count")
        if not isinstance(forced, bool):
            raise ValueError("forced is not true or false")
        if not isinstance(parents, list) or not all(_is_id(p) for p in parents):
            raise ValueError("parents is not a list of patch ids")
        if not isinstance(tensors, dict) or not tensors:
            raise ValueError("tensors is not a non-empty object")
        for name, t in tensors.items():
            if not (isinstance(t, dict) and _count(t.get("rows")) and _is_id(t.get("after_sha256"))):
                raise ValueError(f"the entry of tensor {name} is malformed")
        return cls(d["id"], src, rows, forced, list(parents), {n: dict(t) for n, t in tensors.items()})


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62


@dataclass
class State:
    applied: list[AppliedRecord] = field(default_factory=list)

    def find(self, patch_id: str) -> AppliedRecord | None:
        return next((r for r in self.applied if r.id == patch_id), None)

    def to_bytes(self) -> bytes:
        doc = {"format": "patchkit.state", "version": 2, "applied": [r.to_json() for r in self.applied]}
        doc["sha256"] = hashlib.sha256(canonical(doc)).hexdigest()
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "State":
        """Parse and check a state document; ValueError saying what is wrong. Version 1 documents
        (written before records carried a checksum) are read without one."""
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, RecursionError, ValueError) as e:
            raise ValueError(f"not JSON ({e.__class__.__name__})") from None
        if not isinstance(doc, dict) or doc.get("format") != "patchkit.state":
            raise ValueError("not a patchkit state document")
        version = doc.get("version")
        if version == 2:
            found = doc.pop("sha256", None)
            if found != hashlib.sha256(canonical(doc)).hexdigest():
                raise ValueError("its checksum does not match its content (edited by hand?)")
        elif version != 1:
            raise ValueError(f"state version {version!r} is not one this patchkit reads")
        applied = doc.get("applied")
        if not isinstance(applied, list):
            raise ValueError("applied is not a list")
        records = [AppliedRecord.from_json(r) for r in applied]
        if len({r.id for r in records}) != len(records):
            raise ValueError("a patch is listed twice")
        return cls(records)


def load_state(ckpt_path: Path) -> State:
    d = checked_state_dir(ckpt_path)
    p = state_dir(ckpt_path) / STATE_FILE
    if d is None or not regular_file(p):
        return State()
    try:
        return State.from_bytes(read_small(p))
    except ValueError as e:
        raise CheckpointError(f"{p} is damaged: {e}; move it away to treat the checkpoint as unpatched "
                              "(nothing was written)", path=p) from None


def save_state(ckpt_path: Path, state: State, fsync: bool = True) -> None:
    p = state_dir(ckpt_path) / STATE_FILE
    if state.applied:
        checked_state_dir(ckpt_path, create=True)
        atomic_write_bytes(p, state.to_bytes(), fsync=fsync)
    elif checked_state_dir(ckpt_path) is not None and regular_file(p):
        os.unlink(p)


# ---- undo records ------------------------------------------------------------------------------------
def undo_path(ckpt_path: Path, patch_id: str) -> Path:
    if not _is_id(patch_id):
        raise CheckpointError(f"{patch_id!r} is not a patch id")
    return state_dir(ckpt_path) / UNDO_DIR / f"{patch_id}.safetensors"


def write_undo(ckpt_path: Path, patch_id: str, originals: dict[str, tuple[np.ndarray, np.ndarray]], fsync: bool = True) -> Path:
    """originals: tensor name -> (rows int64, raw original bytes uint8 [n, row_bytes], or a
    `records.Deferred` that makes them when their turn comes in the file, with their sha256 when the
    plan has it)."""
    p = undo_path(ckpt_path, patch_id)
    checked_state_dir(ckpt_path, create=True)
    _plain_dir(p.parent, create=True)
    write_record(p, row_arrays(originals, "::orig"), {"format": "patchkit.undo", "patch_id": patch_id}, fsync=fsync)
    return p


def read_undo(ckpt_path: Path, patch_id: str, ckpt=None, lazy: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The undo record of a patch, checked (checksum, and against `ckpt` when given); None if absent.
    With `lazy` the rows' bytes stay in the file (`records.Stored`, read again and checked when used)."""
    p = undo_path(ckpt_path, patch_id)
    if checked_state_dir(ckpt_path) is None or not regular_file(p):
        return None
    try:
        meta, arrays = read_record(p, "patchkit.undo", lazy=lazy)
    except (STFormatError, OSError) as e:
        raise CheckpointError(f"undo record {p} is damaged ({e}); move it away (nothing was written)", path=p) from None
    if meta.get("patch_id") != patch_id:
        raise CheckpointError(f"undo record {p} belongs to another patch; move it away (nothing was written)", path=p)
    return rows_from_arrays(p, arrays, "::orig", ckpt)


def undo_rows(ckpt_path: Path, patch_id: str, ckpt=None) -> dict[str, np.ndarray] | None:
    """The rows each tensor's undo record covers, without reading the bytes it keeps (so without the
    checksum: nothing is written from this), checked against `ckpt` when given."""
    p = undo_path(ckpt_path, patch_id)
    if checked_state_dir(ckpt_path) is None or not regular_file(p):
        return None
    try:
        header = read_header(p)
        with open_regular(p) as f:
            out = {k[: -len("::rows")]: read_tensor(i, f) for k, i in header.tensors.items()
                   if k.endswith("::rows") and i.dtype == "I64"}
    except (STFormatError, OSError) as e:
        raise CheckpointError(f"undo record {p} is damaged ({e}); move it away", path=p) from None
    for name, rows in out.items():
        check_rows(p, name, rows, ckpt)
    return out


# ---- garbage -------------------------------------------------------------------------------------------
def garbage(ckpt_path: Path, keep: set[str] | None = None) -> list[Path]:
    """What an interrupted write left that no applied patch refers to: undo records of other patches
    and patchkit's own temporary files, matched by exact name. Anything else is left alone."""
    d = checked_state_dir(ckpt_path)
    if d is None:
        return []
    if keep is None:
        keep = {r.id for r in load_state(ckpt_path).applied}
    out = []
    undo = d / UNDO_DIR
    if undo.exists():
        for p in undo.iterdir():
            pid = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else None
            if (pid is not None and _is_id(pid) and pid not in keep) or (
                    _is_id(p.name[1:65]) and is_own_temp(p.name, f"{p.name[1:65]}.safetensors")):
                out.append(p)
    for p in d.iterdir():
        if is_own_temp(p.name, STATE_FILE) or is_own_temp(p.name, "journal.safetensors"):
            out.append(p)
    return out


def collect_garbage(ckpt_path: Path) -> None:
    """Remove `garbage`, then `undo/` and `.patchkit/` when they are empty."""
    for p in garbage(ckpt_path):
        mode = os.lstat(p).st_mode
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            os.unlink(p)  # a symlink itself, never what it points at
    d = state_dir(ckpt_path)
    for folder in (d / UNDO_DIR, d):
        try:
            if _plain_dir(folder) and not any(folder.iterdir()):
                folder.rmdir()
        except OSError:
            pass


def has_leftovers(ckpt_path: Path) -> bool:
    """Files an interrupted write left without a journal, or an empty state folder."""
    d = checked_state_dir(ckpt_path)
    if d is None:
        return False
    return bool(garbage(ckpt_path)) or not any(d.iterdir()) or (
        (d / UNDO_DIR).exists() and not any((d / UNDO_DIR).iterdir()))


def crashpoint(name: str) -> None:
    """Fault injection for the crash tests: PATCHKIT_CRASH_AT=name kills the process here."""
    if os.environ.get("PATCHKIT_CRASH_AT") == name:
        os.kill(os.getpid(), 9)


def copy_state(src: Path, dst: Path) -> None:
    """Carry the applied-patch records (not a journal) from one checkpoint folder to another."""
    state = load_state(src)
    if not state.applied:
        return
    checked_state_dir(dst, create=True)
    (state_dir(dst) / UNDO_DIR).mkdir(exist_ok=True)
    atomic_write_bytes(state_dir(dst) / STATE_FILE, state.to_bytes(), fsync=False)
    for rec in state.applied:
        p = undo_path(src, rec.id)
        if regular_file(p):
            shutil.copyfile(p, undo_path(dst, rec.id))
