"""Records patchkit writes into a checkpoint's `.patchkit/` (undo records, the journal): safetensors
files of row indices and row bytes whose metadata carries a sha256 over their content, read back
with every row checked against the checkpoint before anything is written from them.

Row bytes need not be in memory all at once: a record is written from `Deferred` arrays (made in turn,
as the file is written; its header and checksum come first, from the shapes and hashes known
in advance), and read as `Stored` arrays (checked piece by piece, read again when needed)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CheckpointError
from .dtypes import STORAGE
from .stfile import atomic_write_bytes, data_bytes, encode_header, open_regular, read_header
from .tensorio import pread_exact

PIECE = 16 << 20  # bytes of a stored array read at once while its checksum is checked


class ChangedOnDisk(CheckpointError):
    """Bytes patchkit checked (rows of a shard, an undo record) are not the same when it comes back to
    write from them: another program wrote them in between."""


@dataclass(frozen=True)
class Deferred:
    """An array of a record that is made only when the record is written (`make()`, uint8 or int64 of
    `shape`), whose bytes' sha256 is known in advance (`sha256`), or None to hash them first."""

    shape: tuple[int, ...]
    sha256: str | None
    make: Callable[[], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Stored:
    """A uint8 array of a record left in its file: where it is, and the sha256 its bytes had when the
    record's checksum was checked. `read()` reads it again and checks it against that."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    sha256: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self) -> np.ndarray:
        data = np.frombuffer(pread_exact(self.path, self.offset, math.prod(self.shape)), dtype=np.uint8)
        if _sha256(data) != self.sha256:
            raise ChangedOnDisk(f"{self.path} changed on disk since patchkit checked it (another program "
                                "wrote it?)", path=self.path)
        return data.reshape(self.shape)


def canonical(doc: dict) -> bytes:
    """JSON with sorted keys and no spaces: what checksums of records and states are taken over."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def regular_file(p: Path) -> bool:
    """Whether `p` exists; it must be a regular file (not a symlink, FIFO, folder...)."""
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{p} is not a regular file: patchkit wrote it as one and does not follow "
                              "or read anything else there; move it away (nothing was written)", path=p)
    return True


def _record_digest(meta: dict[str, str], array_digests: list[str]) -> str:
    """sha256 over the canonical metadata (without `sha256`), then the sha256 of each array's bytes
    in name order: so the bytes of rows whose hash a plan already holds are not hashed twice."""
    h = hashlib.sha256(canonical({k: v for k, v in meta.items() if k != "sha256"}))
    for d in array_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def _sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


def write_record(path: Path, arrays: dict[str, tuple[str, np.ndarray | Deferred]], meta: dict[str, str],
                 fsync: bool = True) -> None:
    """A safetensors file whose metadata carries `sha256` over its other metadata and its arrays. A
    `Deferred` array is made when its turn comes in the file (the next one while this one is
    written), so that at most two are in memory at once; its sha256, when known in advance (the rows
    a plan has hashed), is not computed again."""
    digests = {}
    items, entries = [], []  # in name order, which is the order of the file
    for name in sorted(arrays):
        dtype, a = arrays[name]
        if isinstance(a, Deferred):
            if a.sha256 is not None:
                digests[name] = a.sha256
        else:
            a = np.ascontiguousarray(a, dtype=STORAGE[dtype])
        shape = tuple(a.shape)
        items.append((dtype, a))
        entries.append((name, dtype, shape, math.prod(shape) * STORAGE[dtype].itemsize))
    for item, entry in zip(items, entries):
        if entry[0] not in digests:
            digests[entry[0]] = _sha256(data_bytes(_made(item, entry)))
    meta = {**meta, "sha256": _record_digest(meta, [digests[e[0]] for e in entries])}

    def chunks():
        yield encode_header(entries, meta)
        # While one array is written, the next is made (read, checked) on a second thread: two in
        # memory at most. Leaving early (a failed write) waits for that thread before the file goes.
        with ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(_made, items[0], entries[0]) if items else None
            for i in range(len(items)):
                current = pending.result()
                pending = ahead.submit(_made, items[i + 1], entries[i + 1]) if i + 1 < len(items) else None
                yield data_bytes(current)
                del current

    atomic_write_bytes(path, chunks(), fsync=fsync)


def _made(item: tuple[str, np.ndarray | Deferred], entry: tuple) -> np.ndarray:
    dtype, a = item
    if isinstance(a, Deferred):
        a = np.ascontiguousarray(a.make(), dtype=STORAGE[dtype])
        if a.nbytes != entry[3]:
            raise ValueError(f"array {entry[0]} was made with {a.nbytes} bytes, its header says {entry[3]}")
    return a


