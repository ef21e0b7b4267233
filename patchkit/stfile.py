"""The safetensors container, read and written byte by byte with the standard library and numpy.

patchkit reads headers without loading tensors, reads and writes single rows in place, and writes
small files deterministically (header keys sorted, no timestamps, header padded with spaces to a
multiple of 8 bytes as the safetensors library does), so the same content always gives the same
bytes. Files written here open with the `safetensors` library itself.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .dtypes import STORAGE, itemsize
from .fsutil import umask

MAX_HEADER = 100 * 1024 * 1024


class STFormatError(ValueError):
    """The bytes are not a valid safetensors file; callers wrap it in their own typed error."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the tensor's data in `file`
    nbytes: int

    @property
    def n_rows(self) -> int:
        """Rows along the output axis: all leading dimensions flattened (1 for 0-d and 1-d tensors)."""
        return math.prod(self.shape[:-1]) if len(self.shape) >= 2 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows if self.n_rows else 0

    @property
    def n_cols(self) -> int:
        return self.row_bytes // itemsize(self.dtype) if self.n_rows else 0


@dataclass(frozen=True)
class Header:
    file: Path
    size: int  # header length (the 8-byte prefix excluded)
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]  # in file order


def read_header(path: Path) -> Header:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise STFormatError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER:
                raise STFormatError(f"header length {n} is implausible")
            raw = f.read(n)
            if len(raw) < n:
                raise STFormatError("file is truncated inside its header")
            file_size = os.fstat(f.fileno()).st_size
    except IsADirectoryError:
        raise STFormatError("is a folder, not a file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise STFormatError(f"header is not JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise STFormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise STFormatError("__metadata__ must map strings to strings")
    data_start = 8 + n
    infos = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise STFormatError(f"entry for tensor {name!r} is malformed") from None
        if dtype not in STORAGE:
            raise STFormatError(f"tensor {name!r} has unknown dtype {dtype!r}")
        if any(s < 0 for s in shape) or not 0 <= start <= end:
            raise STFormatError(f"tensor {name!r} has a negative shape or bad offsets")
        if end - start != math.prod(shape) * STORAGE[dtype].itemsize:
            raise STFormatError(f"tensor {name!r}: byte size does not match its shape and dtype")
        infos.append((start, end, name, dtype, shape))
    infos.sort()
    pos = 0
    for start, end, name, *_ in infos:
        if start != pos:
            raise STFormatError(f"tensor {name!r} data overlaps or leaves a gap")
        pos = end
    if data_start + pos != file_size:
        raise STFormatError(f"file is {file_size} bytes, header describes {data_start + pos} (truncated?)")
    tensors = {
        name: TensorInfo(name, dtype, shape, path, data_start + start, end - start)
        for start, end, name, dtype, shape in infos
    }
    return Header(path, n, dict(metadata), tensors)


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """entries: (name, dtype, shape, nbytes) in data order. Returns the 8-byte prefix plus header."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def serialize_chunks(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> list:
    """The file as a list of buffers (header, then each tensor's data), without copying the data."""
    entries, blobs = [], []
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        arr = np.ascontiguousarray(arr, dtype=STORAGE[dtype])
        entries.append((name, dtype, tuple(arr.shape), arr.nbytes))
        blobs.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
    return [encode_header(entries, metadata), *blobs]


def serialize(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> bytes:
    """tensors: name -> (safetensors dtype, array holding the elements). Sorted by name."""
    return b"".join(bytes(c) for c in serialize_chunks(tensors, metadata))


def read_tensor(info: TensorInfo, f=None) -> np.ndarray:
    """The whole tensor as elements of its storage dtype (BF16 as uint16), shaped."""
    data = pread_exact(info.file, info.offset, info.nbytes, f)
    return np.frombuffer(data, dtype=STORAGE[info.dtype]).reshape(info.shape)


def pread_exact(path: Path, offset: int, length: int, f=None) -> bytes:
    if f is None:
        with open(path, "rb") as fh:
            return pread_exact(path, offset, length, fh)
    out = os.pread(f.fileno(), length, offset)
    if len(out) != length:
        raise STFormatError(f"{path}: short read at byte {offset}")
    return out


def row_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Sorted row indices -> runs (first row, count, position in `rows`) of consecutive rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[s]), int(e - s), int(s)) for s, e in zip(starts, ends)]


def read_rows(info: TensorInfo, rows: np.ndarray, f=None) -> np.ndarray:
    """Raw bytes of the given sorted rows: uint8 array [len(rows), row_bytes]."""
    rb = info.row_bytes
    out = np.empty((len(rows), rb), dtype=np.uint8)
    if f is None:
        with open(info.file, "rb") as fh:
            return _read_runs(info, rows, out, fh)
    return _read_runs(info, rows, out, f)


def _read_runs(info: TensorInfo, rows: np.ndarray, out: np.ndarray, f) -> np.ndarray:
    rb, fd = info.row_bytes, f.fileno()
    for first, count, pos in row_runs(rows):
        got = _pread_into(fd, out[pos : pos + count], info.offset + first * rb)
        if got != count * rb:
            raise STFormatError(f"{info.file}: short read at byte {info.offset + first * rb}")
    return out


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Read len(buf) bytes at `offset` straight into `buf` (preadv), or through a copy where the
    platform has no preadv (not every macOS build of Python has it); returns the bytes read."""
    if _HAS_PREADV:
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, buf.nbytes, offset)
    buf.reshape(-1)[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return len(data)


_HAS_PREADV = hasattr(os, "preadv")


def write_rows(info: TensorInfo, rows: np.ndarray, data: np.ndarray, f) -> None:
    """Write raw row bytes in place through the writable file object `f` opened on info.file."""
    rb, fd = info.row_bytes, f.fileno()
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(len(rows), rb)
    for first, count, pos in row_runs(rows):
        written = os.pwrite(fd, data[pos : pos + count], info.offset + first * rb)
        if written != count * rb:
            raise OSError(f"short write to {info.file}")


def atomic_write_bytes(path: Path, data: bytes | Iterable[bytes], fsync: bool = True) -> None:
    """Write to a unique temporary file in the same folder (fsync it), then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                for chunk in data:
                    f.write(chunk)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
