"""Which tensors a behaviour edit targets, per architecture family, as data.

The paper edits the MLP gate: the input weights of each gate neuron (a row of a Llama
`mlp.gate_proj.weight`). Each family lists, per checkpoint layout it may be saved in, which tensors
hold the gate (`Target`: a regex with a `layer` group), along which axis a neuron's input weights
lie, and which part of a fused tensor is the gate; and, for `patchkit.method.activations`, where the
decoder layers, the final norm and the module that reads the gate's input are (attribute paths
from the model's `base_model`). `--target REGEX --axis N` covers anything the table lacks.

Neurons. A target of shape (..., R, C) with axis 0 holds prod(...) blocks (experts) of R rows of C
inputs; with `split` > 1 the R rows are `split` equal chunks and chunk `part` is the gate (Phi-3's
`gate_up_proj` is [gate; up]). Gate neuron n = b * G + g (G = R / split) is flat row
b * R + part * G + g. With axis 1 (2-d only, e.g. GPT-2's transposed Conv1D `c_fc.weight` [in, out])
a neuron is a column. This module is torch-free and numpy-free: `compute` imports it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.checkpoint import Checkpoint
from ..errors import DataError, UnsupportedError


@dataclass(frozen=True)
class Target:
    """One layout of a family's gate tensors."""

    pattern: str  # regex over checkpoint tensor names; group "layer" is the decoder layer index
    axis: int = 0  # 0: a neuron's input weights are a row; 1: a column (transposed storage)
    split: int = 1  # the neuron dimension is `split` equal chunks (fused tensors) ...
    part: int = 0  # ... and chunk `part` is the gate
    kind: str = ""  # for `writes` entries: "mlp" or "attn", the sub-block whose output the tensor writes


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    targets: tuple[Target, ...]
    layers: tuple[str, ...] = ("layers",)  # paths from base_model to the decoder layers' ModuleList
    norm: tuple[str, ...] = ("norm",)  # paths from base_model to the final norm
    gate_input: tuple[str, ...] = ("mlp",)  # paths from a decoder layer to the module whose input the gate reads
    supported: bool = True  # False: listed, but compute does not handle it yet
    note: str = ""
    # tensors that write to the residual stream (the projection method edits their output dimension):
    # axis 0 = the output (hidden) dimension is the rows (Linear [hidden, in]); axis 1 = the columns
    # (GPT-2 Conv1D, stored [in, hidden])
    writes: tuple[Target, ...] = ()

    @property
    def target(self) -> str:
        return self.targets[0].pattern

    @property
    def axis(self) -> int:
        return self.targets[0].axis


_P = r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(?P<layer>\d+)\."
_GATE = (Target(_P + r"mlp\.gate_proj\.weight$"),)
_FUSED_EXPERTS = Target(_P + r"mlp\.experts\.gate_up_proj(?:\.weight)?$", split=2)  # [E, 2I, H], as in memory
_LLAMA_PATHS = dict(layers=("layers", "language_model.layers"), norm=("norm", "language_model.norm"))


def _writes(mlp: str, attn: str, prefix: str = _P, axis: int = 0) -> tuple[Target, ...]:
    return (Target(prefix + mlp + r"\.weight$", axis, kind="mlp"), Target(prefix + attn + r"\.weight$", axis, kind="attn"))


