"""Local Hugging Face checkpoint folders of safetensors weights: which tensor lives where.

Reads headers only; rows are read and written with `patchkit.stfile`. No math here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import BaseMismatchError, CheckpointError
from .stfile import STFormatError, TensorInfo, read_header, read_rows

STATE_DIR = ".patchkit"


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
        for rel in self.files:
            try:
                header = read_header(self.path / rel)
            except FileNotFoundError:
                if partial:
                    self.missing.append(rel)
                    continue
                raise CheckpointError(f"{self.path}: shard {rel} named by the index is missing") from None
            except (STFormatError, OSError) as e:
                raise CheckpointError(f"{self.path / rel} is not a valid safetensors file: {e}") from None
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
            try:
                weight_map = json.loads(chosen.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except Exception:
                raise CheckpointError(f"{chosen} is not a valid safetensors index (no weight_map)") from None
            self.index = weight_map
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
