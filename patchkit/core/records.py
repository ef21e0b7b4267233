"""Records patchkit writes into a checkpoint's `.patchkit/` (undo records, the journal): safetensors
files of row indices and row bytes whose metadata carries a sha256 over their content, read back
with every row checked against the checkpoint before anything is written from them."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .stfile import atomic_write_bytes, pread_exact, read_header, serialize_chunks


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


def write_record(path: Path, arrays: dict[str, tuple[str, np.ndarray]], meta: dict[str, str], fsync: bool = True,
                 digests: dict[str, str] | None = None) -> None:
    """A safetensors file whose metadata carries `sha256` over its other metadata and its arrays.
    `digests`: the sha256 of some arrays' bytes, already known (the rows a plan has hashed)."""
    digests = digests or {}
    chunks = serialize_chunks(arrays, meta)
    names = sorted(arrays)
    meta = {**meta, "sha256": _record_digest(meta, [digests.get(n) or _sha256(c) for n, c in zip(names, chunks[1:])])}
    atomic_write_bytes(path, serialize_chunks(arrays, meta), fsync=fsync)


def read_record(path: Path, kind: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, arrays) of a record written by `write_record`, its checksum checked. Raises
    CheckpointError naming the file; STFormatError when it is not a safetensors file at all."""
    if not regular_file(path):
        raise CheckpointError(f"{path} is missing", path=path)
    header = read_header(path)
    meta = header.metadata
    if meta.get("format") != kind:
        raise CheckpointError(f"{path} is not a {kind} record; move it away (nothing was written)", path=path)
    start = 8 + header.size
    end = max((i.offset + i.nbytes for i in header.tensors.values()), default=start)
    data = pread_exact(path, start, end - start)
    slices = [(i.offset - start, i.offset - start + i.nbytes) for _, i in sorted(header.tensors.items())]
    view = memoryview(data)
    if "sha256" in meta and meta["sha256"] != _record_digest(meta, [_sha256(view[a:b]) for a, b in slices]):
        raise CheckpointError(f"{path} does not match its checksum (damaged or edited); move it away "
                              "(nothing was written)", path=path)
    arrays = {}
    for name, i in header.tensors.items():
        if i.dtype not in ("I64", "U8"):
            raise CheckpointError(f"{path}: array {name} has dtype {i.dtype}", path=path)
        arrays[name] = np.frombuffer(data, dtype=np.int64 if i.dtype == "I64" else np.uint8,
                                     count=i.nbytes // (8 if i.dtype == "I64" else 1), offset=i.offset - start).reshape(i.shape)
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
