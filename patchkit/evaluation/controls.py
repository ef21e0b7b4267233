"""Controls for a patch: edits of the same kind and size that carry no behaviour information.

``make_controls`` dispatches on the patch's ``provenance["method"]``:

* model surgery (row edits: dense / factored): ``random-rows`` (per tensor as many rows drawn at
  random, the same deltas) and ``random-direction`` (the same rows, Gaussian directions of the same norm);
* ``projection``: ``random-direction`` (per edited layer, ``rank`` Gaussian directions made orthonormal,
  the same layers, modules and lam) and ``label-shuffled`` (the class-mean-difference directions of
  the same data with its labels permuted by the seed: the same feature pipeline, no label information);
* ``damping``: ``random-neurons`` (per tensor as many rows drawn at random, the patch's factors
  permuted onto them).

``control_builders`` gives the same controls as functions of a strength (1 = the patch's own: lam for
projection, the damping ``1 - gamma`` for damping, the deltas for row edits), so that a benchmark can
scale them to the patch's damage; ``edit_norm`` is the size of an edit; ``rows_intact`` checks a model's
touched rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.dtypes import to_float
from ..core.patchfile import Patch, TensorEdit, rows_hash
from ..core.patchfile import make_edit
from ..errors import DataError, UnsupportedError
from .inmemory import DTYPE_NAMES, raw_rows, row_view, state_tensors, tensor_for

CONTROL_KINDS = {"projection": ("random-direction", "label-shuffled"), "damping": ("random-neurons",),
                 None: ("random-rows", "random-direction")}


def make_controls(model, patch: Patch, seed: int = 0, *, data=None, features=None, checkpoint=None) -> list[tuple[str, Patch]]:
    """The patch's controls at the patch's own strength, ``[(kind, patch)]`` (see the module doc).

    A projection patch's label-shuffled control needs the patch's data: ``features`` ({layer: [n, hidden]},
    labels) of it, or ``data`` (a LabelledData, checked against the provenance's hash), or a ``builtin:``
    source recorded in the provenance; ``checkpoint`` is the base folder (default: where the model was loaded from)."""
    return [(kind, build(1.0)) for kind, build in control_builders(model, patch, seed, data=data, features=features,
                                                                   checkpoint=checkpoint)]


def control_builders(model, patch: Patch, seed: int = 0, *, data=None, features=None, checkpoint=None):
    """``[(kind, build)]`` with ``build(strength) -> Patch``: the controls of :func:`make_controls` at
    ``strength`` times the patch's own strength."""
    method = (patch.provenance or {}).get("method")
    if method == "projection":
        return projection_controls(model, patch, seed, data=data, features=features, checkpoint=checkpoint)
    if method == "damping":
        return damping_controls(model, patch, seed)
    return [(kind, lambda s, p=p: scaled_rows(p, s, model)) for kind, p in row_controls(model, patch, seed)]


def row_controls(model, patch: Patch, seed: int = 0) -> list[tuple[str, Patch]]:
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


def scaled_rows(patch: Patch, strength: float, model=None) -> Patch:
    """A row-edit (dense / factored) patch with every delta multiplied by ``strength`` (the result
    fingerprints filled in from ``model``'s rows when given)."""
    if strength == 1.0:
        return patch
    tensors = state_tensors(model) if model is not None else None
    edits = {}
    for name, e in patch.edits.items():
        if e.encoding == "factored":
            kw = {"direction": e.direction, "scale": (np.asarray(e.scale, np.float64) * strength).astype(np.float32), "delta": None}
        elif e.encoding == "dense":
            kw = {"direction": None, "scale": None, "delta": (e.delta.astype(np.float64) * strength).astype(np.float32)}
        else:
            raise UnsupportedError(f"tensor {name}: only dense and factored edits scale")
        edit = TensorEdit(name, e.shape, e.dtype, e.rows, e.encoding, e.base_sha256, **kw)
        edit.validate()
        if tensors is not None:
            edit.result_sha256 = rows_hash(edit.new_rows(raw_rows(row_view(tensor_for(tensors, name))[torch.from_numpy(np.array(e.rows))], e.dtype)))
        edits[name] = edit
    prov = {**patch.provenance, "strength": float(strength)}
    return Patch(edits=edits, base_model=patch.base_model, base_revision=patch.base_revision, provenance=prov)


def _control_patch(patch: Patch, made: Patch, kind: str, seed: int, strength: float, extra: dict | None = None) -> Patch:
    prov = {"method": "control", "control": kind, "of": patch.id, "of_method": patch.provenance.get("method"), "seed": seed,
            "strength": float(strength), "params": made.provenance.get("params"), **(extra or {})}
    return Patch(edits=made.edits, base_model=patch.base_model, base_revision=patch.base_revision, provenance=prov)


def checkpoint_of(model, checkpoint=None):
    """The base checkpoint folder of a loaded model (its ``name_or_path``) or the one given."""
    from pathlib import Path

    from ..core.checkpoint import Checkpoint

    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    path = checkpoint or getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path or not Path(path).is_dir():
        raise UnsupportedError("projection controls need the base checkpoint folder; pass checkpoint=")
    return Checkpoint(path)


def random_directions(layers, hidden: int, rank: int, seed: int) -> dict[int, np.ndarray]:
    """Per layer, ``rank`` Gaussian directions made orthonormal (QR, float64), float32 [hidden, rank]."""
    rng = np.random.default_rng(seed)
    out = {}
    for l in layers:
        q, _r = np.linalg.qr(rng.standard_normal((hidden, rank)))
        out[int(l)] = np.ascontiguousarray(q, dtype=np.float32)
    return out


def shuffled_labels(labels, seed: int) -> np.ndarray:
    """The labels permuted by the seed (the same class counts, no link to the texts)."""
    return np.random.default_rng(seed).permutation(np.asarray(labels))


def projection_features(model, patch: Patch, data=None, features=None, checkpoint=None):
    """({layer: features}, labels) of the data a projection patch was made from (see make_controls)."""
    if features is not None:
        return features
    rec = patch.provenance.get("data") or {}
    ck = checkpoint_of(model, checkpoint)
    if data is None:
        from pathlib import Path

        from ..method.pipeline import load_data

        src = str(rec.get("source") or "")
        if src.startswith("builtin:"):
            name, _, split = src[len("builtin:"):].partition("[")
            data = load_data(f"builtin:{name}", split=split.rstrip("]") or "train", model=ck.path)
        elif src and Path(src).is_file():  # checked against the recorded hash below
            data = load_data(src)
        else:
            raise DataError(f"the label-shuffled control needs the data the patch was made from ({src or 'not recorded'}): "
                            "pass data= or features= (patchkit eval: --control-data)")
    if rec.get("sha256") and data.content_hash != rec["sha256"]:
        raise DataError(f"the data given ({data.source}) is not the data the patch was made from ({rec.get('source')})")
    from ..method.pipeline import load_model
    from ..method.projection import layer_features

    fmodel, tok = load_model(ck.path)
    return layer_features(fmodel, tok, data.texts, range(len(_decoder_layers(fmodel)))), list(data.labels)


def _decoder_layers(model):
    from ..method.activations import decoder_parts

    return decoder_parts(model)[1]


def projection_controls(model, patch: Patch, seed: int = 0, *, data=None, features=None, checkpoint=None):
    """``random-direction`` and ``label-shuffled`` builders for a projection patch (same layers, modules,
    rank; strength times its lam); the shuffled directions are computed on first use."""
    from ..method.projection import directions_from_features, projection_patch

    ck = checkpoint_of(model, checkpoint)
    par = patch.provenance["params"]
    lam, layers, rank, modules = float(par["lam"]), list(par["layers"]), int(par["rank"]), tuple(par["modules"])
    rand = random_directions(layers, _hidden_size(ck), rank, seed)
    state: dict = {}

    def shuffled_dirs():
        if "dirs" not in state:
            feats, labels = projection_features(model, patch, data, features, checkpoint)
            perm = shuffled_labels(labels, seed)
            state["dirs"], state["quality"] = directions_from_features(feats, perm, layers, rank)
            state["changed"] = float(np.mean(perm != np.asarray(labels)))
        return state["dirs"], state["quality"]

    def build(kind):
        def make(strength):
            if kind == "random-direction":
                dirs, quality, extra = rand, None, {}
            else:
                dirs, quality = shuffled_dirs()
                extra = {"labels_changed": state["changed"]}
            made = projection_patch(ck, lam=lam * strength, layers=layers, rank=rank, modules=modules, directions=dirs, quality=quality)
            return _control_patch(patch, made, kind, seed, strength, extra)
        return make

    return [(kind, build(kind)) for kind in CONTROL_KINDS["projection"]]


def _hidden_size(ck) -> int:
    cfg = ck.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if cfg.get(key):
            return int(cfg[key])
    text = cfg.get("text_config") or {}
    if text.get("hidden_size"):
        return int(text["hidden_size"])
    raise UnsupportedError(f"{ck.path}: no hidden size in its config")


def damping_controls(model, patch: Patch, seed: int = 0):
    """``random-neurons``: per edited tensor, as many rows drawn at random, the patch's factors permuted onto them."""
    tensors = state_tensors(model)
    rng = np.random.default_rng(seed)
    plan = []
    for name in sorted(patch.edits):
        e = patch.edits[name]
        if e.encoding != "scale":
            raise UnsupportedError(f"tensor {name}: a damping patch holds scale edits, not {e.encoding}")
        view = row_view(tensor_for(tensors, name))
        rows = np.sort(rng.choice(view.shape[0], size=e.n_rows, replace=False)).astype(np.int64)
        gamma = np.broadcast_to(np.asarray(e.gamma, np.float32), (e.n_rows,))
        plan.append((name, e, rows, rng.permutation(gamma), raw_rows(view[torch.from_numpy(rows)], e.dtype)))

    def make(strength):
        edits = {}
        for name, e, rows, gamma, raw in plan:
            g = (1.0 - strength * (1.0 - gamma.astype(np.float64))).astype(np.float32)
            edits[name] = make_edit(name, e.shape, e.dtype, rows, raw, gamma=g)
        made = Patch(edits=edits, provenance={"params": patch.provenance.get("params")})
        return _control_patch(patch, made, "random-neurons", seed, strength)

    return [("random-neurons", make)]


def edit_norm(patch: Patch, rows_of=None) -> float:
    """sqrt of the sum of squared changes of the edited rows: the size of the edit, matched by the
    controls. A scale edit changes row w by (gamma - 1) * w, so it needs the base rows: `rows_of(name,
    rows)` gives their raw bytes (a Checkpoint's `read_rows`, or `model_rows(model)`)."""
    total = 0.0
    for name, e in patch.edits.items():
        if e.encoding == "replace":
            continue
        if e.encoding == "scale":
            if rows_of is None:
                raise UnsupportedError(f"tensor {name}: the size of a scale edit needs the base rows")
            w = to_float(rows_of(name, e.rows), e.dtype).reshape(e.n_rows, -1).astype(np.float64)
            change = (np.broadcast_to(e.gamma.astype(np.float64), (e.n_rows,)) - 1.0)[:, None] * w
        else:
            change = e.deltas().astype(np.float64)
        total += float((change ** 2).sum())
    return math.sqrt(total)


def model_rows(model):
    """`rows_of(name, rows)` for a model in memory: the raw bytes of those rows as the model holds them
    (offloaded weights read through accelerate's hooks); None for a tensor the model does not have."""
    tensors = state_tensors(model)

    def rows_of(name: str, rows) -> np.ndarray | None:
        t = tensor_for(tensors, name)
        return None if t is None else raw_rows(row_view(t)[torch.from_numpy(np.array(rows, dtype=np.int64))], DTYPE_NAMES[t.dtype])
    return rows_of


def rows_intact(model, patch: Patch) -> bool:
    """The touched rows hold exactly the patch's base bytes (the patch is not applied)."""
    rows_of = model_rows(model)
    for name, e in patch.edits.items():
        raw = rows_of(name, e.rows)
        if raw is None or rows_hash(raw) != e.base_sha256:
            return False
    return True
