"""Damping (AurA, Suau et al. 2024, "Whispering Experts"): scale down MLP neurons that tell the behaviour apart.

For each MLP neuron m of a gated MLP (Llama-style: `down_proj(act(gate_proj x) * up_proj x)`), its
activation on a text is the largest value over the text's tokens of the input of `down_proj` at m
(the paper's max-pooled z_m). AUROC_m is that activation's area under the ROC curve as a classifier
of label 1 (the behaviour) against label 0, ties counted half (Mann-Whitney). The neuron's factor is

    gamma_m = 1 - max(0, 2 * AUROC_m - 1)          (1 - Gini; neurons with AUROC <= 0.5 are left alone)

and, with `fraction` < 1, only the top `fraction` of all neurons by AUROC are damped. The activation
at m is linear in row m of `up_proj`, so damping it is a `scale` edit of those rows (format v1.1):
`w_m <- round(gamma_m * w_m)`, float32 product, rounded once. (Scaling column m of `down_proj` does the
same but is a per-column factor, which the row encodings do not hold.)
"""

from __future__ import annotations

import re

import numpy as np

from ..core.checkpoint import Checkpoint
from ..core.patchfile import Patch, make_edit
from ..errors import PatchkitError, UnsupportedError

UP = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(?P<layer>\d+)\.mlp\.up_proj\.weight$")


def auroc(scores: np.ndarray, labels) -> np.ndarray:
    """Per column of `scores` [n, N]: P(score of a label-1 example > score of a label-0 one) + P(tie) / 2."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise PatchkitError("AUROC needs examples of both labels")
    out = np.empty(s.shape[1])
    for m in range(s.shape[1]):  # average ranks (ties shared), then the Mann-Whitney U of label 1
        col = s[:, m]
        srt = np.sort(col)
        ranks = (np.searchsorted(srt, col, "left") + np.searchsorted(srt, col, "right") + 1) / 2
        out[m] = (ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return out


def aura_gamma(au: np.ndarray, fraction: float = 1.0) -> np.ndarray:
    """gamma = 1 - max(0, 2 AUROC - 1), float32; outside the top `fraction` by AUROC, 1."""
    g = (1.0 - np.maximum(0.0, 2.0 * np.asarray(au, dtype=np.float64) - 1.0)).astype(np.float32)
    if fraction < 1.0:
        keep = max(1, int(round(fraction * au.size)))
        top = np.argsort(-au.reshape(-1), kind="stable")[:keep]
        mask = np.ones(au.size, dtype=bool)
        mask[top] = False
        g.reshape(-1)[mask] = 1.0
    return g


def neuron_activations(model, tokenizer, texts, batch_size: int = 16, max_length: int = 128) -> dict[int, np.ndarray]:
    """{layer: float32 [n, intermediate]}: per text, the max over its tokens of each down_proj input."""
    import torch

    from .activations import decoder_parts, hooked, input_device, token_batches

    _base, layers, _norm = decoder_parts(model)
    downs = [getattr(getattr(layer, "mlp", None), "down_proj", None) for layer in layers]
    if not all(isinstance(d, torch.nn.Module) for d in downs):
        raise UnsupportedError("damping needs a gated MLP with mlp.down_proj (Llama-style families)")
    out: dict[int, np.ndarray] = {}
    mask_box: list = []

    def grab(layer_index):
        def hook(_module, args, kwargs):
            x = (args[0] if args else next(iter(kwargs.values()))).float()
            keep = mask_box[0].bool().unsqueeze(-1)
            pooled = torch.where(keep, x, torch.full((), -torch.inf)).amax(dim=1)
            rows, arr = mask_box[1], out.setdefault(layer_index, np.empty((len(texts), x.shape[-1]), np.float32))
            arr[rows] = pooled.cpu().numpy()
        return hook

    device = input_device(model)
    with torch.no_grad(), hooked([(d, "pre", grab(i)) for i, d in enumerate(downs)]):
        for chunk, inputs in token_batches(tokenizer, list(texts), batch_size, max_length, "right"):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            mask_box[:] = [inputs["attention_mask"], np.asarray(chunk)]
            model(**inputs, use_cache=False)
    return out


def damping_patch(checkpoint, *, data=None, activations: dict | None = None, labels=None, fraction: float = 1.0,
                  layers=None, model=None, tokenizer=None, aurocs: dict | None = None) -> Patch:
    """The AurA damping patch: `scale` edits of up_proj rows (see the module doc). `aurocs` {layer: [N]}
    (from :func:`auroc` of the activations) may be given instead of the activations."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    ups = {int(m.group("layer")): n for n in ck.tensors if (m := UP.search(n))}
    if not ups:
        raise UnsupportedError(f"{ck.path} has no mlp.up_proj tensors: damping handles gated (Llama-style) MLPs only")
    if activations is None and aurocs is None:
        if data is None:
            raise PatchkitError("damping needs labelled data (or activations and labels)")
        if model is None:
            from .pipeline import load_model

            model, tokenizer = load_model(ck.path)
        activations, labels = neuron_activations(model, tokenizer, data.texts), list(data.labels)
    chosen = sorted(ups) if layers is None else sorted(int(l) for l in layers)
    missing = [l for l in chosen if l not in ups or (aurocs is None and l not in activations) or (aurocs is not None and l not in aurocs)]
    if missing:
        raise PatchkitError(f"layer {missing[0]} has no up_proj tensor or no activations")
    au = {l: np.asarray(aurocs[l], dtype=np.float64) if aurocs is not None else auroc(activations[l], labels) for l in chosen}
    flat = np.concatenate([au[l] for l in chosen])
    gam = aura_gamma(flat, fraction)
    edits, start, stats = {}, 0, {}
    for l in chosen:
        g = gam[start : start + au[l].size]
        start += au[l].size
        rows = np.flatnonzero(g < 1.0).astype(np.int64)
        stats[str(l)] = {"neurons": int(len(rows)), "max_auroc": float(au[l].max())}
        if len(rows) == 0:
            continue
        info = ck.tensors[ups[l]]
        edits[ups[l]] = make_edit(ups[l], tuple(info.shape), info.dtype, rows, ck.read_rows(ups[l], rows),
                                  gamma=np.ascontiguousarray(g[rows]))
    if not edits:
        raise PatchkitError("no neuron has an AUROC above 0.5: there is nothing to damp")
    prov = {"method": "damping", "params": {"fraction": float(fraction), "layers": chosen, "rule": "aura"},
            "layers": stats}
    if data is not None:
        prov["data"] = {"source": data.source, "sha256": data.content_hash, "examples": len(data)}
    return Patch(edits=edits, base_model=ck.config.get("_name_or_path") or None, provenance=prov)
