"""Patches on models in memory: a transformers model or a state dict, edited in place and restored.

The arithmetic is the one apply uses on files (float32, rounded once to the tensor's dtype), so a
model patched in memory holds exactly the bits of the patched checkpoint loaded from disk.

A model loaded with accelerate's big-model inference (``device_map``, ``max_memory``) keeps some
weights out of the module: the parameter is on the ``meta`` device and the hook on its module
(``module._hf_hook``, an ``AlignDevicesHook`` with ``offload=True``) loads it from its
``weights_map`` (CPU tensors, or safetensors files on disk) before each forward. Those weights are
read through that map, and patched by putting an overlay in front of it: the map's own storage
(the checkpoint's files, possibly) is never written; the overlay writes the patched rows into each
tensor it hands to the forward, and reverting removes them, so the base bytes come back untouched.
The weights such a model keeps in memory are patched in place, as usual; tied weights (input and
output embeddings), which a dispatched model loads under each of their names, get the rows under each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.patchfile import Patch, rows_hash
from ..errors import BaseMismatchError, UnsupportedError

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_VIEW = {"F32": torch.int32, "F16": torch.int16, "BF16": torch.int16, "F64": torch.int64}


@dataclass
class Undo:
    """The original rows of every tensor a patch changed in memory."""

    patch_id: str
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    offloaded: dict[str, tuple["_OffloadedTensors", list[tuple]]] = field(default_factory=dict)  # accelerate-dispatched models


def state_tensors(target) -> Mapping[str, torch.Tensor]:
    """Name -> tensor of a model or state dict. When accelerate has offloaded some of a model's
    weights, the offloaded ones are read from where they are kept (with any patch in memory applied)."""
    if isinstance(target, torch.nn.Module):
        params = dict(target.state_dict(keep_vars=True))
        if any(t.device.type == "meta" for t in params.values()):
            return _OffloadedTensors(target, params)
        return params
    return target


def _align_hooks(module: torch.nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", None) or [hook])


class _Overlay(Mapping):
    """Stands in front of an offload hook's ``weights_map``: the tensors it hands out carry the
    rows patched in memory; the map behind it is never written."""

    def __init__(self, hook):
        self.hook, self.base = hook, hook.weights_map
        self.edits: dict[str, list[tuple[object, object, torch.Tensor, torch.Tensor]]] = {}
        hook.weights_map = self

    def __getitem__(self, key):
        t = self.base[key]
        if not self.edits.get(key):
            return t
        t = t.clone()  # the map may hand out its own storage (CPU offload): never write into it
        for _token, view, idx, new in self.edits[key]:
            row_view(view(t))[idx] = new.to(t.device)
        return t

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)

    def add(self, key: str, token: object, view, idx: torch.Tensor, new: torch.Tensor) -> None:
        self.edits.setdefault(key, []).append((token, view, idx, new))

    def remove(self, key: str, token: object) -> None:
        kept = [e for e in self.edits.get(key, []) if e[0] is not token]
        if kept:
            self.edits[key] = kept
        else:
            self.edits.pop(key, None)
        if not self.edits and self.hook.weights_map is self:
            self.hook.weights_map = self.base


class _OffloadedTensors(Mapping):
    """A model's tensors when accelerate keeps some of them outside the modules (``meta`` parameters
    loaded by a hook before each forward): those are read through the hook's weights map."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        self.model, self.params = model, params

    def source(self, key: str) -> tuple[object, str] | None:
        """(the offload hook that loads `key`, `key` in its map), or None if `key` is in memory."""
        t = self.params.get(key)
        if t is None or t.device.type != "meta":
            return None
        parts = key.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            module = self.model.get_submodule(".".join(parts[:cut]))
            local = ".".join(parts[cut:])
            for hook in _align_hooks(module):
                if not getattr(hook, "offload", False) or getattr(hook, "weights_map", None) is None:
                    continue
                if cut == len(parts) - 1 or getattr(hook, "place_submodules", False):
                    return hook, local
        raise UnsupportedError(f"tensor {key} is on the meta device and no offload hook loads it: load the model with its weights")

    def tied_with(self, key: str) -> list[str]:
        """`key` and the other names of the same weight (tied embeddings): once dispatched, they no
        longer share one tensor, and each offloaded name is loaded on its own."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        group = {key}
        for target, source in tied.items():
            if key in (target, source):
                group |= {target, source}
        return [key] + sorted(k for k in group - {key} if k in self.params)

    def write(self, key: str, view, idx: torch.Tensor, new: torch.Tensor, token: object) -> list[tuple]:
        """Put `new` into rows `idx` of `view` of `key` and of every name tied to it: in place for
        a tensor in memory, through an overlay for an offloaded one. Returns what `restore` needs."""
        done, storages = [], set()
        for k in self.tied_with(key):
            src = self.source(k)
            if src is None:
                t = view(self.params[k].data)
                if t.untyped_storage().data_ptr() in storages:
                    continue
                storages.add(t.untyped_storage().data_ptr())
                done.append(("memory", k, view, idx, row_view(t)[idx].clone()))
                row_view(t)[idx] = new.to(t.device)
            else:
                hook, local = src
                overlay = hook.weights_map if isinstance(hook.weights_map, _Overlay) else _Overlay(hook)
                overlay.add(local, token, view, idx, new)
                done.append(("overlay", overlay, local, token))
        return done

    def restore(self, done: list[tuple]) -> None:
        for entry in reversed(done):
            if entry[0] == "overlay":
                entry[1].remove(entry[2], entry[3])
            else:
                _kind, k, view, idx, old = entry
                t = view(self.params[k].data)
                row_view(t)[idx] = old.to(t.device)

    def __getitem__(self, key):
        src = self.source(key)
        if src is None:
            return self.params[key]
        hook, local = src
        return hook.weights_map[local]

    def __contains__(self, key):
        return key in self.params

    def __iter__(self):
        return iter(self.params)

    def __len__(self):
        return len(self.params)


# Checkpoint names of MoE experts -> (in-memory fused tensor, part): transformers keeps every expert of a
# layer in one [E, 2I, H] `gate_up_proj` (gate = first I rows, as its forward's chunk(2)) and one
# [E, H, I] `down_proj`, but saves them per expert under the older names.
_EXPERT_NAMES = (
    (re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight$"), ".mlp.experts", {"1": "gate", "3": "up", "2": "down"}),
    (re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$"), ".mlp.experts", {"gate": "gate", "up": "up", "down": "down"}),
)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def _expert_view(expert: int, part: str):
    def view(fused: torch.Tensor) -> torch.Tensor:
        if part == "down":
            return fused[expert]
        half = fused.shape[1] // 2
        return fused[expert, :half] if part == "gate" else fused[expert, half:]

    return view


def locate(tensors: Mapping[str, torch.Tensor], name: str):
    """(key in `tensors`, function from that tensor to the view holding checkpoint tensor `name`),
    or None when the model has no such tensor."""
    if name in tensors:
        return name, _whole
    for rx, module, parts in _EXPERT_NAMES:
        m = rx.match(name)
        if not m:
            continue
        prefix, expert, part = m.group(1), int(m.group(2)), parts[m.group(3)]
        key = f"{prefix}{module}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
        return (key, _expert_view(expert, part)) if key in tensors else None
    return None


def tensor_for(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The tensor (or the view of a fused tensor) that holds checkpoint tensor `name` in memory."""
    found = locate(tensors, name)
    if found is None:
        return None
    key, view = found
    t = tensors[key]
    return view(t.data if isinstance(t, torch.nn.Parameter) else t)