def read_record(path: Path, kind: str, lazy: bool = False) -> tuple[dict[str, str], dict[str, np.ndarray | Stored]]:
    """(metadata, arrays) of a record written by `write_record`, its checksum checked. Raises
    CheckpointError naming the file; STFormatError when it is not a safetensors file at all. With
    `lazy`, the uint8 arrays (row bytes) are hashed piece by piece and returned as `Stored`."""
    if not regular_file(path):
        raise CheckpointError(f"{path} is missing", path=path)
    header = read_header(path)
    meta = header.metadata
    if meta.get("format") != kind:
        raise CheckpointError(f"{path} is not a {kind} record; move it away (nothing was written)", path=path)
    tensors = sorted(header.tensors.items())
    if lazy:
        blobs, digests = {}, {}
        with open_regular(path) as f:
            for name, i in tensors:
                if i.dtype == "U8":
                    h = hashlib.sha256()
                    for at in range(0, i.nbytes, PIECE):
                        h.update(pread_exact(path, i.offset + at, min(PIECE, i.nbytes - at), f))
                    digests[name] = h.hexdigest()
                else:
                    blobs[name] = (pread_exact(path, i.offset, i.nbytes, f), 0)
                    digests[name] = _sha256(blobs[name][0])
    else:
        start = 8 + header.size
        end = max((i.offset + i.nbytes for i in header.tensors.values()), default=start)
        data = pread_exact(path, start, end - start)
        view = memoryview(data)
        blobs = {name: (data, i.offset - start) for name, i in tensors}
        digests = {name: _sha256(view[i.offset - start : i.offset - start + i.nbytes]) for name, i in tensors}
    if "sha256" in meta and meta["sha256"] != _record_digest(meta, [digests[name] for name, _ in tensors]):
        raise CheckpointError(f"{path} does not match its checksum (damaged or edited); move it away "
                              "(nothing was written)", path=path)
    arrays = {}
    for name, i in header.tensors.items():
        if i.dtype not in ("I64", "U8"):
            raise CheckpointError(f"{path}: array {name} has dtype {i.dtype}", path=path)
        if name not in blobs:
            arrays[name] = Stored(path, i.offset, tuple(i.shape), digests[name])
            continue
        data, at = blobs[name]
        arrays[name] = np.frombuffer(data, dtype=np.int64 if i.dtype == "I64" else np.uint8,
                                     count=i.nbytes // (8 if i.dtype == "I64" else 1), offset=at).reshape(i.shape)
    return meta, arrays


def row_arrays(records: dict[str, tuple[np.ndarray, np.ndarray]], suffix: str) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (rows, raw bytes) as the arrays NAME::rows (I64) and NAME<suffix> (U8) of a record."""
    arrays = {}
    for name, (rows, raw) in records.items():
        arrays[f"{name}::rows"] = ("I64", rows)
        arrays[f"{name}{suffix}"] = ("U8", raw)
    return arrays


def rows_from_arrays(path: Path, arrays: dict[str, np.ndarray], suffix: str, ckpt) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """NAME::rows / NAME<suffix> arrays -> name -> (rows, raw bytes), each checked against the
    checkpoint `ckpt` (a `patchkit.core.checkpoint.Checkpoint`, or None to check the layout only): the
    tensor exists, rows are sorted, unique and in range, and the bytes are whole rows of it."""
    names = {k[: -len("::rows")] for k in arrays if k.endswith("::rows")}
    if set(arrays) != {f"{n}::rows" for n in names} | {f"{n}{suffix}" for n in names}:
        raise CheckpointError(f"{path} holds arrays a patchkit record does not have; move it away", path=path)
    out = {}
    for name in sorted(names):
        rows, raw = arrays[f"{name}::rows"], arrays[f"{name}{suffix}"]
        check_rows(path, name, rows, ckpt, raw)
        out[name] = (rows, raw)
    return out


def check_rows(path: Path, name: str, rows: np.ndarray, ckpt, raw: np.ndarray | None = None) -> None:
    bad = None
    if rows.ndim != 1 or (raw is not None and (raw.ndim != 2 or raw.shape[0] != len(rows))):
        bad = "its rows and bytes do not line up"
    elif len(rows) and (rows[0] < 0 or (np.diff(rows) <= 0).any()):
        bad = "its row indices are not sorted, unique and non-negative"
    elif ckpt is not None:
        info = ckpt.tensors.get(name)
        if info is None:
            bad = "the checkpoint has no such tensor"
        elif len(rows) and rows[-1] >= info.n_rows:
            bad = f"row {int(rows[-1])} is out of range (the tensor has {info.n_rows})"
        elif raw is not None and raw.shape[1] != info.row_bytes:
            bad = f"it keeps rows of {raw.shape[1]} bytes, the tensor's are {info.row_bytes}"
    if bad:
        raise CheckpointError(f"{path}: the record of tensor {name} is invalid: {bad}; move it away (nothing was written)",
                              path=path, tensor=name)
