"""The projection method: remove behaviour directions from what the layers write to the residual stream.

For each edited layer l, directions u (hidden, orthonormal, r of them) come from labelled text: the
difference of the class means of the mean-pooled hidden states after decoder layer l (rank r: that of
layer l and of the r-1 nearest other layers, orthonormalised in that order, QR in float64). Each
tensor that writes to the residual stream in layer l (the family's `writes` entries in
`patchkit.method.targets`: `down_proj` / `o_proj` and their equivalents) becomes

    W <- W - lam * U U^T W        (output dimension = rows, Linear [hidden, in])
    W <- W - lam * W U U^T        (output dimension = columns, GPT-2 Conv1D [in, hidden])

computed with torch in float32 (float64 for F64 tensors) as written, `U^T W` (or `W U`) first, and
rounded once to the tensor's dtype. Stored as a `lowrank` edit over every row (format v1.1): for rows
= hidden, U_patch = -lam * U (float32) and V = U^T W; for Conv1D, U_patch = -lam * (W U) and V = U^T;
with exceptions wherever the patch's own arithmetic (docs/format.md) rounds differently from the
torch computation, so the patch reproduces that computation bit for bit.

Direction quality: the area under the ROC curve of each layer's first direction used as a score
(the projection of a text's features on it) on held-out texts (every 5th, never used for the
direction), recorded in the provenance with the held-out counts. AUC needs no threshold, so it
does not collapse to the majority class when the two classes' projections overlap; 0.5 is chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.checkpoint import Checkpoint
from ..core.dtypes import to_float
from ..core.encodings import apply_lowrank, exceptions_for
from ..core.patchfile import Patch, make_edit
from ..errors import PatchkitError
from .targets import residual_writers

HELD_OUT_EVERY = 5
_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: every HELD_OUT_EVERY-th example is held out."""
    idx = np.arange(n)
    return idx[idx % HELD_OUT_EVERY != 0], idx[idx % HELD_OUT_EVERY == 0]


def mean_difference(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """mean(label 1) - mean(label 0), float64."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        raise PatchkitError("the projection method needs examples of both labels")
    return f[y].mean(axis=0) - f[~y].mean(axis=0)


def held_out_quality(features: np.ndarray, labels: np.ndarray, u: np.ndarray) -> dict:
    """{"held_out_auc": AUC of the projection on `u` over the held-out texts (None without both labels
    there), "held_out": [non-toxic, toxic] counts}."""
    from .damping import auroc

    _, test = split_indices(len(labels))
    y = np.asarray(labels).astype(bool)[test]
    counts = [int((~y).sum()), int(y.sum())]
    if y.all() or not y.any():
        return {"held_out_auc": None, "held_out": counts}
    p = np.asarray(features, dtype=np.float64)[test] @ np.asarray(u, dtype=np.float64)
    return {"held_out_auc": round(float(auroc(p[:, None], y)[0]), 6), "held_out": counts}


def directions_from_features(features: dict[int, np.ndarray], labels, layers, rank: int = 1):
    """({layer: float32 [hidden, rank] orthonormal}, {layer: held-out quality}) from per-layer features
    (every layer's, keyed by decoder layer index), the class-mean differences on the training split."""
    labels = np.asarray(labels)
    train, _ = split_indices(len(labels))
    avail = sorted(features)
    diffs = {l: mean_difference(np.asarray(features[l])[train], labels[train]) for l in avail}
    dirs, quality = {}, {}
    for l in layers:
        order = sorted(avail, key=lambda m: (abs(m - l), m))[:rank]  # l itself, then the nearest layers
        if len(order) < rank:
            raise PatchkitError(f"rank {rank} needs features of {rank} layers, only {len(avail)} given")
        q, r = np.linalg.qr(np.stack([diffs[m] for m in order], axis=1))
        q = q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))[None, :]  # the first column points like diffs[l]
        dirs[l] = np.ascontiguousarray(q, dtype=np.float32)
        quality[l] = held_out_quality(features[l], labels, q[:, 0])
    return dirs, quality


