"""Local Hugging Face checkpoint folders of safetensors weights: which tensor lives where.

Reads headers only; rows are read and written with `patchkit.core.tensorio`. No math here.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import BaseMismatchError, CheckpointError
from .state import STATE_DIR
from .stfile import STFormatError, TensorInfo, open_regular, read_header
from .tensorio import read_rows

MAX_INDEX_BYTES = 64 * 1024 * 1024


def plain_name(name) -> bool:
    """A file name that stays in its folder: no separator, not `.`/`..`, not absolute, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and (os.altsep is None or os.altsep not in name))


def file_identity(path: Path, header_size: int) -> tuple:
    """What says a shard is still the file its header was read from: device, inode, size, mtime and
    a hash of its header bytes. Checked again under the lock before rows are written in place."""
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        head = os.pread(f.fileno(), 8 + header_size, 0)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, header_size, hashlib.sha256(head).hexdigest())


def len_header(identity: tuple) -> int:
    return identity[4]


class Checkpoint:
    """A folder with `model.safetensors`, or shards listed by a `*.safetensors.index.json`."""

    def __init__(self, path: str | Path, partial: bool = False):
        """`partial`: shards named by the index may be absent (a download of only the shards a command
        needs); their tensors are then unknown, and `missing` lists them."""
        self.path = Path(path)
        self.missing: list[str] = []
        if not self.path.exists():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist", path=self.path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is a file; give the checkpoint's folder", path=self.path)
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        self.identities: dict[Path, tuple] = {}  # file_identity of each shard as its header was read
        for rel in self.files:
            try:
                _check_shard(self.path / rel)
                header = read_header(self.path / rel)
            except FileNotFoundError:
                if partial:
                    self.missing.append(rel)
                    continue
                raise CheckpointError(f"{self.path}: shard {rel} named by the index is missing") from None
            except (STFormatError, OSError) as e:
                raise CheckpointError(f"{self.path / rel} is not a valid safetensors file: {e}") from None
            self.identities[self.path / rel] = file_identity(self.path / rel, header.size)
            for name, info in header.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.path}: tensor {name} appears in two shards")
                self.tensors[name] = info
        if self.index is not None:
            for name, rel in self.index.items():
                if rel in self.missing:
                    continue
                if name not in self.tensors or self.tensors[name].file.name != Path(rel).name:
                    raise CheckpointError(f"{self.path}: the index puts {name} in {rel}, which does not hold it")

    def _weight_files(self) -> list[str]:
        indexes = sorted(self.path.glob("*.safetensors.index.json"))
        self.index: dict[str, str] | None = None
        if indexes:
            chosen = next((p for p in indexes if p.name == "model.safetensors.index.json"), indexes[0])
            self.index = _read_index(chosen)
            weight_map = self.index
            return sorted(set(weight_map.values()))
        if (self.path / "model.safetensors").exists():
            return ["model.safetensors"]
        singles = sorted(p.name for p in self.path.glob("*.safetensors"))
        if len(singles) == 1:
            return singles
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")) or any(self.path.glob("*.pth")):
            raise CheckpointError(
                f"{self.path} holds only pickled weights (.bin/.pt); patchkit never loads pickle: "
                "convert the checkpoint to safetensors first (save_pretrained(..., safe_serialization=True))"
            )
        if singles:
            raise CheckpointError(f"{self.path} has several .safetensors files and no index to tell them apart")
        raise CheckpointError(f"{self.path} has no safetensors weights (model.safetensors or an index)")

    def unchanged(self, path: Path) -> bool:
        """Whether the weight file `path` is still the file whose header this object read."""
        before = self.identities[path]
        return file_identity(path, len_header(before)) == before

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise BaseMismatchError(f"the checkpoint has no tensor {name}: the patch was made for another model", tensor=name) from None

    def read_rows(self, name: str, rows: np.ndarray, f=None) -> np.ndarray:
        return read_rows(self.info(name), rows, f)

    def fingerprint(self) -> str:
        """A model fingerprint: tensor names, dtypes, shapes, and the first and last row of each tensor.

        Cheap (two small reads a tensor) and different for different weights of one architecture.
        """
        if self.missing:
            raise CheckpointError(
                f"{self.path} holds {len(self.files) - len(self.missing)} of its {len(self.files)} shards: "
                "a model fingerprint needs all of them"
            )
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            info = self.tensors[name]
            h.update(json.dumps([name, info.dtype, list(info.shape)]).encode())
            if info.n_rows:
                h.update(read_rows(info, np.array(sorted({0, info.n_rows - 1}), dtype=np.int64)).tobytes())
        return h.hexdigest()

    @property
    def config(self) -> dict:
        p = self.path / "config.json"
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except json.JSONDecodeError:
            raise CheckpointError(f"{p} is not valid JSON") from None

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR


def _read_index(path: Path) -> dict[str, str]:
    """The weight map of a `*.safetensors.index.json`: tensor names to plain file names in the folder."""
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{path} is larger than any safetensors index ({MAX_INDEX_BYTES} bytes at most)")
        weight_map = json.loads(path.read_bytes().decode("utf-8"))["weight_map"]
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a valid safetensors index (no weight_map)", path=path) from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: weight_map is not an object", path=path)
    for name, rel in weight_map.items():
        if not plain_name(rel) or not rel.endswith(".safetensors"):
            raise CheckpointError(
                f"{path}: the index puts tensor {name} in {rel!r}, which is not a .safetensors file name in "
                "the checkpoint's folder; patchkit reads and writes nothing outside it", path=path, tensor=name)
    return weight_map


def _check_shard(path: Path) -> None:
    """A weight file must be a regular file, or a symlink to one (a Hub cache snapshot)."""
    try:
        mode = os.stat(path).st_mode  # follows a symlink to what it points at
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror}", path=path) from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file; patchkit reads weights only from regular files", path=path)
