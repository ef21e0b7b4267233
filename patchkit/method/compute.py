"""compute: the paper's edit as a patch, reading only the target tensors of a checkpoint.

Each target tensor is read, scored against the probe direction and dropped before the next one
(`patchkit.method.select` keeps a running top-K), so memory holds one tensor at a time. The edit of the
chosen rows is `alpha * direction`, stored in the factored encoding: one direction and one scale
per tensor, whatever K is.

What a "row" is comes from `patchkit.method.targets`: only the gate part of a fused tensor is scored
(Phi-3's `gate_up_proj`, fused MoE experts), and for axis-1 targets (GPT-2's transposed Conv1D) a
neuron is a column, written as a rank-one edit of every row (see `_edit`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core import state as st
from ..core.checkpoint import Checkpoint
from ..core.dtypes import STORAGE, compute_dtype, from_float, to_float
from ..core.patchfile import Patch, TensorEdit, rows_hash
from ..core.tensorio import read_rows
from ..errors import ProbeError, UnsupportedError
from .probefile import ProbeArrays, read_probe
from .select import (
    PAPER_FRACTION,
    RunningTopK,
    Strategy,
    edit_directions,
    paper_k,
    random_rows,
    score_rows,
)
from .targets import Layout, resolve_targets

PAPER_ALPHA = 1.08
CHUNK_BYTES = 4 * 1024 * 1024


def probe_arrays(probe) -> ProbeArrays:
    """A probe file path, `ProbeArrays`, or a trained `patchkit.method.probe.Probe`, as numpy arrays."""
    if isinstance(probe, ProbeArrays):
        return probe
    if isinstance(probe, (str, Path)):
        return read_probe(probe)
    np_ = lambda t: t.detach().cpu().float().numpy()  # noqa: E731 - a torch Probe object
    info = {
        "behavior_index": probe.behavior_index, "label_names": list(probe.label_names), "layer": probe.layer,
        "pool": probe.pool, "model_fingerprint": probe.model_fingerprint, "data_hash": probe.data_hash,
        "model_source": getattr(probe, "model_source", ""),
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


def check_probe(ck: Checkpoint, probe: ProbeArrays, family: str, inputs: int, check_model: bool = True,
                model_id: str | None = None, revision: str | None = None) -> None:
    """Refuse a probe made for another model: wrong feature size, or (with `check_model`) another model.

    The model is recognised by its fingerprint; for a partial Hub download (only the shards holding the
    targets), whose fingerprint cannot be read, by the Hub commit the probe was trained on."""
    if probe.direction.size != inputs:
        raise ProbeError(
            f"the probe reads {probe.direction.size} features but the model's {family} targets have {inputs} inputs: "
            "the probe was made for another model"
        )
    if not check_model:
        return
    if ck.missing:
        source = probe.info.get("model_source")
        if not (source and model_id and revision and source == f"{model_id}@{revision}"):
            raise ProbeError(
                f"only the target shards of {model_id or ck.path} were downloaded, and the probe does not record that "
                "Hub commit: train the probe with `patchkit probe OWNER/NAME`, or pass --any-probe"
            )
        return
    fingerprint = probe.info.get("model_fingerprint")
    if fingerprint and fingerprint != ck.fingerprint():
        raise ProbeError(
            f"the probe was trained on another model than {ck.path} (fingerprints differ); "
            "train a probe on this model, or pass --any-probe to use it anyway"
        )


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
    layouts = list(targets.layouts)
    check_probe(ck, probe, targets.family, layouts[0].inputs, check_model, model_id, revision)
    if strategy is Strategy.LAYER_MATCHED:
        dirs = probe.layer_directions
        missing = [layer for layer in targets.layers if layer not in dirs]
        if missing:
            raise ProbeError(f"layer-matched selection needs a probe for every layer; the probe has none for layer {missing[0]}")
        directions = {n: dirs[layer] for n, layer in zip(targets.names, targets.layers)}
    else:
        directions = probe.direction.astype(np.float32)
    total = sum(lay.neurons for lay in layouts)  # gate neurons: rows, or columns for axis 1
    if top_k is not None and fraction is not None:
        raise ProbeError("give --top-k or --fraction, not both")
    k = top_k if top_k is not None else paper_k(total, fraction if fraction is not None else PAPER_FRACTION)
    if k > total:
        raise ProbeError(f"--top-k {k} is more than the {total} target rows; lower it")
    names = list(targets.names)
    if strategy is Strategy.RANDOM_ROWS:
        tensor_idx, picked = random_rows([lay.neurons for lay in layouts], k, seed)
        selected = {names[t]: np.sort(picked[tensor_idx == t]) for t in np.unique(tensor_idx)}
    else:
        top = RunningTopK(k)
        for t, (info, lay) in enumerate(zip(infos, layouts)):
            d = directions[info.name] if isinstance(directions, dict) else directions
            for offset, values in _neuron_chunks(info, lay):
                top.add(t, score_rows(values, d), row_offset=offset)
        selected = top.grouped(names)  # neuron indices
    vectors = edit_directions(list(selected), directions, strategy, seed)
    edits = {}
    for name, neurons in selected.items():
        lay = layouts[names.index(name)]
        edits[name] = target_edit(ck.info(name), lay, neurons.astype(np.int64), vectors[name], alpha)
    applied = [r.id for r in st.load_state(ck.path).applied]
    row_norms = _mean_row_norm(ck, selected, dict(zip(names, layouts)))
    # mean ||v|| over the edited neurons: per-layer directions (layer-matched) differ in norm
    counts = {n: len(r) for n, r in selected.items()}
    dnorm = sum(counts[n] * float(np.linalg.norm(vectors[n])) for n in counts) / max(1, sum(counts.values()))
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
                **({"axis": 1, "columns": int(k)} if targets.axis == 1 else {}),
            },
            "probe": _probe_summary(probe),
        },
    )


def _neuron_chunks(info, lay: Layout):
    """(first neuron index, [n, inputs] float values) over the gate neurons of one target, in order.

    Axis 0: rows read in chunks, block by block (only the gate part of a fused tensor). Axis 1: the
    tensor is read whole (one tensor in memory, as for the other targets' chunks) and its gate
    columns are yielded in chunks, transposed.
    """
    step = max(1, CHUNK_BYTES // max(1, info.row_bytes))
    with open(info.file, "rb") as f:
        if lay.axis == 0:
            for b in range(lay.blocks):
                lo, hi = lay.block_range(b)
                for start in range(lo, hi, step):
                    rows = np.arange(start, min(start + step, hi), dtype=np.int64)
                    yield b * lay.width + start - lo, to_float(read_rows(info, rows, f), info.dtype)
            return
        whole = to_float(read_rows(info, np.arange(info.n_rows, dtype=np.int64), f), info.dtype)
    lo, hi = lay.block_range(0)
    cstep = max(1, CHUNK_BYTES // max(1, 4 * lay.inputs))
    for start in range(lo, hi, cstep):
        yield start - lo, np.ascontiguousarray(whole[:, start : min(start + cstep, hi)].T)


def target_edit(info, lay: Layout, neurons: np.ndarray, vector, alpha: float) -> TensorEdit:
    """The factored edit adding alpha * vector to the input weights of `neurons` (sorted)."""
    direction = np.ascontiguousarray(vector, dtype=np.float32)
    scale = np.array([alpha], dtype=np.float32)
    if lay.axis == 0:
        rows = lay.index_of(neurons).astype(np.int64)
        base_raw = read_rows(info, rows)
        edit = TensorEdit(info.name, tuple(info.shape), info.dtype, rows, "factored", rows_hash(base_raw), direction=direction, scale=scale)
        edit.validate()
        edit.result_sha256 = rows_hash(edit.new_rows(base_raw))
        return edit
    # Axis 1: format v1 edits rows, so column j += s * v is every row i changing by (s * v[i]) at the
    # chosen columns: a rank-one delta, stored factored with direction = indicator of the columns and
    # scale[i] = float32(alpha) * v[i] (the same float32 products as the row edit). Every row is touched.
    cols = lay.index_of(neurons).astype(np.int64)
    rows = np.arange(info.n_rows, dtype=np.int64)
    base_raw = read_rows(info, rows)
    row_scale = (scale * direction).astype(np.float32)
    indicator = np.zeros(lay.shape[1], dtype=np.float32)
    indicator[cols] = 1.0
    expected = _column_edit(base_raw, info.dtype, cols, row_scale)
    edit = TensorEdit(info.name, tuple(info.shape), info.dtype, rows, "factored", rows_hash(base_raw), direction=indicator, scale=row_scale)
    edit.validate()
    new = edit.new_rows(base_raw)
    if not np.array_equal(new, expected):
        # -0.0 + 0.0 is +0.0: rows with a -0.0 weight outside the chosen columns would change bits.
        # A dense delta of -0.0 there leaves every other weight as it is (x + -0.0 == x, bit for bit).
        delta = np.full((info.n_rows, lay.shape[1]), -0.0, dtype=np.float32)
        delta[:, cols] = row_scale[:, None] * indicator[None, cols]
        edit = TensorEdit(info.name, tuple(info.shape), info.dtype, rows, "dense", rows_hash(base_raw), delta=delta)
        edit.validate()
        new = edit.new_rows(base_raw)
        if not np.array_equal(new, expected):
            raise UnsupportedError(f"tensor {info.name}: the column edit cannot be written exactly as row edits; edit its rows with --axis 0")
    edit.result_sha256 = rows_hash(new)
    return edit


def _column_edit(base_raw: np.ndarray, dtype: str, cols: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """Raw bytes of the tensor with only `cols` changed: w[:, j] = round(w[:, j] + row_scale)."""
    elems = base_raw.view(STORAGE[dtype]).copy()
    sub = to_float(elems[:, cols], dtype) + row_scale[:, None].astype(compute_dtype(dtype))
    elems[:, cols] = from_float(sub, dtype)
    return elems.view(np.uint8).reshape(base_raw.shape)


def _mean_row_norm(ck: Checkpoint, selected: dict, layouts: dict) -> float:
    """Mean L2 norm of the edited neurons' input weights before the edit, to report ||alpha v|| relative to it."""
    total, count = 0.0, 0
    for name, neurons in selected.items():
        info, lay = ck.info(name), layouts[name]
        idx = lay.index_of(np.asarray(neurons, dtype=np.int64))
        if lay.axis == 0:
            vals = to_float(ck.read_rows(name, idx), info.dtype).astype(np.float64)
        else:
            vals = to_float(ck.read_rows(name, np.arange(info.n_rows, dtype=np.int64)), info.dtype)[:, idx].T.astype(np.float64)
        total += float(np.linalg.norm(vals, axis=1).sum())
        count += vals.shape[0]
    return total / count if count else 0.0


def compute(model, probe, output, **kwargs) -> Patch:
    patch = compute_patch(model, probe, **kwargs)
    patch.save(Path(output))
    return patch


def rank_rows(model, probe, k_max: int, *, target: str | None = None, axis: int = 0, check_model: bool = True) -> dict:
    """The paper's ranking of gate neurons, scored once: the `k_max` best, best first.

    The top K for any K <= k_max is the first K entries: the neurons (and ties) that
    `compute_patch(top_k=K)` selects with strategy `paper`. Returns {"names", "layouts",
    "tensor_idx", "neurons", "scores", "total", "family"} (arrays ordered best first).
    """
    ck = model if isinstance(model, Checkpoint) else Checkpoint(model)
    probe = probe_arrays(probe)
    targets = resolve_targets(ck, target, axis)
    layouts = list(targets.layouts)
    check_probe(ck, probe, targets.family, layouts[0].inputs, check_model)
    total = sum(lay.neurons for lay in layouts)
    if not 1 <= k_max <= total:
        raise ProbeError(f"K={k_max} is not between 1 and the {total} target rows; lower it")
    direction = probe.direction.astype(np.float32)
    top = RunningTopK(k_max)
    for t, (name, lay) in enumerate(zip(targets.names, layouts)):
        for offset, values in _neuron_chunks(ck.info(name), lay):
            top.add(t, score_rows(values, direction), row_offset=offset)
    return {"names": list(targets.names), "layouts": layouts, "tensor_idx": top.tensor_idx, "neurons": top.rows,
            "scores": top.scores, "total": int(total), "family": targets.family}
