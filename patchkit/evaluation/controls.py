"""Controls for a patch: edits of the same size that carry no probe information.

``make_controls`` builds, from the patch itself, ``random-rows`` (per tensor as many rows drawn at
random, the same deltas) and ``random-direction`` (the same rows, Gaussian directions of the same
norm); ``edit_norm`` is the size they match; ``rows_intact`` checks a model's touched rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.patchfile import Patch, TensorEdit, rows_hash
from ..errors import UnsupportedError
from .inmemory import DTYPE_NAMES, raw_rows, row_view, state_tensors, tensor_for


def make_controls(model, patch: Patch, seed: int = 0) -> list[tuple[str, Patch]]:
    """Two controls of matched edit norm, built from the patch itself (no probe needed):
    ``random-rows``: per tensor, as many rows drawn uniformly at random, the same deltas;
    ``random-direction``: the same rows, each direction replaced by a Gaussian one of the same norm
    (one random direction per distinct patch direction, so a shared direction stays shared)."""
    tensors = state_tensors(model)
    rng = np.random.default_rng(seed)
    rr, rd, cache = {}, {}, {}
    for name in sorted(patch.edits):
        e = patch.edits[name]
        if e.encoding == "replace":
            raise UnsupportedError(f"tensor {name}: controls need delta edits, not replacement values")
        t = tensor_for(tensors, name)
        view = row_view(t)
        n_rows = view.shape[0]
        rows = np.sort(rng.choice(n_rows, size=e.n_rows, replace=False)).astype(np.int64)
        for out, r, kw in ((rr, rows, {"direction": e.direction, "scale": e.scale, "delta": e.delta}), (rd, e.rows, None)):
            if kw is None:
                if e.encoding == "factored":
                    key = e.direction.tobytes()
                    if key not in cache:
                        g = rng.standard_normal(e.direction.shape)
                        cache[key] = (g * np.linalg.norm(e.direction.astype(np.float64)) / np.linalg.norm(g)).astype(np.float32)
                    kw = {"direction": cache[key], "scale": e.scale, "delta": None}
                else:
                    g = rng.standard_normal(e.delta.shape)
                    g *= np.linalg.norm(e.delta.astype(np.float64), axis=1, keepdims=True) / np.linalg.norm(g, axis=1, keepdims=True)
                    kw = {"direction": None, "scale": None, "delta": g.astype(np.float32)}
            base_raw = raw_rows(view[torch.from_numpy(np.array(r))], e.dtype)
            edit = TensorEdit(name, e.shape, e.dtype, r, e.encoding, rows_hash(base_raw), **kw)
            edit.validate()
            edit.result_sha256 = rows_hash(edit.new_rows(base_raw))
            out[name] = edit
    made = []
    for kind, edits in (("random-rows", rr), ("random-direction", rd)):
        prov = {"method": "control", "control": kind, "of": patch.id, "seed": seed}
        made.append((kind, Patch(edits=edits, base_model=patch.base_model, base_revision=patch.base_revision, provenance=prov)))
    return made


def edit_norm(patch: Patch) -> float:
    """sqrt of the sum of squared row deltas: the size of the edit, matched by the controls."""
    return float(math.sqrt(sum(float((e.deltas().astype(np.float64) ** 2).sum()) for e in patch.edits.values() if e.encoding != "replace")))


def rows_intact(model, patch: Patch) -> bool:
    """The touched rows hold exactly the patch's base bytes (the patch is not applied)."""
    tensors = state_tensors(model)
    for name, e in patch.edits.items():
        t = tensor_for(tensors, name)
        if t is None or rows_hash(raw_rows(row_view(t)[torch.from_numpy(np.array(e.rows))], DTYPE_NAMES[t.dtype])) != e.base_sha256:
            return False
    return True