_LLAMA_WRITES = _writes(r"mlp\.down_proj", r"self_attn\.o_proj")

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "smollm3"), _GATE, **_LLAMA_PATHS, writes=_LLAMA_WRITES),
    Family("mistral", ("mistral",), _GATE, **_LLAMA_PATHS, writes=_LLAMA_WRITES),
    Family("qwen2", ("qwen2",), _GATE, **_LLAMA_PATHS, writes=_LLAMA_WRITES),
    Family("qwen3", ("qwen3",), _GATE, **_LLAMA_PATHS, writes=_LLAMA_WRITES),
    Family("gemma", ("gemma", "gemma2", "gemma3", "gemma3_text"), _GATE, **_LLAMA_PATHS, writes=_LLAMA_WRITES),
    Family("phi3", ("phi3",), (Target(_P + r"mlp\.gate_up_proj\.weight$", split=2),),
           note="fused gate_up_proj [2I, H]: the first I rows are the gate (chunk(2) in Phi3MLP)", writes=_LLAMA_WRITES),
    Family("mixtral", ("mixtral",), (Target(_P + r"block_sparse_moe\.experts\.\d+\.w1\.weight$"), _FUSED_EXPERTS),
           gate_input=("mlp", "block_sparse_moe"),
           note="per-expert w1 (the gate) as saved; or fused experts.gate_up_proj [E, 2I, H], first half of dim -2",
           writes=_writes(r"block_sparse_moe\.experts\.\d+\.w2", r"self_attn\.o_proj")),
    Family("qwen_moe", ("qwen2_moe", "qwen3_moe"),
           (Target(_P + r"mlp\.(?:experts\.\d+\.|shared_expert\.)?gate_proj\.weight$"), _FUSED_EXPERTS),
           note="per-expert gate_proj, the shared expert's and dense layers' gate_proj; or fused experts.gate_up_proj",
           writes=_writes(r"mlp\.(?:experts\.\d+\.|shared_expert\.)?down_proj", r"self_attn\.o_proj")),
    Family("gpt2", ("gpt2",), (Target(r"^(?:transformer\.)?h\.(?P<layer>\d+)\.mlp\.c_fc\.weight$", axis=1),),
           layers=("h",), norm=("ln_f",), note="Conv1D stores weights transposed [in, out]: a neuron is a column",
           writes=_writes(r"mlp\.c_proj", r"attn\.c_proj", r"^(?:transformer\.)?h\.(?P<layer>\d+)\.", axis=1)),
    Family("gpt_neox", ("gpt_neox",), (Target(r"^(?:gpt_neox\.)?layers\.(?P<layer>\d+)\.mlp\.dense_h_to_4h\.weight$"),),
           norm=("final_layer_norm",), note="no gate: the first MLP projection (before the activation)",
           writes=_writes(r"mlp\.dense_4h_to_h", r"attention\.dense", r"^(?:gpt_neox\.)?layers\.(?P<layer>\d+)\.")),
    Family("opt", ("opt",), (Target(r"^(?:model\.)?(?:decoder\.)?layers\.(?P<layer>\d+)\.fc1\.weight$"),),
           layers=("decoder.layers",), norm=("decoder.final_layer_norm",), gate_input=("fc1",),
           note="no gate: fc1; OPT-350m projects the final state to another size, use --layer there",
           writes=_writes(r"fc2", r"self_attn\.out_proj", r"^(?:model\.)?(?:decoder\.)?layers\.(?P<layer>\d+)\.")),
    Family("falcon", ("falcon",), (Target(r"^(?:transformer\.)?h\.(?P<layer>\d+)\.mlp\.dense_h_to_4h\.weight$"),),
           layers=("h",), norm=("ln_f",), note="no gate: the first MLP projection (before the activation)",
           writes=_writes(r"mlp\.dense_4h_to_h", r"self_attention\.dense", r"^(?:transformer\.)?h\.(?P<layer>\d+)\.")),
    Family("gpt_oss", ("gpt_oss",), (Target(_P + r"mlp\.experts\.gate_up_proj(?:_blocks)?$"),), supported=False,
           note="experts store gate and up interleaved along the columns, often MXFP4-quantized"),
)


def family_named(model_type: str | None) -> Family | None:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None


def family_for(ck: Checkpoint) -> Family:
    model_type = ck.config.get("model_type")
    fam = family_named(model_type)
    if fam is not None:
        return fam
    names = list(ck.tensors) + list(ck.index or {})
    for fam in FAMILIES:
        if any(re.match(t.pattern, n) for t in fam.targets for n in names):
            return fam
    raise UnsupportedError(
        f"architecture {model_type or '(no model_type in config.json)'} is not supported yet; "
        "name the tensors to edit with --target REGEX --axis 0"
    )


