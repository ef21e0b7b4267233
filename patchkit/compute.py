"""compute: the paper's edit as a patch, reading only the target tensors of a checkpoint.

Each target tensor is read, scored against the probe direction and dropped before the next one
(`patchkit.select` keeps a running top-K), so memory holds one tensor at a time. The edit of the
chosen rows is `alpha * direction`, stored in the factored encoding: one direction and one scale
per tensor, whatever K is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import state as st
from .checkpoint import Checkpoint
from .dtypes import to_float
from .errors import ProbeError
from .format import Patch, TensorEdit, rows_hash
from .probe import Probe, load_probe
from .select import PAPER_FRACTION, Strategy, edit_directions, paper_k, select_rows
from .stfile import read_tensor
from .targets import resolve_targets

PAPER_ALPHA = 1.08


def _probe_summary(probe: Probe) -> dict:
    return {
        "layer": probe.layer,
        "pool": probe.pool,
        "label_names": list(probe.label_names),
        "behavior": probe.label_names[probe.behavior_index],
        "accuracy": {"train": probe.train_accuracy, "heldout": probe.heldout_accuracy, "method": probe.heldout_method},
        "examples": probe.n_examples,
        "data_sha256": probe.data_hash,
        "model_fingerprint": probe.model_fingerprint,
        "layer_matched": bool(probe.layer_probes),
    }


def compute_patch(
    model,
    probe,
    *,
    top_k: int | None = None,
    fraction: float | None = None,
    alpha: float = PAPER_ALPHA,
    strategy: str = Strategy.PAPER.value,
    seed: int = 0,
    target: str | None = None,
    axis: int = 0,
    check_model: bool = True,
    model_id: str | None = None,
    revision: str | None = None,
) -> Patch:
    """Select rows with the probe's direction and return the patch adding `alpha * direction` to them."""
    ck = model if isinstance(model, Checkpoint) else Checkpoint(model)
    probe = probe if isinstance(probe, Probe) else load_probe(probe)
    strategy = Strategy(strategy)
    targets = resolve_targets(ck, target, axis)
    infos = [ck.info(n) for n in targets.names]
    hidden = infos[0].shape[1]
    if probe.direction.numel() != hidden:
        raise ProbeError(
            f"the probe reads {probe.direction.numel()} features but the model's {targets.family} targets have {hidden} inputs: "
            "the probe was made for another model"
        )
    if check_model and probe.model_fingerprint and probe.model_fingerprint != ck.fingerprint():
        raise ProbeError(
            f"the probe was trained on another model than {ck.path} (fingerprints differ); "
            "train a probe on this model, or pass --any-probe to use it anyway"
        )
    if strategy is Strategy.LAYER_MATCHED:
        dirs = probe.layer_directions
        missing = [layer for layer in targets.layers if layer not in dirs]
        if missing:
            raise ProbeError(f"layer-matched selection needs a probe for every layer; the probe has none for layer {missing[0]}")
        directions = {n: dirs[layer] for n, layer in zip(targets.names, targets.layers)}
    else:
        directions = probe.direction.float()
    total = sum(i.n_rows for i in infos)
    if top_k is not None and fraction is not None:
        raise ProbeError("give --top-k or --fraction, not both")
    k = top_k if top_k is not None else paper_k(total, fraction if fraction is not None else PAPER_FRACTION)

    def stream():
        for info in infos:
            if strategy is Strategy.RANDOM_ROWS:
                yield info.name, info.n_rows
            else:
                yield info.name, torch.from_numpy(to_float(read_tensor(info), info.dtype).reshape(info.n_rows, -1))

    selected = select_rows(stream(), directions, k, strategy, seed)
    vectors = edit_directions(list(selected), directions, strategy, seed)
    scale = np.array([alpha], dtype=np.float32)
    edits = {}
    for name, rows_t in selected.items():
        info = ck.info(name)
        rows = rows_t.numpy().astype(np.int64)
        base_raw = ck.read_rows(name, rows)
        direction = vectors[name].detach().cpu().numpy().astype(np.float32)
        edit = TensorEdit(name, tuple(info.shape), info.dtype, rows, "factored", rows_hash(base_raw), direction=direction, scale=scale)
        edit.validate()
        edit.result_sha256 = rows_hash(edit.new_rows(base_raw))
        edits[name] = edit
    applied = [r.id for r in st.load_state(ck.path).applied]
    row_norms = _mean_row_norm(ck, selected)
    dnorm = float(np.linalg.norm(next(iter(vectors.values())).numpy())) if vectors else 0.0
    return Patch(
        edits=edits,
        base_model=model_id or ck.config.get("_name_or_path") or None,
        base_revision=revision,
        parents=applied,
        provenance={
            "method": "model-surgery",
            "paper": "arXiv:2407.08770",
            "params": {
                "alpha": float(alpha), "k": int(k), "fraction": k / total, "total_rows": int(total),
                "strategy": strategy.value, "seed": int(seed), "targets": targets.family,
                "edit_norm_ratio": abs(float(alpha)) * dnorm / row_norms if row_norms else None,
            },
            "probe": _probe_summary(probe),
        },
    )


def _mean_row_norm(ck: Checkpoint, selected: dict) -> float:
    """Mean L2 norm of the edited rows before the edit, to report ||alpha v|| relative to it."""
    total, count = 0.0, 0
    for name, rows_t in selected.items():
        info = ck.info(name)
        vals = to_float(ck.read_rows(name, rows_t.numpy().astype(np.int64)), info.dtype).astype(np.float64)
        total += float(np.linalg.norm(vals, axis=1).sum())
        count += vals.shape[0]
    return total / count if count else 0.0


def compute(model, probe, output, **kwargs) -> Patch:
    patch = compute_patch(model, probe, **kwargs)
    patch.save(Path(output))
    return patch
