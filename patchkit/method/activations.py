"""Feature extraction: pooled hidden states of a decoder-only transformers model, read with hooks.

Layer convention (``layer`` argument):

* ``-1`` — the final hidden state *after the final norm*, i.e. ``output_hidden_states[-1]`` of the
  model (what the probe of the paper reads). Computed with one full pass of the base model.
* ``i`` in ``0 .. L-1`` — the output of decoder layer ``i`` (the residual stream after that layer,
  before any final norm). For ``i < L-1`` this equals ``output_hidden_states[i + 1]``; for
  ``i = L-1`` it is the un-normed value that ``output_hidden_states`` does not contain. The forward
  pass stops right after layer ``i``.

Texts are tokenized one by one (truncated to ``max_length`` tokens), sorted by length into
batches, padded here (no pad token needed) and run with ``position_ids`` counted over real tokens,
so left and right padding give the same features. Pooling masks padding out: ``mean`` averages
the real tokens, ``last`` takes the last real token. Nothing is kept for autograd; features are
float32 whatever the model's dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..core.choices import values
from ..errors import DataError, UnsupportedError
from .choices import Pool

POOLS = tuple(values(Pool))
DEFAULT_MAX_LENGTH = 256


def input_device(model) -> torch.device:
    """Where a model's inputs go: accelerate's execution device when it dispatched the model (its
    weights may all be offloaded, on the meta device), else the device of its first real weight."""
    dev = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@contextlib.contextmanager
def hooked(registrations: Iterable[tuple[nn.Module, str, Callable[..., Any]]]) -> Iterator[list[Any]]:
    """Register hooks for the ``with`` block and always remove them, even on exceptions.

    Each registration is ``(module, kind, fn)`` with kind ``"forward"`` (``fn(module, args, output)``)
    or ``"pre"`` (``fn(module, args, kwargs)``, registered ``with_kwargs=True``).
    """
    handles: list[Any] = []
    try:
        for module, kind, fn in registrations:
            if kind == "forward":
                handles.append(module.register_forward_hook(fn))
            elif kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                raise ValueError(f"unknown hook kind {kind!r}")
        yield handles
    finally:
        for handle in handles:
            handle.remove()


class _Stop(Exception):
    """Raised by a hook to end the forward pass once the wanted layer has run."""


def _attr(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _families(model: nn.Module) -> list[Any]:
    """The architecture table's entry for the model's config.model_type, else every entry in order."""
    from .targets import FAMILIES, family_named

    fam = family_named(getattr(getattr(model, "config", None), "model_type", None))
    return [fam] if fam is not None else list(FAMILIES)


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """(base model, decoder layers, final norm) of a decoder-only model or its ``*ForCausalLM``,
    found through the paths of the architecture table (`patchkit.method.targets`)."""
    base = getattr(model, "base_model", model)
    for fam in _families(model):
        for layers_path in fam.layers:
            layers = _attr(base, layers_path)
            if not isinstance(layers, nn.ModuleList):
                continue
            for norm_path in fam.norm:
                norm = _attr(base, norm_path)
                if isinstance(norm, nn.Module):
                    return base, layers, norm
    raise UnsupportedError(
        f"{type(model).__name__}: no decoder layers and final norm found; use an architecture of docs/architectures.md"
    )


def gate_input_modules(model: nn.Module) -> list[nn.Module]:
    """Per decoder layer, the module whose input is what the edited gate reads (the MLP, the MoE
    block, or OPT's ``fc1``), from the architecture table."""
    _base, layers, _norm = decoder_parts(model)
    for fam in _families(model):
        for path in fam.gate_input:
            mods = [_attr(layer, path) for layer in layers]
            if all(isinstance(m, nn.Module) for m in mods):
                return mods
    raise UnsupportedError(f"{type(model).__name__}: no MLP module found in its decoder layers; use an architecture of docs/architectures.md")


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    hidden = hidden.float()
    keep = mask.bool().unsqueeze(-1)
    if pool == "mean":
        total = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype)).sum(dim=1)
        return total / mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    if not texts:
        raise DataError("no texts to extract features from; pass at least one text")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    ids = [list(x) for x in enc["input_ids"]]
    for i, row in enumerate(ids):
        if not row:
            raise DataError(f"text {i} has no tokens; remove empty texts")
    return ids


