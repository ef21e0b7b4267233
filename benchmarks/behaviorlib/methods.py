"""The projection and damping patches of the benchmark, from cached features of their data.

``Methods`` reads each data set's features once (every decoder layer's mean-pooled output for
projection, the max-pooled ``down_proj`` inputs' AUROCs for damping; the model in float32, as
``patchkit compute --method projection`` reads it) and caches them under the work folder, so that a
grid of strengths, layer ranges and modules, and the label-shuffled controls, cost no extra pass.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

DATA = {"self": "builtin:toxicity-self", "toxigen": "builtin:toxicity"}
LAYER_RANGES = {"all": (0, 29), "5-29": (5, 29), "10-29": (10, 29), "15-29": (15, 29), "20-29": (20, 29), "10-24": (10, 24)}


def layer_range(spec: str) -> list[int]:
    a, b = LAYER_RANGES.get(spec) or tuple(int(x) for x in spec.split("-"))
    return list(range(a, b + 1))


class Methods:
    def __init__(self, model, tok, path, fingerprint, workdir, log=print):
        self.model, self.tok, self.path, self.fingerprint = model, tok, path, fingerprint
        self.workdir, self.log = workdir, log
        self._data, self._feats, self._au = {}, {}, {}
        self.sources = {}  # name -> data spec, overriding DATA (the quick run's small self-labelled file)
        os.makedirs(workdir, exist_ok=True)

    def data(self, name):
        if name not in self._data:
            from patchkit.method.pipeline import load_data

            self._data[name] = load_data(self.sources.get(name) or DATA.get(name, name))
        return self._data[name]

    def _cache(self, name, what):
        d = self.data(name)
        key = hashlib.sha256(f"{self.fingerprint}:{d.content_hash}:{what}".encode()).hexdigest()[:20]
        return os.path.join(self.workdir, f"{what}-{name}-{key}.npz")

    def _per_layer(self, name, what, compute, done):
        """{layer: array} of data set ``name``: from the cache file of ``what``, or ``compute(data)`` run
        on the model in float32 (then cached, and ``done`` logged)."""
        from patchkit.evaluation.evaluate import float32_view

        path, d = self._cache(name, what), self.data(name)
        if os.path.exists(path):
            z = np.load(path)
            return {int(k[1:]): z[k] for k in z.files}
        with float32_view(self.model):
            out = compute(d)
        _save_npz(path, {f"l{k}": v for k, v in out.items()})
        self.log(f"{done} of {name} ({len(d)} texts) computed")
        return out

    def features(self, name):
        """({layer: float32 [n, hidden]} for every decoder layer, labels) of data set ``name``."""
        if name not in self._feats:
            from patchkit.method.projection import layer_features

            n_layers = self.model.config.num_hidden_layers
            feats = self._per_layer(name, "layers", lambda d: layer_features(self.model, self.tok, d.texts, range(n_layers),
                                                                             batch_size=16), f"features ({n_layers} layers)")
            self._feats[name] = (feats, list(self.data(name).labels))
        return self._feats[name]

    def aurocs(self, name):
        """{layer: AUROC of each MLP neuron's max-pooled activation} on data set ``name``."""
        if name not in self._au:
            from patchkit.method.damping import auroc, neuron_activations

            def compute(d):
                return {l: auroc(a, d.labels) for l, a in neuron_activations(self.model, self.tok, d.texts).items()}

            self._au[name] = self._per_layer(name, "auroc", compute, "neuron AUROCs")
        return self._au[name]

    def projection(self, name, lam, layers, rank=1, modules=("mlp",)):
        from patchkit.method.projection import directions_from_features, projection_patch

        feats, labels = self.features(name)
        dirs, quality = directions_from_features(feats, labels, layers, rank)
        p = projection_patch(self.path, lam=lam, layers=layers, rank=rank, modules=modules, directions=dirs, quality=quality)
        d = self.data(name)
        p.provenance["data"] = {"source": d.source, "sha256": d.content_hash, "examples": len(d)}
        return p

    def damping(self, name, fraction, layers=None):
        from patchkit.method.damping import damping_patch

        d = self.data(name)
        p = damping_patch(self.path, aurocs=self.aurocs(name), fraction=fraction, layers=layers)
        p.provenance["data"] = {"source": d.source, "sha256": d.content_hash, "examples": len(d)}
        return p

    def make(self, spec):
        """A patch from a condition spec (see conditions.py); with ``file``, the patch file itself (its
        spec then describes it, for its name and its controls' data)."""
        if spec.get("file"):
            from patchkit.core.patchfile import Patch

            return Patch.load(os.path.join(os.path.dirname(__file__), "..", "..", spec["file"]))
        if spec["method"] == "projection":
            return self.projection(spec["data"], spec["lam"], layer_range(spec["layers"]), spec.get("rank", 1),
                                   tuple(spec.get("modules", ("mlp",))))
        if spec["method"] == "damping":
            return self.damping(spec["data"], spec["fraction"], None if spec.get("layers") is None else layer_range(spec["layers"]))
        raise ValueError(f"unknown method {spec['method']}")

    def controls(self, spec, patch, seed):
        """[(kind, build(strength))] of the patch (patchkit.evaluation.controls), from the cached features."""
        from patchkit.evaluation.controls import control_builders

        feats = self.features(spec["data"]) if spec["method"] == "projection" else None
        return control_builders(self.model, patch, seed, features=feats, checkpoint=str(self.path))


def spec_name(spec) -> str:
    if spec["method"] == "projection":
        mods = "+".join(spec.get("modules", ("mlp",)))
        r = f" r{spec['rank']}" if spec.get("rank", 1) != 1 else ""
        return f"projection {spec['data']} {mods} L{spec['layers']} λ{spec['lam']:g}{r}" + (" (patch file)" if spec.get("file") else "")
    if spec["method"] == "damping":
        return f"damping {spec['data']} top {100 * spec['fraction']:g}%"
    return spec.get("name", spec["method"])


def _save_npz(path, arrays):
    tmp = f"{path}.tmp{os.getpid()}.npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
