"""Row selection for the edit: which rows of which ``mlp.gate_proj.weight`` tensors get the direction added.

Pure array math with numpy, no file I/O and no torch import (so that `patchkit compute` stays
small in memory); torch tensors are accepted too and results then come back as torch tensors.
Targets stream in one at a time, or in chunks of rows (:class:`RunningTopK`), so a large model's
rows are never all in memory: each piece is scored, merged into a running top-K, and dropped.

Sign convention (the paper's): a row's score is *minus* its cosine similarity with the direction,
and the K highest scores are kept, i.e. the rows most anti-aligned with the behaviour direction.
Scores are computed in float64 with a summation order that depends only on the row length, so a
row scores the same whether it is read alone, in a chunk, or in a whole tensor. Ties are broken by
(score descending, tensor order, row index ascending). A zero row scores 0.

Strategies (:class:`Strategy`):

* ``paper`` — one direction for every tensor; global top-K of the scores across all tensors.
* ``layer-matched`` — each tensor scored against its own direction (its layer's probe); global top-K.
* ``random-rows`` — control: K rows drawn uniformly without replacement over all rows (seeded).
* ``random-direction`` — control: the ``paper`` rows, but :func:`edit_directions` returns a seeded
  Gaussian vector with the same norm as the probe direction instead of the direction.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np

from ..errors import DataError, UnsupportedError
from .choices import Strategy

PAPER_K = 16384
PAPER_ROWS = 352256  # 32 layers x 11008 gate_proj rows of the paper's model
PAPER_FRACTION = PAPER_K / PAPER_ROWS

Array = Any  # a numpy array or a torch tensor
Targets = Union[Mapping[str, "Array | int"], Iterable[tuple[str, "Array | int"]]]
Directions = Union[Array, Mapping[str, Array]]


def paper_k(total_rows: int, fraction: float = PAPER_FRACTION) -> int:
    """K for ``total_rows`` rows at the paper's fraction: ``floor(total_rows * fraction + 0.5)``
    (nearest, halves up), at least 1 and at most ``total_rows``. ``paper_k(352256) == 16384``."""
    if total_rows < 1 or not 0 < fraction <= 1:
        raise ValueError("total_rows must be >= 1 and fraction in (0, 1]")
    return min(total_rows, max(1, math.floor(total_rows * fraction + 0.5)))


def gate_proj_name(layer: int) -> str:
    """The checkpoint name of decoder layer ``layer``'s gate projection (Llama layout)."""
    return f"model.layers.{layer}.mlp.gate_proj.weight"