@dataclass(frozen=True)
class Layout:
    """Where the gate neurons of one target tensor are (see the module docstring)."""

    shape: tuple[int, ...]
    axis: int
    split: int = 1
    part: int = 0

    @property
    def inputs(self) -> int:
        """Length of one neuron's input weights (the probe's feature size)."""
        return self.shape[-1] if self.axis == 0 else self.shape[0]

    @property
    def dim(self) -> int:  # size of the neuron dimension, gate and fused parts together
        return self.shape[-2] if self.axis == 0 else self.shape[1]

    @property
    def width(self) -> int:  # gate neurons per block
        return self.dim // self.split

    @property
    def blocks(self) -> int:  # experts in a fused 3-d tensor; 1 otherwise
        return math.prod(self.shape[:-2]) if self.axis == 0 else 1

    @property
    def neurons(self) -> int:
        return self.blocks * self.width

    def block_range(self, b: int) -> tuple[int, int]:
        """Flat rows (axis 0) or columns (axis 1) of block b's gate part: a contiguous range."""
        start = b * self.dim + self.part * self.width
        return start, start + self.width

    def index_of(self, neurons):
        """Flat row (axis 0) or column (axis 1) of each neuron index (ints or an integer array)."""
        return (neurons // self.width) * self.dim + self.part * self.width + neurons % self.width


@dataclass(frozen=True)
class Targets:
    """The tensors to score and edit, in layer order, with the axis a neuron lies along."""

    names: tuple[str, ...]
    layers: tuple[int | None, ...]
    axis: int
    family: str
    layouts: tuple[Layout, ...] = ()


def residual_writers(ck: Checkpoint, kinds=("mlp", "attn")) -> list[tuple[int, str, int]]:
    """(layer, tensor name, axis of the hidden dimension) of every tensor that writes to the residual
    stream, of the `kinds` asked for, in layer order (the family's `writes` entries)."""
    fam = family_for(ck)
    specs = [t for t in fam.writes if t.kind in kinds]
    if not specs:
        raise UnsupportedError(f"architecture {fam.name} has no residual-writing tensors of kind {'/'.join(kinds)} in the table "
                               "(fused MoE experts are not listed: their projection is not one low-rank edit per tensor)")
    found = []
    for name in ck.tensors:
        for spec in specs:
            m = re.search(spec.pattern, name)
            if m and len(ck.tensors[name].shape) == 2:
                found.append((int(m.group("layer")), name, spec.axis))
                break
    return sorted(found)


def _layout(name: str, shape: tuple[int, ...], spec: Target) -> Layout:
    if spec.axis not in (0, 1):
        raise UnsupportedError(f"--axis {spec.axis} does not exist; use 0 (rows) or 1 (columns)")
    if len(shape) < 2 or (spec.axis == 1 and len(shape) != 2):
        need = "2-d or more" if spec.axis == 0 else "2-d"
        raise UnsupportedError(f"tensor {name} of shape {list(shape)} is not {need}; axis {spec.axis} targets need that, pick other tensors")
    lay = Layout(tuple(shape), spec.axis, spec.split, spec.part)
    if lay.dim % spec.split or not 0 <= spec.part < spec.split:
        raise UnsupportedError(f"tensor {name}: its {lay.dim} neurons do not split into {spec.split} equal parts; check the family table")
    return lay


def resolve_targets(ck: Checkpoint, target: str | None = None, axis: int = 0) -> Targets:
    if target is not None:
        try:
            specs = (Target(re.compile(target).pattern, axis),)
        except re.error as e:
            raise UnsupportedError(f"--target {target!r} is not a valid regular expression ({e})") from None
        family = "custom"
    else:
        fam = family_for(ck)
        if not fam.supported:
            raise UnsupportedError(f"architecture {fam.name} is not supported yet ({fam.note}); name the tensors with --target REGEX --axis N")
        specs, family = fam.targets, fam.name
    found = []
    for name in ck.tensors:
        for spec in specs:
            m = re.search(spec.pattern, name)
            if m:
                layer = m.groupdict().get("layer")
                found.append((int(layer) if layer is not None else -1, name, spec))
                break
    if not found:
        if target is None:
            raise UnsupportedError(
                f"no tensor of {ck.path} matches the {family} gate layout ({' or '.join(s.pattern for s in specs)}): this layout "
                "is not supported yet; name the tensors with --target REGEX --axis N"
            )
        raise UnsupportedError(f"no tensor of {ck.path} matches {target!r}; check the regex against the tensor names in the checkpoint's safetensors header or index")
    found.sort(key=lambda t: (t[0], t[1]))
    layouts = tuple(_layout(n, tuple(ck.tensors[n].shape), spec) for _, n, spec in found)
    inputs = {lay.inputs for lay in layouts}
    if len(inputs) > 1:
        pattern = target if target is not None else " or ".join(s.pattern for s in specs)
        raise UnsupportedError(
            f"the tensors matching {pattern!r} do not share one input size (found {sorted(inputs)}); narrow the regex to one kind of tensor"
        )
    axes = {lay.axis for lay in layouts}
    return Targets(tuple(n for _, n, _ in found), tuple(l if l >= 0 else None for l, _, _ in found), axes.pop(), family, layouts)


def parse_layers(text: str | Sequence[int] | None) -> list[int] | None:
    """'15-29', '15,16,17' or '1,3-5' (or numbers) -> sorted layer numbers; None: every layer."""
    if text is None or not isinstance(text, str):
        return None if text is None else sorted({int(x) for x in text})
    out: set[int] = set()
    try:
        for part in (x.strip() for x in text.split(",") if x.strip()):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise DataError(f"layers must be numbers or ranges such as 15-29 or 15,16, not {text!r}") from None
    if not out or min(out) < 0:
        raise DataError(f"layers must be numbers or ranges such as 15-29 or 15,16, not {text!r}")
    return sorted(out)
