"""Row selection for the edit: which rows of which ``mlp.gate_proj.weight`` tensors get the direction added.

Pure tensor math, no file I/O. Targets are ``(name, tensor [rows, hidden])`` pairs given as a mapping
or as any iterable (e.g. a generator that loads one tensor at a time), so a large model's rows are
never all in memory: each tensor is scored, merged into a running top-K, and dropped.

Sign convention (the paper's): a row's score is *minus* its cosine similarity with the direction, and
the K highest scores are kept, i.e. the rows most anti-aligned with the behaviour direction. Ties are
broken deterministically by (score descending, tensor order, row index ascending). A zero row scores 0.

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
from enum import Enum
from typing import Iterable, Iterator, Mapping, Union

import torch

from .errors import DataError, UnsupportedError

PAPER_K = 16384
PAPER_ROWS = 352256  # 32 layers x 11008 gate_proj rows of the paper's model
PAPER_FRACTION = PAPER_K / PAPER_ROWS

Targets = Union[Mapping[str, "torch.Tensor | int"], Iterable[tuple[str, "torch.Tensor | int"]]]
Directions = Union[torch.Tensor, Mapping[str, torch.Tensor]]


class Strategy(str, Enum):
    PAPER = "paper"
    LAYER_MATCHED = "layer-matched"
    RANDOM_ROWS = "random-rows"
    RANDOM_DIRECTION = "random-direction"


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


def score_rows(rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``-cos(row, direction)`` for each row of ``rows`` ``[n, hidden]``, float32; zero rows score 0."""
    rows = rows.float()
    d = direction.float().flatten()
    if rows.ndim != 2 or rows.shape[1] != d.numel():
        raise DataError(f"rows of shape {tuple(rows.shape)} do not match a direction of size {d.numel()}; use the probe of this model")
    dn = d.norm()
    if not torch.isfinite(dn) or dn == 0:
        raise DataError("the direction is zero or not finite; retrain the probe")
    norms = rows.norm(dim=1)
    dots = rows @ d
    return torch.where(norms > 0, -dots / (norms.clamp_min(torch.finfo(torch.float32).tiny) * dn), torch.zeros_like(dots))


def _items(targets: Targets) -> Iterator[tuple[str, torch.Tensor | int]]:
    return iter(targets.items()) if isinstance(targets, Mapping) else iter(targets)


def _direction_for(directions: Directions, name: str) -> torch.Tensor:
    if isinstance(directions, torch.Tensor):
        return directions
    if name not in directions:
        raise DataError(f"no direction for target {name!r}; give one direction per target tensor")
    return directions[name]


class _RunningTopK:
    """The K best (score, position) pairs seen so far, ordered by score desc then position asc."""

    def __init__(self, k: int):
        self.k = k
        self.scores = torch.empty(0, dtype=torch.float32)
        self.tensor_idx = torch.empty(0, dtype=torch.long)
        self.rows = torch.empty(0, dtype=torch.long)

    def add(self, tensor_index: int, scores: torch.Tensor) -> None:
        if torch.isnan(scores).any():
            raise DataError(f"target tensor {tensor_index} has NaN rows; check the checkpoint")
        scores = scores.float()
        # Concatenation puts kept entries (earlier positions) before the new tensor's rows, in row
        # order; a stable descending sort then breaks score ties by position.
        all_scores = torch.cat([self.scores, scores])
        all_t = torch.cat([self.tensor_idx, torch.full((scores.numel(),), tensor_index, dtype=torch.long)])
        all_r = torch.cat([self.rows, torch.arange(scores.numel(), dtype=torch.long)])
        order = torch.sort(all_scores, descending=True, stable=True).indices[: self.k]
        self.scores, self.tensor_idx, self.rows = all_scores[order], all_t[order], all_r[order]


def _group(names: list[str], tensor_idx: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for t in torch.unique(tensor_idx).tolist():
        out[names[t]] = torch.sort(rows[tensor_idx == t]).values
    return out


def select_rows(targets: Targets, directions: Directions, k: int, strategy: Strategy | str = Strategy.PAPER, seed: int = 0) -> dict[str, torch.Tensor]:
    """The rows to edit: ``{name: sorted unique LongTensor of row indices}`` for the tensors with at
    least one selected row, in target order; exactly ``k`` rows in total.

    ``directions`` is one ``[hidden]`` tensor (``paper``, ``random-direction``) or a mapping from
    target name to its direction (``layer-matched``; also accepted by the others). For
    ``random-rows`` a target may be given by its row count (an int) instead of the tensor.
    """
    strategy = Strategy(strategy)
    if k < 1:
        raise ValueError("k must be >= 1")
    if strategy is Strategy.LAYER_MATCHED and isinstance(directions, torch.Tensor):
        raise DataError("layer-matched selection needs one direction per target; train per-layer probes")
    names: list[str] = []
    if strategy is Strategy.RANDOM_ROWS:
        counts = []
        for name, value in _items(targets):
            names.append(name)
            counts.append(value if isinstance(value, int) else int(value.shape[0]))
        total = sum(counts)
        if k > total:
            raise DataError(f"k={k} is more than the {total} target rows; lower k")
        gen = torch.Generator().manual_seed(seed)
        picked = torch.randperm(total, generator=gen)[:k]
        offsets = torch.tensor([0] + counts).cumsum(0)
        tensor_idx = torch.searchsorted(offsets[1:], picked, right=True)
        return _group(names, tensor_idx, picked - offsets[tensor_idx])
    top = _RunningTopK(k)
    total = 0
    for name, value in _items(targets):
        if isinstance(value, int):
            raise DataError(f"target {name!r} is a row count; {strategy.value} selection needs the tensor")
        names.append(name)
        total += int(value.shape[0])
        top.add(len(names) - 1, score_rows(value, _direction_for(directions, name)))
    if k > total:
        raise DataError(f"k={k} is more than the {total} target rows; lower k")
    return _group(names, top.tensor_idx, top.rows)


def random_direction(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded Gaussian vector, float32, with the shape and norm of ``like``."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(like.shape, generator=gen, dtype=torch.float32)
    return v * (like.float().norm() / v.norm())


def edit_directions(names: Iterable[str], directions: Directions, strategy: Strategy | str = Strategy.PAPER, seed: int = 0) -> dict[str, torch.Tensor]:
    """The vector to add (times alpha) to the selected rows of each named tensor, float32.

    The probe direction for every strategy except ``random-direction``, which gets one seeded random
    vector of the same norm (with per-target directions: one per target, seeded ``seed + i``).
    """
    strategy = Strategy(strategy)
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        d = _direction_for(directions, name).float()
        if strategy is Strategy.RANDOM_DIRECTION:
            d = random_direction(d, seed if isinstance(directions, torch.Tensor) else seed + i)
        out[name] = d
    return out


def edit_direction(direction: torch.Tensor, strategy: Strategy | str = Strategy.PAPER, seed: int = 0) -> torch.Tensor:
    """The single vector to add for a one-direction strategy (see :func:`edit_directions`)."""
    if Strategy(strategy) is Strategy.RANDOM_DIRECTION:
        return random_direction(direction, seed)
    return direction.float()
