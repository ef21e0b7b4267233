"""Which tensors a behaviour edit targets, per architecture family, as data.

Each family says which checkpoint tensors hold the MLP gate (the paper edits the rows of
`mlp.gate_proj.weight`), along which axis a neuron's input weights lie, and which part of a fused
tensor is the gate. `--target REGEX --axis N` covers anything the table lacks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .checkpoint import Checkpoint
from .errors import UnsupportedError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    target: str  # regex over checkpoint tensor names; group "layer" is the decoder layer index
    axis: int = 0  # 0: a neuron's input weights are a row; 1: a column (transposed storage)
    supported: bool = True  # False: listed, but compute does not handle it yet
    note: str = ""


_GATE = r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(?P<layer>\d+)\.mlp\.gate_proj\.weight$"

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "smollm3"), _GATE),
    Family("mistral", ("mistral",), _GATE),
    Family("qwen2", ("qwen2",), _GATE),
    Family("qwen3", ("qwen3",), _GATE),
    Family("gemma", ("gemma", "gemma2", "gemma3", "gemma3_text"), _GATE),
    Family("phi3", ("phi3",), r"^model\.layers\.(?P<layer>\d+)\.mlp\.gate_up_proj\.weight$", supported=False,
           note="fused gate_up_proj: only the first half of the rows is the gate"),
    Family("gpt2", ("gpt2",), r"^(?:transformer\.)?h\.(?P<layer>\d+)\.mlp\.c_fc\.weight$", axis=1, supported=False,
           note="Conv1D stores weights transposed: a neuron is a column"),
    Family("gpt_neox", ("gpt_neox",), r"^gpt_neox\.layers\.(?P<layer>\d+)\.mlp\.dense_h_to_4h\.weight$", supported=False),
    Family("mixtral", ("mixtral",), r"^model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.\d+\.w1\.weight$", supported=False),
)


def family_for(ck: Checkpoint) -> Family:
    model_type = ck.config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    names = list(ck.tensors)
    for fam in FAMILIES:
        if any(re.match(fam.target, n) for n in names):
            return fam
    raise UnsupportedError(
        f"architecture {model_type or '(no model_type in config.json)'} is not supported yet; "
        "name the tensors to edit with --target REGEX --axis 0"
    )


@dataclass(frozen=True)
class Targets:
    """The tensors to score and edit, in layer order, with the axis a neuron lies along."""

    names: tuple[str, ...]
    layers: tuple[int | None, ...]
    axis: int
    family: str


def resolve_targets(ck: Checkpoint, target: str | None = None, axis: int = 0) -> Targets:
    if target is not None:
        try:
            rx = re.compile(target)
        except re.error as e:
            raise UnsupportedError(f"--target {target!r} is not a valid regular expression ({e})") from None
        family, ax = "custom", axis
    else:
        fam = family_for(ck)
        if not fam.supported:
            raise UnsupportedError(f"architecture {fam.name} is not supported yet ({fam.note}); name the tensors with --target REGEX --axis N")
        rx, family, ax = re.compile(fam.target), fam.name, fam.axis
    found = []
    for name in ck.tensors:
        m = rx.search(name)
        if m:
            layer = m.groupdict().get("layer")
            found.append((int(layer) if layer is not None else -1, name))
    if not found:
        raise UnsupportedError(f"no tensor of {ck.path} matches {rx.pattern!r}")
    found.sort(key=lambda t: (t[0], t[1]))
    shapes = {tuple(ck.tensors[n].shape[1:]) if ax == 0 else tuple(ck.tensors[n].shape[:1]) for _, n in found}
    if len(shapes) > 1 or any(len(ck.tensors[n].shape) != 2 for _, n in found):
        raise UnsupportedError(f"the tensors matching {rx.pattern!r} are not 2-d with one common input size: {sorted(shapes)}")
    if ax != 0:
        raise UnsupportedError("--axis 1 (transposed weights) is not supported by compute yet")
    return Targets(tuple(n for _, n in found), tuple(l if l >= 0 else None for l, _ in found), ax, family)
