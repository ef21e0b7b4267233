"""Patches on models in memory: a transformers model or a state dict, edited in place and restored.

The arithmetic is the one apply uses on files (float32, rounded once to the tensor's dtype), so a
model patched in memory holds exactly the bits of the patched checkpoint loaded from disk.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.patchfile import Patch, rows_hash
from ..errors import BaseMismatchError

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_VIEW = {"F32": torch.int32, "F16": torch.int16, "BF16": torch.int16, "F64": torch.int64}


@dataclass
class Undo:
    """The original rows of every tensor a patch changed in memory."""

    patch_id: str
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def state_tensors(target) -> dict[str, torch.Tensor]:
    if isinstance(target, torch.nn.Module):
        return dict(target.state_dict(keep_vars=True))
    return target


# Checkpoint names of MoE experts -> (in-memory fused tensor, part): transformers keeps every expert of a
# layer in one [E, 2I, H] `gate_up_proj` (gate = first I rows, as its forward's chunk(2)) and one
# [E, H, I] `down_proj`, but saves them per expert under the older names.
_EXPERT_NAMES = (
    (re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight$"), ".mlp.experts", {"1": "gate", "3": "up", "2": "down"}),
    (re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$"), ".mlp.experts", {"gate": "gate", "up": "up", "down": "down"}),
)


def tensor_for(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The tensor (or the view of a fused tensor) that holds checkpoint tensor `name` in memory."""
    if name in tensors:
        t = tensors[name]
        return t.data if isinstance(t, torch.nn.Parameter) else t
    for rx, module, parts in _EXPERT_NAMES:
        m = rx.match(name)
        if not m:
            continue
        prefix, expert, part = m.group(1), int(m.group(2)), parts[m.group(3)]
        fused = tensors.get(f"{prefix}{module}.{'down_proj' if part == 'down' else 'gate_up_proj'}")
        if fused is None:
            return None
        fused = fused.data if isinstance(fused, torch.nn.Parameter) else fused
        if part == "down":
            return fused[expert]
        half = fused.shape[1] // 2
        return fused[expert, :half] if part == "gate" else fused[expert, half:]
    return None


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
        t = tensor_for(tensors, name)
        if t is None:
            raise BaseMismatchError(f"the model has no tensor {name}: the patch was made for another model", tensor=name)
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
        planned.append((name, t, idx, old, new))
    undo = Undo(patch.id)
    with torch.no_grad():
        for name, t, idx, old, new in planned:
            row_view(t)[idx] = new.to(t.device)
            undo.rows[name] = (idx, old)
    return undo


def revert_in_memory(target, undo: Undo) -> None:
    """Put back the original rows recorded by `apply_in_memory`, bit for bit."""
    tensors = state_tensors(target)
    with torch.no_grad():
        for name, (idx, old) in undo.rows.items():
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
