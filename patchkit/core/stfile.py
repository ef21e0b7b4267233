"""The safetensors container, read and written byte by byte with the standard library and numpy.

patchkit reads headers without loading tensors (the tensors' bytes are read and written where they
lie by `patchkit.core.tensorio`), and writes small files deterministically (header keys sorted, no timestamps, header padded with spaces to a
multiple of 8 bytes as the safetensors library does), so the same content always gives the same
bytes. Files written here open with the `safetensors` library itself.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .dtypes import DTYPE_NAME, STORAGE, itemsize, shown
from .fsutil import umask
from .patchcheck import INT_LIMIT, MAX_DIMS, JSONError, elements, env_limit, json_int, loads, repeated, unique_pairs

MAX_HEADER = 100 * 1024 * 1024  # default cap on a header's length; PATCHKIT_MAX_HEADER_BYTES sets another
MAX_PATCH_TENSORS = 100_000  # default cap on the tensors a patch file declares; PATCHKIT_MAX_PATCH_TENSORS
MAX_NAME = 1024  # characters in a tensor name


class STFormatError(JSONError):
    """The bytes are not a valid safetensors file; callers wrap it in their own typed error."""


def header_limit() -> int:
    return env_limit("PATCHKIT_MAX_HEADER_BYTES", MAX_HEADER)


def patch_tensor_limit() -> int:
    return env_limit("PATCHKIT_MAX_PATCH_TENSORS", MAX_PATCH_TENSORS)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the tensor's data in `file`
    nbytes: int

    @property
    def known(self) -> bool:
        """Whether patchkit knows the dtype; a tensor of another dtype is carried through untouched."""
        return self.dtype in STORAGE

    @property
    def n_rows(self) -> int:
        """Rows along the output axis: all leading dimensions flattened (1 for 0-d and 1-d tensors)."""
        return math.prod(self.shape[:-1]) if len(self.shape) >= 2 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows if self.n_rows else 0

    @property
    def n_cols(self) -> int:
        """Elements per row; UnsupportedError for a dtype patchkit does not know."""
        return self.row_bytes // itemsize(self.dtype) if self.n_rows else 0


@dataclass(frozen=True)
class Header:
    file: Path
    size: int  # header length (the 8-byte prefix excluded)
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]  # in file order


# ---- headers ---------------------------------------------------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)  # from a quote on, always matches: linear
_NESTED = re.compile(r"[\[,]\s*[\[{]")  # an array holding an array or object: never in a valid header


class _Invalid(str):
    """What an entry that is not a valid tensor entry becomes while parsing: why, whatever it held."""


class _Table(list):
    """An object holding entries: the header itself (pairs, in header order)."""


class _HeaderParser:
    """object_pairs_hook for a header: each tensor entry becomes a small tuple (dtype, shape, start,
    end) as soon as it is parsed, and anything else a small _Invalid, so no tree of dicts is built."""

    def __init__(self, max_objects: int):
        self.objects, self.max_objects = 0, max_objects
        self.shapes: dict[tuple, tuple] = {}

    def __call__(self, pairs: list):
        self.objects += 1
        if self.objects > self.max_objects:
            raise STFormatError(f"header declares more than {self.max_objects - 2} tensors (PATCHKIT_MAX_PATCH_TENSORS)")
        if len(pairs) == 3:
            (k0, dtype), (k1, shape), (k2, offsets) = pairs
            if k0 == "dtype" and k1 == "shape" and k2 == "data_offsets":  # the usual order, the fast path
                return self.entry(dtype, shape, offsets)
        kinds = {type(v) for _, v in pairs}
        if kinds <= {str}:
            return unique_pairs(pairs)  # __metadata__, or an empty object
        if _Table in kinds:
            return _Invalid("it nests tables of tensors")
        if kinds & {tuple, _Invalid, dict}:
            return _Table(pairs)
        d = dict(pairs)
        if len(d) != len(pairs):
            return _Invalid(f"it gives {shown(repeated(pairs))} twice")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in d]
        if missing:
            return _Invalid(f"it has no {missing[0]}")
        return self.entry(d["dtype"], d["shape"], d["data_offsets"])

    def entry(self, dtype, shape, offsets):
        size = _ITEMSIZE.get(dtype) if type(dtype) is str else None
        if size is None and (type(dtype) is not str or not DTYPE_NAME.fullmatch(dtype)):
            return _Invalid(f"dtype {shown(dtype, 40)} is not a dtype name")
        count = elements(shape)
        if count is None:
            return _Invalid(f"shape is not a list of at most {MAX_DIMS} integers from 0 whose product is below 2**63")
        if type(offsets) is not list or len(offsets) != 2:
            return _Invalid("data_offsets is not a list of two integers")
        start, end = offsets
        if type(start) is not int or type(end) is not int or not 0 <= start <= end < INT_LIMIT:
            return _Invalid("data_offsets are not two integers from 0, in order")
        if size is not None:
            if end - start != count * size:
                return _Invalid("its byte size does not match its shape and dtype")
        elif (end == start) != (count == 0):  # an unknown dtype: only empty matches empty can be checked
            return _Invalid("its byte size does not match its shape")
        shape = tuple(shape)
        return (dtype, self.shapes.setdefault(shape, shape), start, end)


_ITEMSIZE = {name: dt.itemsize for name, dt in STORAGE.items()}


def _scan(raw: bytes) -> tuple[bool, bool]:
    """A cheap scan of a header's bytes, in blocks: (may an array hold an array or object, or run past
    4096 characters; may an integer have over 20 digits). A false alarm (whitespace, brackets or digits
    in strings) is settled on the text without its strings, or by parsing with `json_int`."""
    a = np.frombuffer(raw, np.uint8)
    nests = digits = False
    for i in range(1, len(a), 1 << 22):
        cur, prev = a[i : i + (1 << 22) + 20], a[i - 1 : i - 1 + min((1 << 22) + 20, len(a) - i)]
        nests = nests or bool((((cur == 91) | (cur == 123)) & ((prev == 91) | (prev == 44) | (prev <= 32))).any())
        d = (cur >= 48) & (cur <= 57)
        digits = digits or bool((d[:-20] & d[10:-10] & d[20:]).any())  # 21 digits in a row set all three
    return nests or _LONG_ARRAY.search(raw) is not None, digits


_LONG_ARRAY = re.compile(rb"\[[^\[\]]{4096}")  # stops at the next bracket: linear


def parse_header(text: str, max_tensors: int | None = None, scan: tuple[bool, bool] | None = None) -> tuple[dict, list]:
    """(metadata, [(name, (dtype, shape, start, end)), ...] in header order) from a header's text;
    `scan` is what `_scan` found in its bytes, when the caller has it."""
    nests, digits = scan if scan is not None else _scan(text.encode("utf-8", "surrogatepass"))
    if nests:
        bare = _STRING.sub('""', text)
        if _NESTED.search(bare) or _LONG_ARRAY.search(bare.encode()):
            raise STFormatError("header holds an array of arrays or objects, or an array of over 4096 characters")
        del bare
    parser = _HeaderParser(max_tensors + 2 if max_tensors is not None else len(text))
    top = loads(text, pairs_hook=parser, int_hook=json_int if digits else int)
    if type(top) is dict:
        top = _Table(top.items())
    if type(top) is not _Table:
        raise STFormatError("header is not a JSON object of tensors")
    metadata, entries = None, []
    for name, value in top:
        if name == "__metadata__":
            if type(value) is not dict or metadata is not None:
                raise STFormatError("__metadata__ must map strings to strings, once")
            metadata = value
        elif type(value) is not tuple:
            why = str(value) if type(value) is _Invalid else "it is not an object with dtype, shape and data_offsets"
            raise STFormatError(f"entry for tensor {shown(name)} is malformed: {why}")
        elif not name or len(name) > MAX_NAME:
            raise STFormatError(f"tensor name {shown(name)} is empty or longer than {MAX_NAME} characters")
        else:
            entries.append((name, value))
    if max_tensors is not None and len(entries) > max_tensors:
        raise STFormatError(f"header declares more than {max_tensors} tensors (PATCHKIT_MAX_PATCH_TENSORS)")
    return metadata or {}, entries


def open_regular(path: Path):
    """A regular file (or a symlink to one) opened for reading. A FIFO, device, socket or folder is
    refused before anything could block: opened with O_NONBLOCK, checked with fstat, then made blocking."""
    _require_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _require_regular(os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise STFormatError("is a folder, not a file")
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    raise STFormatError(f"is {kind}, not a regular file")


def read_header(path: Path, max_tensors: int | None = None) -> Header:
    """The header of a safetensors file: at most PATCHKIT_MAX_HEADER_BYTES long, and declaring at most
    `max_tensors` tensors if given. A tensor of a dtype patchkit does not know is kept (`known` False)."""
    path = Path(path)
    limit = header_limit()
    with open_regular(path) as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise STFormatError("file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > limit:
            raise STFormatError(f"header length {n} is over the limit of {limit} bytes (PATCHKIT_MAX_HEADER_BYTES)")
        if 8 + n > file_size:
            raise STFormatError(f"file is truncated inside its header ({file_size} bytes, header of {n})")
        raw = f.read(n)
        if len(raw) < n:
            raise STFormatError("file is truncated inside its header")
    scan = _scan(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise STFormatError("header is not UTF-8 text") from None
    del raw  # the header is held once, as text, while it is parsed; and not at all afterwards
    collect = gc.isenabled()
    gc.disable()  # a million small tuples: the collector would walk them again and again
    try:
        metadata, entries = parse_header(text, max_tensors, scan)
        del text
        return _layout(path, n, file_size, metadata, entries)
    except JSONError as e:
        raise STFormatError(str(e) if str(e).startswith("header") else f"header: {e}") from None
    finally:
        if collect:
            gc.enable()


def _layout(path: Path, n: int, file_size: int, metadata: dict, entries: list) -> Header:
    entries.sort(key=lambda e: e[1][2] + e[1][3])  # data order when valid (empty tensors in header order)
    pos, data_start = 0, 8 + n
    for name, (_, _, start, end) in entries:
        if start != pos:
            raise STFormatError(f"tensor {shown(name)} data overlaps or leaves a gap")
        pos = end
    if data_start + pos != file_size:
        raise STFormatError(f"file is {file_size} bytes, header describes {data_start + pos} (truncated?)")
    tensors: dict[str, TensorInfo] = {}
    entries.reverse()
    while entries:  # each entry is dropped as its TensorInfo is made: never both for all tensors
        name, (dtype, shape, start, end) = entries.pop()
        if name in tensors:
            raise STFormatError(f"header names tensor {shown(name)} twice")
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + start, end - start)
    return Header(path, n, metadata, tensors)


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


def data_bytes(arr: np.ndarray):
    """A contiguous array's bytes as one flat buffer, without a copy (b"" when empty)."""
    return memoryview(arr.reshape(-1)).cast("B") if arr.size else b""


def serialize_chunks(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> list:
    """The file as a list of buffers (header, then each tensor's data), without copying the data."""
    entries, blobs = [], []
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        arr = np.ascontiguousarray(arr, dtype=STORAGE[dtype])
        entries.append((name, dtype, tuple(arr.shape), arr.nbytes))
        blobs.append(data_bytes(arr))
    return [encode_header(entries, metadata), *blobs]


def serialize(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> bytes:
    """tensors: name -> (safetensors dtype, array holding the elements). Sorted by name."""
    return b"".join(bytes(c) for c in serialize_chunks(tensors, metadata))


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
