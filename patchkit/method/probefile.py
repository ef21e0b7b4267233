"""The probe file: `.safetensors` with float32 `weight` [2, hidden], `bias` [2], optional per-layer
`layers.<i>.weight` / `layers.<i>.bias`, and metadata `format=patchkit-probe`, `version=1` and
`probe` (JSON: behaviour index, label names, layer, pooling, model fingerprint, data hash,
examples, accuracies, training settings).

numpy only, so that `compute` can read a probe without importing torch. `patchkit.method.probe` wraps
these arrays in its torch `Probe`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.stfile import STFormatError, atomic_write_bytes, read_header, serialize
from ..core.tensorio import read_tensor
from ..errors import ProbeError

FORMAT = "patchkit-probe"
VERSION = "1"


@dataclass
class ProbeArrays:
    weight: np.ndarray  # [2, hidden] float32
    bias: np.ndarray  # [2] float32
    info: dict
    layers: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def direction(self) -> np.ndarray:
        return self.weight[int(self.info.get("behavior_index", 1))]

    @property
    def layer_directions(self) -> dict[int, np.ndarray]:
        b = int(self.info.get("behavior_index", 1))
        return {i: w[b] for i, (w, _) in sorted(self.layers.items())}


def write_probe(path: str | Path, probe: ProbeArrays) -> Path:
    """Write atomically; the same probe always gives the same bytes (sorted keys, no timestamps)."""
    path = Path(path)
    arrays = {"weight": ("F32", probe.weight), "bias": ("F32", probe.bias)}
    for i, (w, b) in sorted(probe.layers.items()):
        arrays[f"layers.{i}.weight"] = ("F32", w)
        arrays[f"layers.{i}.bias"] = ("F32", b)
    meta = {"format": FORMAT, "version": VERSION, "probe": json.dumps(probe.info, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, serialize(arrays, meta))
    return path


def read_probe(path: str | Path) -> ProbeArrays:
    """Read a probe file; anything else raises :class:`ProbeError` with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: no such probe file; train one first", path=str(path))
    try:
        header = read_header(path)
        with open(path, "rb") as f:
            tensors = {k: np.array(read_tensor(i, f), dtype=np.float32) for k, i in header.tensors.items()}
    except (STFormatError, OSError) as e:
        raise ProbeError(f"{path}: not a safetensors file ({str(e)[:80]}); pass a probe file", path=str(path)) from None
    meta = header.metadata
    if meta.get("format") != FORMAT:
        raise ProbeError(f"{path}: not a patchkit probe (format {meta.get('format')!r}); pass a probe file", path=str(path))
    if meta.get("version") != VERSION:
        raise ProbeError(f"{path}: probe format version {meta.get('version')!r} is not supported; retrain the probe", path=str(path))
    try:
        info = json.loads(meta["probe"])
        weight, bias = tensors["weight"], tensors["bias"]
        if weight.ndim != 2 or weight.shape[0] != 2 or bias.shape != (2,):
            raise ValueError("bad weight or bias shape")
        layers = {}
        for name in tensors:
            if name.startswith("layers.") and name.endswith(".weight"):
                i = int(name.split(".")[1])
                layers[i] = (tensors[name], tensors[f"layers.{i}.bias"])
        int(info["behavior_index"])
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise ProbeError(f"{path}: damaged probe metadata or tensors ({e}); retrain the probe", path=str(path)) from None
    return ProbeArrays(weight, bias, info, layers)