def layer_features(model, tokenizer, texts, layers, batch_size: int = 16, progress: bool = False,
                   max_length: int = 256) -> dict[int, np.ndarray]:
    """Mean-pooled hidden states after each decoder layer in `layers`, float32 [n, hidden]: one forward
    pass per batch for every layer at once (the same numbers as `extract_features(layer=l)` per layer)."""
    import torch

    from .activations import decoder_parts, hooked, input_device, token_batches

    base, blocks, _norm = decoder_parts(model)
    wanted = sorted(set(int(l) for l in layers))
    device = input_device(model)
    out = {l: np.empty((len(texts), 0), np.float32) for l in wanted}
    grabbed: dict[int, torch.Tensor] = {}

    def grab(index):
        def hook(_module, _args, output):
            grabbed[index] = output[0] if isinstance(output, tuple) else output
        return hook

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), hooked([(blocks[l], "forward", grab(l)) for l in wanted]):
            for chunk, inputs in token_batches(tokenizer, list(texts), batch_size, max_length, "right"):
                inputs = {k: v.to(device) for k, v in inputs.items()}
                grabbed.clear()
                base(**inputs, use_cache=False)
                keep = inputs["attention_mask"].bool().unsqueeze(-1)
                count = inputs["attention_mask"].sum(dim=1, keepdim=True).clamp(min=1)
                for l in wanted:
                    h = grabbed[l].float()
                    pooled = (torch.where(keep, h, torch.zeros((), dtype=h.dtype)).sum(dim=1) / count.to(h.dtype)).cpu().numpy()
                    if out[l].shape[1] == 0:
                        out[l] = np.empty((len(texts), pooled.shape[1]), np.float32)
                    out[l][np.asarray(chunk)] = pooled
    finally:
        model.train(was_training)
    return out


def projection_edit(ck: Checkpoint, name: str, axis: int, u: np.ndarray, lam: float):
    """The lowrank edit (with exceptions) of tensor `name` that reproduces the torch projection exactly."""
    import torch

    info = ck.tensors[name]
    rows = np.arange(info.n_rows, dtype=np.int64)
    raw = ck.read_rows(name, rows)
    w = torch.from_numpy(np.ascontiguousarray(to_float(raw, info.dtype)).reshape(info.n_rows, -1))
    ut = torch.from_numpy(u).to(w.dtype)
    if ut.shape[0] != (w.shape[0] if axis == 0 else w.shape[1]):
        raise PatchkitError(f"tensor {name} has no dimension of the hidden size {ut.shape[0]} along axis {axis}")
    if axis == 0:
        vt = ut.T @ w  # [r, cols]
        target = w - lam * (ut @ vt)
        uu, vv = (-np.float32(lam) * u).astype(np.float32), vt.float().numpy()
    else:
        wu = w @ ut  # [rows, r]
        target = w - lam * (wu @ ut.T)
        uu, vv = (-np.float32(lam) * wu.float().numpy()).astype(np.float32), np.ascontiguousarray(u.T)
    tdtype = getattr(torch, _TORCH_DTYPES[info.dtype])
    new = target.to(tdtype).contiguous().view(torch.uint8).numpy().reshape(raw.shape).copy()
    exc = exceptions_for(apply_lowrank(raw, info.dtype, uu, vv)[0], new, info.dtype)
    return make_edit(name, tuple(info.shape), info.dtype, rows, raw, u=uu, v=vv, exceptions=exc)


def projection_patch(checkpoint, *, lam: float = 1.0, layers=None, rank: int = 1, modules=("mlp", "attn"),
                     directions: dict | None = None, quality: dict | None = None, data=None, model=None,
                     tokenizer=None, batch_size: int = 16, progress: bool = False) -> Patch:
    """The projection patch for the checkpoint folder `checkpoint` (see the module doc).

    `directions` {layer: [hidden, r]} may be given; otherwise they come from `data` (a LabelledData)
    through `model` and `tokenizer` (loaded from the checkpoint in float32 when not given)."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    writers = residual_writers(ck, tuple(modules))
    all_layers = sorted({l for l, _, _ in writers})
    layers = all_layers if layers is None else sorted(set(int(l) for l in layers))
    missing = [l for l in layers if l not in all_layers]
    if missing:
        raise PatchkitError(f"layer {missing[0]} has no residual-writing tensor in {ck.path} (layers {all_layers[0]}..{all_layers[-1]})")
    data_info = None
    if directions is None:
        if data is None:
            raise PatchkitError("the projection method needs labelled data (or directions)")
        if model is None:
            from .pipeline import load_model

            model, tokenizer = load_model(Path(ck.path))
        feats = layer_features(model, tokenizer, data.texts, all_layers if rank > 1 else layers, batch_size, progress)
        directions, quality = directions_from_features(feats, data.labels, layers, rank)
        data_info = {"source": data.source, "sha256": data.content_hash, "examples": len(data)}
    edits = {}
    for l, name, axis in writers:
        if l in layers:
            u = np.ascontiguousarray(directions[l], dtype=np.float32)
            u = u[:, None] if u.ndim == 1 else u
            edits[name] = projection_edit(ck, name, axis, u, float(lam))
    prov = {"method": "projection",
            "params": {"lam": float(lam), "layers": layers, "rank": int(rank), "modules": sorted(modules)},
            "directions": {str(l): dict((quality or {}).get(l) or {"held_out_auc": None}) for l in layers}}
    if data_info is not None:
        prov["data"] = data_info
    return Patch(edits=edits, base_model=ck.config.get("_name_or_path") or None, provenance=prov)
