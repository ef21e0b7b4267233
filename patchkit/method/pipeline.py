"""The probe step end to end: model and data in, a trained probe file out.

Composes hub/checkpoint (where the model is), data (labelled text), activations (features, cached)
and probe (training). The command line's `probe` calls `train_probe_file`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.checkpoint import Checkpoint
from ..errors import CheckpointError
from ..share.sources import resolve_model

DEFAULT_MAX_LENGTH = 128
EMBEDDED_NAMES = ("embedded", "smollm2")


def cache_root() -> Path:
    return Path(os.environ.get("PATCHKIT_CACHE") or Path.home() / ".cache" / "patchkit")


def resolve_model_arg(model: str) -> Path:
    """A checkpoint folder for a model argument: a folder, a Hub id, or `embedded` (SmolLM2-135M)."""
    if model in EMBEDDED_NAMES:
        from .embedded import embedded_model_path

        return embedded_model_path()
    path = resolve_model(model)
    if not path.is_dir():
        raise CheckpointError(f"model {model} is neither a checkpoint folder nor a Hub id")
    return path


def load_model(path: Path, dtype=None):
    """(model, tokenizer) from a local checkpoint folder; float32 by default (fast matmuls on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    return model.eval(), tok


def load_data(data: str, text_field="text", label_field="label", behavior=None, split="train"):
    from .data import builtin_dataset, load_labelled

    if data.startswith("builtin:"):
        return builtin_dataset(data.split(":", 1)[1], split=split)
    return load_labelled(Path(data), text_field=text_field, label_field=label_field, behavior=behavior)


@dataclass
class ProbeRun:
    probe: object
    cached: bool
    model_path: Path


def train_probe_for(
    model: str,
    data: str,
    *,
    text_field="text",
    label_field="label",
    behavior=None,
    layer: int = -1,
    pool: str = "mean",
    layer_matched: bool = False,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    epochs: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> ProbeRun:
    """Extract pooled features of `data` from `model` (cached) and train the probe."""
    from .activations import FeatureCache, FeatureKey, extract_features, extract_gate_inputs
    from .probe import train_layer_probes, train_probe

    path = resolve_model_arg(model)
    ck = Checkpoint(path)
    fingerprint = ck.fingerprint()
    labelled = load_data(data, text_field, label_field, behavior)
    cache = FeatureCache(cache_root() / "features")
    loaded = []

    def model_and_tok():
        if not loaded:
            loaded.append(load_model(path))
        return loaded[0]

    def extract():
        m, tok = model_and_tok()
        return extract_features(m, tok, list(labelled.texts), layer=layer, pool=pool, batch_size=batch_size,
                                max_length=max_length, progress=progress)

    key = FeatureKey(fingerprint, labelled.content_hash, layer, pool, max_length)
    feats = cache.features(key, extract) if use_cache else extract()
    kw = dict(seed=seed, label_names=tuple(labelled.label_names), layer=layer, pool=pool,
              model_fingerprint=fingerprint, data_hash=labelled.content_hash)
    if epochs is not None:
        kw["epochs"] = epochs
    probe = train_probe(feats, list(labelled.labels), **kw)
    if layer_matched:
        gkey = FeatureKey(fingerprint, labelled.content_hash, "gate-inputs", pool, max_length)
        hit = cache.load(gkey) if use_cache else None
        if hit is None:
            m, tok = model_and_tok()
            per_layer = extract_gate_inputs(m, tok, list(labelled.texts), pool=pool, batch_size=batch_size,
                                            max_length=max_length, progress=progress)
            if use_cache:
                cache.save(gkey, {f"layer.{i}": t for i, t in per_layer.items()})
        else:
            per_layer = {int(k.split(".")[1]): v for k, v in hit.items()}
        probe = train_layer_probes(per_layer, list(labelled.labels), probe)
    if is_hub_id(model):
        from dataclasses import replace

        probe = replace(probe, model_source=f"{model.split('@')[0]}@{path.name}")  # the snapshot folder is the commit
    return ProbeRun(probe, cached=not loaded, model_path=path)


def is_hub_id(model: str) -> bool:
    from ..share.sources import HUB_ID

    return model not in EMBEDDED_NAMES and not Path(model).exists() and bool(HUB_ID.match(model))


def checkpoint_for_compute(model: str, target: str | None = None) -> tuple[Checkpoint, str | None, str | None]:
    """(checkpoint, Hub model id, Hub commit) for `compute`. A Hub model is fetched as its config and
    index first, then only the shards that hold the target tensors."""
    if not is_hub_id(model):
        return Checkpoint(resolve_model_arg(model)), None, None
    import re

    from ..share.download import download_model
    from .targets import family_for

    meta = Checkpoint(download_model(model, allow_patterns=[]), partial=True)
    files = None  # an unsharded model: its one weights file
    if meta.index is not None:
        patterns = [re.compile(target)] if target else [re.compile(t.pattern) for t in family_for(meta).targets]
        files = sorted({rel for name, rel in meta.index.items() if any(p.search(name) for p in patterns)})
    folder = download_model(model, allow_patterns=files)
    return Checkpoint(folder, partial=True), model.split("@")[0], folder.name