def layer_of(name: str) -> int:
    """The decoder layer index in a tensor name such as ``model.layers.7.mlp.gate_proj.weight``."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if match is None:
        raise UnsupportedError(f"tensor {name!r} has no '.layers.<i>.' part; name targets by decoder layer")
    return int(match.group(1))


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def as_numpy(x: Array, dtype=np.float64) -> np.ndarray:
    """numpy view of an array or torch tensor (bf16 and other torch-only dtypes via float32)."""
    if _is_torch(x):
        x = x.detach().cpu()
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x, dtype=dtype)


def _like(template: Any, arr: np.ndarray) -> Array:
    if template is not None and _is_torch(template):
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr))
    return arr


def score_rows(rows: Array, direction: Array) -> Array:
    """``-cos(row, direction)`` for each row of ``rows`` ``[n, hidden]``; zero rows score 0."""
    r = as_numpy(rows)
    d = as_numpy(direction).reshape(-1)
    if r.ndim != 2 or r.shape[1] != d.size:
        raise DataError(f"rows of shape {tuple(r.shape)} do not match a direction of size {d.size}; use the probe of this model")
    dn = math.sqrt(float((d * d).sum()))
    if not math.isfinite(dn) or dn == 0:
        raise DataError("the direction is zero or not finite; retrain the probe")
    dots = (r * d).sum(axis=1)
    norms = np.sqrt((r * r).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(norms > 0, -dots / (np.where(norms > 0, norms, 1.0) * dn), 0.0)
    return _like(rows, scores.astype(np.float32) if _is_torch(rows) else scores)


class RunningTopK:
    """The K best (score, tensor, row) triples seen so far, ordered by score desc, tensor, row."""

    def __init__(self, k: int):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.scores = np.empty(0, dtype=np.float64)
        self.tensor_idx = np.empty(0, dtype=np.int64)
        self.rows = np.empty(0, dtype=np.int64)

    def add(self, tensor_index: int, scores: Array, row_offset: int = 0) -> None:
        s = as_numpy(scores)
        if np.isnan(s).any():
            raise DataError(f"target tensor {tensor_index} has NaN rows; check the checkpoint")
        rows = np.arange(row_offset, row_offset + s.size, dtype=np.int64)
        if self.scores.size == self.k:  # only rows at least as good as the current K-th can enter
            keep = s >= self.scores[-1]
            s, rows = s[keep], rows[keep]
            if s.size == 0:
                return
        all_s = np.concatenate([self.scores, s])
        all_t = np.concatenate([self.tensor_idx, np.full(s.size, tensor_index, dtype=np.int64)])
        all_r = np.concatenate([self.rows, rows])
        order = np.lexsort((all_r, all_t, -all_s))[: self.k]
        self.scores, self.tensor_idx, self.rows = all_s[order], all_t[order], all_r[order]

    def grouped(self, names: list[str]) -> dict[str, np.ndarray]:
        """{name: sorted row indices} for tensors with at least one kept row, in target order."""
        return {names[t]: np.sort(self.rows[self.tensor_idx == t]) for t in np.unique(self.tensor_idx)}


def _items(targets: Targets) -> Iterator[tuple[str, Any]]:
    return iter(targets.items()) if isinstance(targets, Mapping) else iter(targets)


def direction_for(directions: Directions, name: str) -> Array:
    if not isinstance(directions, Mapping):
        return directions
    if name not in directions:
        raise DataError(f"no direction for target {name!r}; give one direction per target tensor")
    return directions[name]


def random_rows(counts: list[int], k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """K distinct (tensor index, row) pairs drawn uniformly over all rows, seeded."""
    total = sum(counts)
    if k > total:
        raise DataError(f"k={k} is more than the {total} target rows; lower k")
    picked = np.random.default_rng(seed).permutation(total)[:k]
    offsets = np.cumsum([0] + counts)
    tensor_idx = np.searchsorted(offsets[1:], picked, side="right")
    return tensor_idx, picked - offsets[tensor_idx]


def select_rows(targets: Targets, directions: Directions, k: int, strategy: Strategy | str = Strategy.PAPER, seed: int = 0) -> dict[str, Array]:
    """The rows to edit: ``{name: sorted unique row indices}`` for the tensors with at least one
    selected row, in target order; exactly ``k`` rows in total (torch LongTensors when the targets
    or the direction are torch tensors, numpy int64 arrays otherwise).

    ``directions`` is one ``[hidden]`` vector (``paper``, ``random-direction``) or a mapping from
    target name to its direction (``layer-matched``; also accepted by the others). For
    ``random-rows`` a target may be given by its row count (an int) instead of the tensor.
    """
    strategy = Strategy(strategy)
    if k < 1:
        raise ValueError("k must be >= 1")
    if strategy is Strategy.LAYER_MATCHED and not isinstance(directions, Mapping):
        raise DataError("layer-matched selection needs one direction per target; train per-layer probes")
    names: list[str] = []
    template = None if isinstance(directions, Mapping) else directions
    if strategy is Strategy.RANDOM_ROWS:
        counts = []
        for name, value in _items(targets):
            names.append(name)
            counts.append(value if isinstance(value, int) else int(value.shape[0]))
            template = template if template is not None or isinstance(value, int) else value
        tensor_idx, rows = random_rows(counts, k, seed)
        return {names[t]: _like(template, np.sort(rows[tensor_idx == t])) for t in np.unique(tensor_idx)}
    top = RunningTopK(k)
    total = 0
    for name, value in _items(targets):
        if isinstance(value, int):
            raise DataError(f"target {name!r} is a row count; {strategy.value} selection needs the tensor")
        names.append(name)
        template = template if template is not None else value
        total += int(value.shape[0])
        top.add(len(names) - 1, score_rows(as_numpy(value), direction_for(directions, name)))
    if k > total:
        raise DataError(f"k={k} is more than the {total} target rows; lower k")
    return {n: _like(template, r) for n, r in top.grouped(names).items()}


def random_direction(like: Array, seed: int) -> Array:
    """A seeded Gaussian vector, float32, with the shape and norm of ``like``."""
    ref = as_numpy(like, np.float32)
    v = np.random.default_rng(seed).standard_normal(ref.shape).astype(np.float32)
    v = (v * (np.linalg.norm(ref) / np.linalg.norm(v))).astype(np.float32)
    return _like(like, v)


def edit_directions(names: Iterable[str], directions: Directions, strategy: Strategy | str = Strategy.PAPER, seed: int = 0) -> dict[str, Array]:
    """The vector to add (times alpha) to the selected rows of each named tensor, float32.

    The probe direction for every strategy except ``random-direction``, which gets one seeded random
    vector of the same norm (with per-target directions: one per target, seeded ``seed + i``).
    """
    strategy = Strategy(strategy)
    out = {}
    for i, name in enumerate(names):
        d = direction_for(directions, name)
        if strategy is Strategy.RANDOM_DIRECTION:
            out[name] = random_direction(d, seed if not isinstance(directions, Mapping) else seed + i)
        else:
            out[name] = d.float() if _is_torch(d) else as_numpy(d, np.float32)
    return out


def edit_direction(direction: Array, strategy: Strategy | str = Strategy.PAPER, seed: int = 0) -> Array:
    """The single vector to add for a one-direction strategy (see :func:`edit_directions`)."""
    if Strategy(strategy) is Strategy.RANDOM_DIRECTION:
        return random_direction(direction, seed)
    return direction.float() if _is_torch(direction) else as_numpy(direction, np.float32)
