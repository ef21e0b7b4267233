"""Linear probes: ``Linear(hidden, 2)`` trained with softmax cross-entropy and Adam on pooled features.

The behaviour direction is the weight row of the behaviour class, unnormalised (the paper's choice).
Training is deterministic under ``seed``: every random draw (initialisation, split, shuffling) comes
from a local ``torch.Generator``, so the same inputs give bitwise identical weights.

Accuracy on unseen data is measured either on a stratified held-out split (``heldout`` fraction;
the probe is the one trained on the rest) or, for small sets, by stratified k-fold cross-validation
(the probe is then trained on all examples). ``kfold=None`` picks k-fold (k=5) below
:data:`KFOLD_BELOW` examples and the split otherwise; ``kfold=0`` forces the split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import DataError, ProbeError
from .probefile import ProbeArrays, read_probe, write_probe

KFOLD_BELOW = 200
DEFAULT_EPOCHS = 100
DEFAULT_LR = 1e-3


@dataclass
class Probe:
    """A trained probe. ``layer`` is -1 (final normed state), a decoder layer index, or the layer of
    the main probe when ``layer_probes`` holds per-layer probes (layer-matched mode)."""

    weight: torch.Tensor  # [2, hidden] float32
    bias: torch.Tensor  # [2] float32
    behavior_index: int = 1
    label_names: tuple[str, str] = ("0", "1")
    layer: int = -1
    pool: str = "mean"
    model_fingerprint: str = ""
    model_source: str = ""  # OWNER/NAME@COMMIT when trained on a Hub model
    data_hash: str = ""
    n_examples: int = 0
    train_accuracy: float = float("nan")
    heldout_accuracy: float | None = None
    heldout_method: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    # layer-matched mode: decoder layer -> (weight [2, hidden], bias [2]) and its held-out accuracy
    layer_probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layer_accuracies: dict[int, float | None] = field(default_factory=dict)

    @property
    def direction(self) -> torch.Tensor:
        """The behaviour class's weight row, ``[hidden]``, unnormalised."""
        return self.weight[self.behavior_index]

    @property
    def layer_directions(self) -> dict[int, torch.Tensor]:
        """Per decoder layer, the behaviour row of that layer's probe (layer-matched mode)."""
        return {i: w[self.behavior_index] for i, (w, _b) in sorted(self.layer_probes.items())}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """1 where the probe says behaviour, else 0."""
        return (self.logits(features).argmax(dim=1) == self.behavior_index).long()


def _labels_tensor(labels: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    y = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.long)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{y.shape[0] if y.ndim else 0} labels for {n} feature rows; give one label per row")
    if not bool(((y == 0) | (y == 1)).all()):
        raise DataError("labels must be 0 or 1; map them with patchkit.method.data.load_labelled")
    if y.unique().numel() < 2:
        raise DataError("every label is the same; a probe needs examples of both classes")
    return y