def row_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor as [rows, cols] sharing storage (rows along the output axis, as in the patch format)."""
    if t.ndim == 0:
        return t.view(1, 1)
    if t.ndim == 1:
        return t.view(1, -1)
    return t.view(-1, t.shape[-1])


def raw_rows(rows: torch.Tensor, dtype: str) -> np.ndarray:
    return rows.detach().cpu().contiguous().view(_VIEW[dtype]).numpy().view(np.uint8).reshape(rows.shape[0], -1)


def apply_in_memory(target, patch: Patch | str, check: bool = True) -> Undo:
    """Apply `patch` to a model or state dict in place; returns what `revert_in_memory` needs."""
    from ..core.plan import load_patch  # a Patch, a path or hf://

    patch = load_patch(patch)
    tensors = state_tensors(target)
    planned = []
    for name in sorted(patch.edits):
        edit = patch.edits[name]
        found = locate(tensors, name)
        if found is None:
            raise BaseMismatchError(f"the model has no tensor {name}: the patch was made for another model", tensor=name)
        t = tensor_for(tensors, name)
        dtype = DTYPE_NAMES.get(t.dtype)
        if tuple(t.shape) != tuple(edit.shape) or dtype != edit.dtype:
            raise BaseMismatchError(
                f"tensor {name} is {dtype} {list(t.shape)} in the model, {edit.dtype} {list(edit.shape)} in the patch", tensor=name
            )
        idx = torch.from_numpy(np.array(edit.rows))  # a loaded patch's arrays are read-only
        old = row_view(t)[idx].clone()
        old_raw = raw_rows(old, dtype)
        if check and rows_hash(old_raw) != edit.base_sha256:
            raise BaseMismatchError(f"the touched rows of tensor {name} differ from the patch's base", tensor=name)
        new_raw = edit.new_rows(old_raw)
        new = torch.from_numpy(new_raw.copy()).view(_VIEW[dtype]).view(t.dtype).reshape(old.shape)
        planned.append((name, found, t, idx, old, new))
    undo = Undo(patch.id)
    token = object()
    with torch.no_grad():
        for name, (key, view), t, idx, old, new in planned:
            if isinstance(tensors, _OffloadedTensors):  # the next forward loads the patched rows
                undo.offloaded[name] = (tensors, tensors.write(key, view, idx, new, token))
            else:
                row_view(t)[idx] = new.to(t.device)
            undo.rows[name] = (idx, old)
    return undo


def revert_in_memory(target, undo: Undo) -> None:
    """Put back the original rows recorded by `apply_in_memory`, bit for bit."""
    tensors = state_tensors(target)
    with torch.no_grad():
        for name, (idx, old) in reversed(undo.rows.items()):
            if name in undo.offloaded:
                applied_to, done = undo.offloaded[name]
                applied_to.restore(done)
                continue
            t = tensor_for(tensors, name)
            row_view(t)[idx] = old.to(t.device)


@contextmanager
def patched(target, *patches, check: bool = True):
    """`with patched(model, patch):` the model is patched inside the block and restored after it."""
    undos = []
    try:
        for p in patches:
            undos.append(apply_in_memory(target, p, check=check))
        yield target
    finally:
        for u in reversed(undos):
            revert_in_memory(target, u)