def token_batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int, padding_side: str
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(original indices, model inputs) per batch, longest texts first, padded on ``padding_side``."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if padding_side not in ("right", "left"):
        raise ValueError("padding_side must be 'right' or 'left'")
    ids = _tokenize(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(ids[i])
            sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
            input_ids[row, sl] = torch.tensor(ids[i], dtype=torch.long)
            mask[row, sl] = 1
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        yield chunk, {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, desc=desc, unit="text", leave=False)


def extract_features(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int = -1,
    pool: str = "mean",
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = True,
    padding_side: str = "right",
) -> torch.Tensor:
    """Pooled hidden states, ``[len(texts), hidden]`` float32, rows in the order of ``texts``."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}")
    base, layers, _norm = decoder_parts(model)
    if not (layer == -1 or 0 <= layer < len(layers)):
        raise UnsupportedError(f"layer {layer} does not exist; use -1 (final, normed) or 0..{len(layers) - 1}")
    device = input_device(model)
    out: torch.Tensor | None = None
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    regs = [] if layer == -1 else [(layers[layer], "forward", grab)]
    with torch.no_grad(), _eval_mode(model), hooked(regs), _progress(len(texts), progress, "features") as bar:
        for chunk, inputs in token_batches(tokenizer, texts, batch_size, max_length, padding_side):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            captured.clear()
            try:
                hidden = base(**inputs, use_cache=False).last_hidden_state
            except _Stop:
                hidden = captured[0]
            pooled = _pool(hidden, inputs["attention_mask"], pool).cpu()
            if out is None:
                out = torch.empty((len(texts), pooled.shape[1]), dtype=torch.float32)
            out[torch.tensor(chunk)] = pooled
            bar.update(len(chunk))
    assert out is not None
    return out


def extract_gate_inputs(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    pool: str = "mean",
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = True,
    padding_side: str = "right",
) -> dict[int, torch.Tensor]:
    """Per decoder layer, the pooled input of its MLP (the post-attention-norm output, exactly what
    ``mlp.gate_proj`` reads; the MoE block's input for MoE models, OPT's ``fc1`` input: see
    :func:`gate_input_modules`): ``{layer index: [len(texts), hidden] float32}``. ``layers``
    defaults to all; the pass stops after the highest one asked for."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}")
    base, all_layers, _norm = decoder_parts(model)
    gates = gate_input_modules(model)
    wanted = sorted(set(range(len(all_layers)) if layers is None else layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= len(all_layers):
        raise UnsupportedError(f"layers {list(layers or [])} out of range; use 0..{len(all_layers) - 1}")
    device = input_device(model)
    out: dict[int, torch.Tensor] = {}
    batch_mask: list[torch.Tensor] = []

    def make_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            mask = batch_mask[0]
            if x.ndim == 2:  # tokens flattened (OPT's fc1): back to [batch, seq, hidden]
                x = x.reshape(mask.shape[0], mask.shape[1], -1)
            out.setdefault(index, torch.empty((len(texts), x.shape[-1]), dtype=torch.float32))
            pooled[index] = _pool(x, mask, pool).cpu()
            if index == wanted[-1]:
                raise _Stop

        return hook

    pooled: dict[int, torch.Tensor] = {}
    regs = [(gates[i], "pre", make_hook(i)) for i in wanted]
    with torch.no_grad(), _eval_mode(model), hooked(regs), _progress(len(texts), progress, "gate inputs") as bar:
        for chunk, inputs in token_batches(tokenizer, texts, batch_size, max_length, padding_side):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            batch_mask[:] = [inputs["attention_mask"]]
            pooled.clear()
            try:
                base(**inputs, use_cache=False)
            except _Stop:
                pass
            index = torch.tensor(chunk)
            for i in wanted:
                out[i][index] = pooled[i]
            bar.update(len(chunk))
    return out


# ----------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class FeatureKey:
    """What a cached feature tensor depends on. ``layer`` is an int or ``"gate-inputs"``."""

    model: str
    data: str
    layer: int | str
    pool: str
    max_length: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:40]


class FeatureCache:
    """Extracted features on disk as ``.safetensors`` (never pickle), one file per :class:`FeatureKey`."""

    FORMAT = "patchkit-features"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, key: FeatureKey) -> Path:
        return self.directory / f"{key.digest()}.safetensors"

    def load(self, key: FeatureKey) -> dict[str, torch.Tensor] | None:
        """The stored tensors, or None when absent, unreadable or stored under another key."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != self.FORMAT or json.loads(meta.get("key", "null")) != asdict(key):
                    return None
                return {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception:  # a damaged cache file is a miss, recomputed and overwritten
            return None

    def save(self, key: FeatureKey, tensors: dict[str, torch.Tensor]) -> Path:
        """Write atomically (temp file in the same folder, then ``os.replace``)."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.directory)
        os.close(fd)
        try:
            meta = {"format": self.FORMAT, "key": json.dumps(asdict(key), sort_keys=True)}
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def features(self, key: FeatureKey, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached ``[n, hidden]`` tensor for ``key``, computing and storing it on a miss."""
        hit = self.load(key)
        if hit is not None and "features" in hit:
            return hit["features"]
        value = compute()
        self.save(key, {"features": value})
        return value

    def gate_inputs(self, key: FeatureKey, compute: Callable[[], dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Like :meth:`features` for the per-layer output of :func:`extract_gate_inputs`."""
        hit = self.load(key)
        if hit is not None and hit and all(k.startswith("layer.") for k in hit):
            return {int(k.split(".", 1)[1]): v for k, v in sorted(hit.items(), key=lambda kv: int(kv[0].split(".")[1]))}
        value = compute()
        self.save(key, {f"layer.{i}": t for i, t in value.items()})
        return value