def _fit(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, epochs: int, lr: float, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = x.shape[1]
    bound = 1.0 / math.sqrt(hidden)
    weight = ((torch.rand((2, hidden), generator=gen) * 2 - 1) * bound).requires_grad_()
    bias = ((torch.rand((2,), generator=gen) * 2 - 1) * bound).requires_grad_()
    opt = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _epoch in range(epochs):
            perm = torch.randperm(x.shape[0], generator=gen)
            for start in range(0, x.shape[0], batch_size):
                idx = perm[start : start + batch_size]
                loss = F.cross_entropy(x[idx] @ weight.T + bias, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return weight.detach().clone(), bias.detach().clone()


def _accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    return float(((x @ weight.T + bias).argmax(dim=1) == y).float().mean())


def _stratified_folds(y: torch.Tensor, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    """k disjoint index sets, each class spread evenly over them."""
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for cls in (0, 1):
        members = torch.nonzero(y == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        for j, i in enumerate(members.tolist()):
            folds[(j + offset) % k].append(i)
        offset += members.numel()
    return [torch.tensor(sorted(f), dtype=torch.long) for f in folds]


def train_probe(
    features: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = 16,
    heldout: float = 0.1,
    kfold: int | None = None,
    *,
    behavior_index: int = 1,
    label_names: tuple[str, str] = ("0", "1"),
    layer: int = -1,
    pool: str = "mean",
    model_fingerprint: str = "",
    data_hash: str = "",
) -> Probe:
    """Train a probe on ``features`` ``[n, hidden]`` with 0/1 ``labels`` (1 = behaviour)."""
    x = torch.as_tensor(features).detach().float().cpu()
    if x.ndim != 2 or x.shape[0] < 4:
        raise DataError(f"features of shape {tuple(x.shape)}; need [n >= 4, hidden]")
    if not bool(torch.isfinite(x).all()):
        raise DataError("features contain NaN or infinity; check the model and the texts")
    y = _labels_tensor(labels, x.shape[0])
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    if behavior_index not in (0, 1):
        raise ValueError("behavior_index must be 0 or 1")
    n = x.shape[0]
    k = (5 if n < KFOLD_BELOW else 0) if kfold is None else kfold
    gen = torch.Generator().manual_seed(seed)
    if k:
        if k < 2 or k > int(torch.bincount(y).min()):
            raise DataError(f"{k}-fold needs at least {k} examples of each class; lower kfold or add data")
        correct = 0
        for fold in _stratified_folds(y, k, gen):
            train = torch.ones(n, dtype=torch.bool)
            train[fold] = False
            w, b = _fit(x[train], y[train], gen, epochs, lr, batch_size)
            correct += round(_accuracy(x[fold], y[fold], w, b) * fold.numel())
        heldout_acc: float | None = correct / n
        method = f"{k}-fold"
        weight, bias = _fit(x, y, gen, epochs, lr, batch_size)
        train_acc = _accuracy(x, y, weight, bias)
    else:
        if not 0 < heldout < 1:
            raise ValueError("heldout must be a fraction between 0 and 1")
        test_folds = _stratified_folds(y, max(2, round(1 / heldout)), gen)
        test = torch.zeros(n, dtype=torch.bool)
        test[test_folds[0]] = True
        weight, bias = _fit(x[~test], y[~test], gen, epochs, lr, batch_size)
        train_acc = _accuracy(x[~test], y[~test], weight, bias)
        heldout_acc = _accuracy(x[test], y[test], weight, bias)
        method = f"split:{int(test.sum())}/{n}"
    return Probe(
        weight=weight, bias=bias, behavior_index=behavior_index, label_names=tuple(label_names), layer=layer,
        pool=pool, model_fingerprint=model_fingerprint, data_hash=data_hash, n_examples=n,
        train_accuracy=train_acc, heldout_accuracy=heldout_acc, heldout_method=method,
        training={"seed": seed, "epochs": epochs, "lr": lr, "batch_size": batch_size, "heldout": heldout, "kfold": k},
    )  # fmt: skip


def train_layer_probes(
    features_by_layer: dict[int, torch.Tensor], labels: Sequence[int] | torch.Tensor, main: Probe, **kwargs: Any
) -> Probe:
    """``main`` with one probe per decoder layer attached (layer-matched mode), each trained with
    :func:`train_probe` on that layer's features (e.g. :func:`patchkit.method.activations.extract_gate_inputs`)
    and the same settings as ``main`` unless overridden in ``kwargs``."""
    settings = {k: v for k, v in main.training.items() if k in ("seed", "epochs", "lr", "batch_size", "heldout")}
    settings.update(kwargs)
    probes, accs = {}, {}
    for i, feats in sorted(features_by_layer.items()):
        p = train_probe(feats, labels, behavior_index=main.behavior_index, **settings)
        probes[int(i)] = (p.weight, p.bias)
        accs[int(i)] = p.heldout_accuracy
    return replace(main, layer_probes=probes, layer_accuracies=accs)


# ------------------------------------------------------------------------------------- files


def save_probe(probe: Probe, path: str | Path) -> Path:
    """Write ``probe`` as ``.safetensors`` with JSON metadata, atomically (see :mod:`patchkit.method.probefile`)."""
    info = {
        "behavior_index": probe.behavior_index, "label_names": list(probe.label_names), "layer": probe.layer,
        "pool": probe.pool, "model_fingerprint": probe.model_fingerprint, "model_source": probe.model_source,
        "data_hash": probe.data_hash,
        "n_examples": probe.n_examples, "train_accuracy": probe.train_accuracy,
        "heldout_accuracy": probe.heldout_accuracy, "heldout_method": probe.heldout_method,
        "training": probe.training, "layer_accuracies": {str(k): v for k, v in sorted(probe.layer_accuracies.items())},
    }  # fmt: skip
    layers = {i: (_np(w), _np(b)) for i, (w, b) in probe.layer_probes.items()}
    return write_probe(path, ProbeArrays(_np(probe.weight), _np(probe.bias), info, layers))


def _np(t: torch.Tensor):
    return t.detach().cpu().float().contiguous().numpy()


def probe_from_arrays(arrays: ProbeArrays) -> Probe:
    info = arrays.info
    try:
        return Probe(
            weight=torch.from_numpy(arrays.weight), bias=torch.from_numpy(arrays.bias),
            behavior_index=int(info["behavior_index"]), label_names=tuple(info["label_names"]),
            layer=int(info["layer"]), pool=str(info["pool"]), model_fingerprint=str(info["model_fingerprint"]),
            model_source=str(info.get("model_source", "")),
            data_hash=str(info["data_hash"]), n_examples=int(info["n_examples"]),
            train_accuracy=float(info["train_accuracy"]), heldout_accuracy=info["heldout_accuracy"],
            heldout_method=str(info["heldout_method"]), training=dict(info["training"]),
            layer_probes={i: (torch.from_numpy(w), torch.from_numpy(b)) for i, (w, b) in arrays.layers.items()},
            layer_accuracies={int(k): v for k, v in info.get("layer_accuracies", {}).items()},
        )  # fmt: skip
    except (KeyError, ValueError, TypeError) as e:
        raise ProbeError(f"damaged probe metadata ({e}); retrain the probe") from None


def load_probe(path: str | Path) -> Probe:
    """Read a probe written by :func:`save_probe`; anything else raises :class:`ProbeError`."""
    return probe_from_arrays(read_probe(path))
