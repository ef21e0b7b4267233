"""The method's steps wired together for the commands: where a model is, loading it, training a probe.

- `resolve_model(ref)`: any model reference (`embedded`, `embedded:NAME`, a folder, `OWNER/NAME[@REV]`,
  `hf://OWNER/NAME[@REV]`) -> (folder, Hub repo id or None, commit or None); every command that takes
  a model goes through it (probe, compute, eval, tune, apply --push).
- `load_model(path, dtype, device_map=, max_memory=)`: the one place a causal LM is loaded.
- `train_probe_for`: data (labelled text) -> activations (features, cached) -> probe; the command
  line's `probe` calls it. `checkpoint_for_compute`: the checkpoint `compute` reads (from the Hub,
  only the shards that hold the target tensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.checkpoint import Checkpoint
from ..core.choices import values
from ..errors import DataError
from .choices import DeviceMap
from ..share.sources import ModelSource, is_hub_model, model_source

DEFAULT_MAX_LENGTH = 128


def cache_root() -> Path:
    return Path(os.environ.get("PATCHKIT_CACHE") or Path.home() / ".cache" / "patchkit")


def resolve_model(ref: str, allow_patterns: list[str] | None = None) -> ModelSource:
    """(folder, Hub repo id or None, commit or None) for a model reference: `embedded[:NAME]`, a
    checkpoint folder, or a Hub model `OWNER/NAME[@REVISION]` / `hf://OWNER/NAME[@REVISION]`
    (fetched into the HF cache; with `allow_patterns`, only those weight files)."""
    from .embedded import embedded_model_path, parse_embedded

    name = parse_embedded(str(ref))
    if name is not None:
        return ModelSource(embedded_model_path(name), None, None)
    return model_source(str(ref), allow_patterns)


def resolve_model_arg(model: str) -> Path:
    """The checkpoint folder of a model reference (`resolve_model(model).path`)."""
    return resolve_model(model).path


def is_hub_id(model: str) -> bool:
    """Whether the model reference names a Hub model (nothing is fetched)."""
    from .embedded import parse_embedded

    return parse_embedded(str(model)) is None and is_hub_model(str(model))


def load_model(path: Path, dtype=None, *, device_map: str | None = None, max_memory: str | dict | None = None):
    """(model, tokenizer) from a local checkpoint folder, the model in eval mode; float32 by default
    (fast matmuls on CPU), the checkpoint's own dtype when accelerate places it. The one place patchkit loads a causal LM (probe, eval, tune, the embedded
    model). `device_map` (`auto`, `cpu`, `cuda`) and `max_memory` (a size such as `2GiB` for each
    device, or accelerate's per-device dict; alone it implies `device_map="auto"`) are passed to
    `from_pretrained` (accelerate's big-model inference)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and not isinstance(device_map, dict) and device_map not in values(DeviceMap):
        raise DataError(f"device map {device_map!r}: use one of {', '.join(values(DeviceMap))} (or accelerate's dict)")
    kw = {}
    if max_memory is not None:
        kw["max_memory"] = max_memory if isinstance(max_memory, dict) else memory_budget(max_memory)
        device_map = device_map or "auto"
    if device_map is not None:
        # placed by accelerate: the checkpoint's own dtype (float32 would double what must fit), and a
        # folder for what spills to disk that the checkpoint's files cannot serve (fused experts)
        import shutil
        import tempfile
        import weakref

        kw["device_map"] = device_map
        kw["offload_folder"] = tempfile.mkdtemp(prefix="patchkit-offload-")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or ("auto" if kw else torch.float32), **kw)
    if "offload_folder" in kw:
        weakref.finalize(model, shutil.rmtree, kw["offload_folder"], True)
    tok = AutoTokenizer.from_pretrained(path)
    return model.eval(), tok


def memory_budget(size: str) -> dict:
    """`--max-memory SIZE` as accelerate's dict: SIZE for the CPU and for each visible GPU."""
    import re

    import torch

    if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", str(size).strip()):
        raise DataError(f"max memory {size!r} is not a size: write it as 2GiB, 1500MB or a number of bytes")
    size = int(size) if str(size).strip().isdigit() else str(size).strip()  # bytes, or a size accelerate reads
    budget = {"cpu": size}
    budget.update({i: size for i in range(torch.cuda.device_count())})
    return budget


def load_data(data: str, text_field="text", label_field="label", behavior=None, split="train", model=None):
    """Labelled data from a file or ``builtin:NAME``; ``model`` (a checkpoint folder) is the model whose
    own text ``builtin:toxicity-self`` is (default: the embedded SmolLM2)."""
    from .data import builtin_dataset, load_labelled

    if data.startswith("builtin:"):
        return builtin_dataset(data.split(":", 1)[1], split=split, model=model)
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
    device_map: str | None = None,
    max_memory: str | None = None,
) -> ProbeRun:
    """Extract pooled features of `data` from `model` (cached) and train the probe; `device_map` and
    `max_memory` go to `load_model`."""
    from .activations import FeatureCache, FeatureKey, extract_features, extract_gate_inputs
    from .probe import train_layer_probes, train_probe

    path, repo_id, revision = resolve_model(model)
    ck = Checkpoint(path)
    fingerprint = ck.fingerprint()
    labelled = load_data(data, text_field, label_field, behavior, model=path)
    cache = FeatureCache(cache_root() / "features")
    loaded = []

    def model_and_tok():
        if not loaded:
            loaded.append(load_model(path, device_map=device_map, max_memory=max_memory))
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
    if repo_id is not None:
        from dataclasses import replace

        probe = replace(probe, model_source=f"{repo_id}@{revision}")
    return ProbeRun(probe, cached=not loaded, model_path=path)


def checkpoint_for_compute(model: str, target: str | None = None) -> tuple[Checkpoint, str | None, str | None]:
    """(checkpoint, Hub model id, Hub commit) for `compute`. A Hub model is fetched as its config and
    index first, then only the shards that hold the target tensors."""
    if not is_hub_id(model):
        return Checkpoint(resolve_model(model).path), None, None
    import re

    from .targets import family_for

    meta = Checkpoint(resolve_model(model, allow_patterns=[]).path, partial=True)
    files = None  # an unsharded model: its one weights file
    if meta.index is not None:
        patterns = [re.compile(target)] if target else [re.compile(t.pattern) for t in family_for(meta).targets]
        files = sorted({rel for name, rel in meta.index.items() if any(p.search(name) for p in patterns)})
    folder, repo_id, revision = resolve_model(model, allow_patterns=files)
    return Checkpoint(folder, partial=True), repo_id, revision
