"""compute: the paper's edit as a patch, reading only the target tensors of a checkpoint.

Each target tensor is read, scored against the probe direction and dropped before the next one
(`patchkit.select` keeps a running top-K), so memory holds one tensor at a time. The edit of the
chosen rows is `alpha * direction`, stored in the factored encoding: one direction and one scale
per tensor, whatever K is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import state as st
from .checkpoint import Checkpoint
from .dtypes import to_float
from .errors import ProbeError
from .format import Patch, TensorEdit, rows_hash
from .probefile import ProbeArrays, read_probe
from .select import PAPER_FRACTION, RunningTopK, Strategy, edit_directions, paper_k, random_rows, score_rows
from .stfile import read_rows
from .targets import resolve_targets

PAPER_ALPHA = 1.08
CHUNK_BYTES = 4 * 1024 * 1024


def probe_arrays(probe) -> ProbeArrays:
    """A probe file path, `ProbeArrays`, or a trained `patchkit.probe.Probe`, as numpy arrays."""
    if isinstance(probe, ProbeArrays):
        return probe
    if isinstance(probe, (str, Path)):
        return read_probe(probe)
    np_ = lambda t: t.detach().cpu().float().numpy()  # noqa: E731 - a torch Probe object
    info = {
        "behavior_index": probe.behavior_index, "label_names": list(probe.label_names), "layer": probe.layer,
        "pool": probe.pool, "model_fingerprint": probe.model_fingerprint, "data_hash": probe.data_hash,
        "n_examples": probe.n_examples, "train_accuracy": probe.train_accuracy,
        "heldout_accuracy": probe.heldout_accuracy, "heldout_method": probe.heldout_method,
    }  # fmt: skip
    layers = {i: (np_(w), np_(b)) for i, (w, b) in probe.layer_probes.items()}
    return ProbeArrays(np_(probe.weight), np_(probe.bias), info, layers)


def _probe_summary(p: ProbeArrays) -> dict:
    info = p.info
    names = list(info.get("label_names", ["0", "1"]))
    return {
        "layer": info.get("layer"),
        "pool": info.get("pool"),
        "label_names": names,
        "behavior": names[int(info.get("behavior_index", 1))],
        "accuracy": {"train": info.get("train_accuracy"), "heldout": info.get("heldout_accuracy"), "method": info.get("heldout_method")},
        "examples": info.get("n_examples"),
        "data_sha256": info.get("data_hash"),
        "model_fingerprint": info.get("model_fingerprint"),
        "layer_matched": bool(p.layers),
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
    """Select rows with the probe's direction and return the patch adding `alpha * direction` to them.

    Reads the target tensors in chunks of rows and keeps only a running top-K: memory does not grow
    with the model. No torch: numpy does the scoring.
    """
    ck = model if isinstance(model, Checkpoint) else Checkpoint(model)
    probe = probe_arrays(probe)
    strategy = Strategy(strategy)
    targets = resolve_targets(ck, target, axis)
    infos = [ck.info(n) for n in targets.names]
    hidden = infos[0].shape[1]
    if probe.direction.size != hidden:
        raise ProbeError(
            f"the probe reads {probe.direction.size} features but the model's {targets.family} targets have {hidden} inputs: "
            "the probe was made for another model"
        )
    fingerprint = probe.info.get("model_fingerprint")
    if check_model and fingerprint and fingerprint != ck.fingerprint():
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
        directions = probe.direction.astype(np.float32)
    total = sum(i.n_rows for i in infos)
    if top_k is not None and fraction is not None:
        raise ProbeError("give --top-k or --fraction, not both")
    k = top_k if top_k is not None else paper_k(total, fraction if fraction is not None else PAPER_FRACTION)
    if k > total:
        raise ProbeError(f"--top-k {k} is more than the {total} target rows; lower it")
    names = list(targets.names)
    if strategy is Strategy.RANDOM_ROWS:
        tensor_idx, rows = random_rows([i.n_rows for i in infos], k, seed)
        selected = {names[t]: np.sort(rows[tensor_idx == t]) for t in np.unique(tensor_idx)}
    else:
        top = RunningTopK(k)
        for t, info in enumerate(infos):
            d = directions[info.name] if isinstance(directions, dict) else directions
            step = max(1, CHUNK_BYTES // max(1, info.row_bytes))
            with open(info.file, "rb") as f:
                for start in range(0, info.n_rows, step):
                    rows = np.arange(start, min(start + step, info.n_rows), dtype=np.int64)
                    values = to_float(read_rows(info, rows, f), info.dtype)
                    top.add(t, score_rows(values, d), row_offset=start)
        selected = top.grouped(names)
    vectors = edit_directions(list(selected), directions, strategy, seed)
    scale = np.array([alpha], dtype=np.float32)
    edits = {}
    for name, rows in selected.items():
        info = ck.info(name)
        rows = rows.astype(np.int64)
        base_raw = ck.read_rows(name, rows)
        direction = np.ascontiguousarray(vectors[name], dtype=np.float32)
        edit = TensorEdit(name, tuple(info.shape), info.dtype, rows, "factored", rows_hash(base_raw), direction=direction, scale=scale)
        edit.validate()
        edit.result_sha256 = rows_hash(edit.new_rows(base_raw))
        edits[name] = edit
    applied = [r.id for r in st.load_state(ck.path).applied]
    row_norms = _mean_row_norm(ck, selected)
    dnorm = float(np.linalg.norm(next(iter(vectors.values())))) if vectors else 0.0
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
        vals = to_float(ck.read_rows(name, np.asarray(rows_t, dtype=np.int64)), info.dtype).astype(np.float64)
        total += float(np.linalg.norm(vals, axis=1).sum())
        count += vals.shape[0]
    return total / count if count else 0.0


def compute(model, probe, output, **kwargs) -> Patch:
    patch = compute_patch(model, probe, **kwargs)
    patch.save(Path(output))
    return patch
