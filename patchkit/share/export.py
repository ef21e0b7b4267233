"""export: a patch as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

A patch edits rows of a Linear weight W [out, in]: W[rows] += delta. LoRA adds (B @ A) * scaling
with B [out, r] and A [r, in]; lora_alpha = r makes scaling 1.

- factored (new row i = old + scale[i] * direction): rank 1 and exact, B[rows, 0] = scale (zeros
  elsewhere), A[0] = direction. B @ A computes scale[i] * direction[j] in float32, the same product
  the patch makes.
- dense: the rank of the delta (SVD, float64). At full row rank (r = number of rows) B is the 0/1
  matrix selecting the rows and A the deltas themselves: exact. Below it, or with `rank=R`, B and A
  come from the truncated SVD and the error is reported per module.
- lowrank (format v1.1, new row i = old + U[i] @ V): rank r, B[rows] = U (zeros elsewhere), A = V.
  At rank 1 B @ A is the patch's own product, exact; at rank r > 1 a matrix product may sum the r
  terms in another order than the patch's (docs/format.md) and differ in the last float32 bit.
  Exceptions (exact values) cannot be carried by a LoRA delta: the module is marked not exact and
  the count reported.
- replace and scale edits, 1-d tensors, non-`.weight` tensors and embeddings are not Linear deltas:
  they are named in an error, or left out with `skip_unsupported=True` and listed in the result.

LoRA adds B @ A x in the activation dtype at run time while the patch rounds W + delta once to the
weight dtype: the outputs agree up to that rounding (docs/merge.md has the measured numbers).
No torch: numpy only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..core.fsutil import staged_folder
from ..core.patchfile import TensorEdit
from ..core.plan import load_patch
from ..core.stfile import serialize
from ..errors import OutputExistsError, PatchkitError, UnsupportedError

_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_positions|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|shared)\.weight$")
_F32_EPS = float(np.finfo(np.float32).eps)


_CONV1D = re.compile(r"(?:^|\.)h\.\d+\.(?:attn|mlp|crossattention)\.c_(?:fc|proj|attn)\.weight$")


def unsupported_reason(edit: TensorEdit) -> str | None:
    """Why this edit cannot be a LoRA delta on a Linear layer, or None when it can."""
    if edit.encoding == "replace":
        return "its rows are replaced whole (no delta)"
    if edit.encoding == "scale":
        return "it is a scale edit (rows multiplied by gamma), which is no fixed delta: a LoRA adapter cannot express it"
    if not edit.name.endswith(".weight"):
        return "it is not a module's .weight"
    if len(edit.shape) != 2:
        return f"it is {len(edit.shape)}-d; LoRA adapts 2-d Linear weights"
    if _EMBEDDING.search(edit.name):
        return "it is an embedding, not a Linear layer"
    if _CONV1D.search(edit.name):
        return "it is a GPT-2 style Conv1D weight stored transposed; exporting those is not supported yet"
    return None


def lora_factors(edit: TensorEdit, rank: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(B [out, r], A [r, in], report) for one Linear weight's edit; report has rank, exact, errors
    (and `exceptions`, the count of exact values a LoRA delta leaves out, when the edit has any)."""
    b, a, rep = _lora_factors(edit, rank)
    if edit.n_exceptions:
        rep.update(exact=False, exceptions=edit.n_exceptions)
    return b, a, rep


def _lora_factors(edit: TensorEdit, rank: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    out_dim = edit.shape[0]
    if edit.encoding == "factored":
        b = np.zeros((out_dim, 1), dtype=np.float32)
        b[edit.rows, 0] = edit.scale if len(edit.scale) == edit.n_rows else edit.scale[0]
        a = edit.direction[None, :].astype(np.float32)
        return b, a, {"rank": 1, "method": "factored", "exact": True, "max_abs_error": 0.0, "rel_error": 0.0}
    if edit.encoding == "lowrank":
        b = np.zeros((out_dim, edit.rank), dtype=np.float32)
        b[edit.rows] = edit.u
        a = edit.v.astype(np.float32).copy()
        delta = edit.deltas()
        approx = (b[edit.rows] @ a).astype(np.float32)
        err = np.abs(approx.astype(np.float64) - delta)
        norm = float(np.linalg.norm(delta))
        exact = bool(np.array_equal(approx.view(np.uint32), delta.view(np.uint32))) and not edit.n_exceptions
        return b, a, {"rank": edit.rank, "method": "lowrank", "exact": exact, "exceptions": edit.n_exceptions,
                      "max_abs_error": float(err.max()) if err.size else 0.0,
                      "rel_error": float(np.linalg.norm(err) / norm) if norm else 0.0}
    delta = edit.delta
    n = edit.n_rows
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    tol = (s[0] if len(s) else 0.0) * max(delta.shape) * _F32_EPS
    full = int(np.sum(s > tol))
    r = full if rank is None else min(int(rank), full)
    r = max(r, 1)
    if r == n:  # full row rank: select the rows, carry the deltas as they are; exact
        b = np.zeros((out_dim, n), dtype=np.float32)
        b[edit.rows, np.arange(n)] = 1.0
        a = delta.astype(np.float32).copy()
        method = "rows"
    else:
        b = np.zeros((out_dim, r), dtype=np.float32)
        b[edit.rows] = (u[:, :r] * s[:r]).astype(np.float32)
        a = vt[:r].astype(np.float32)
        method = "svd"
    approx = (b[edit.rows] @ a).astype(np.float32)
    err = np.abs(approx.astype(np.float64) - delta)
    norm = float(np.linalg.norm(delta))
    rel = float(np.linalg.norm(err) / norm) if norm else 0.0
    exact = bool(np.array_equal(approx.view(np.uint32), delta.view(np.uint32)))
    return b, a, {"rank": r, "full_rank": full, "method": method, "exact": exact,
                  "max_abs_error": float(err.max()) if err.size else 0.0, "rel_error": rel}


def export_peft(patch, output, *, rank: int | None = None, skip_unsupported: bool = False,
                base_model: str | None = None, task_type: str = "CAUSAL_LM", overwrite: bool = False) -> dict:
    """Write `patch` as a PEFT LoRA adapter folder `output`; returns what was written and how exact it is."""
    patch = load_patch(patch)
    output = Path(output)
    OutputExistsError.check(output, overwrite)
    if not output.parent.exists():
        raise PatchkitError(f"the folder {output.parent} for the output does not exist")
    if rank is not None and rank < 1:
        raise PatchkitError(f"--rank must be at least 1, got {rank}")
    skipped = [{"tensor": n, "reason": r} for n, e in sorted(patch.edits.items()) if (r := unsupported_reason(e))]
    if skipped and not skip_unsupported:
        first = skipped[0]
        more = f" (and {len(skipped) - 1} more: {', '.join(s['tensor'] for s in skipped[1:])})" if len(skipped) > 1 else ""
        raise UnsupportedError(
            f"cannot export tensor {first['tensor']} as LoRA: {first['reason']}{more}; "
            "pass --skip-unsupported to leave such tensors out (they are listed)",
            tensors=[s["tensor"] for s in skipped],
        )
    done = {s["tensor"] for s in skipped}
    arrays, modules = {}, []
    for name in sorted(patch.edits):
        if name in done:
            continue
        b, a, rep = lora_factors(patch.edits[name], rank)
        module = name[: -len(".weight")]
        arrays[f"base_model.model.{module}.lora_A.weight"] = ("F32", np.ascontiguousarray(a))
        arrays[f"base_model.model.{module}.lora_B.weight"] = ("F32", np.ascontiguousarray(b))
        modules.append({"module": module, "tensor": name, "encoding": patch.edits[name].encoding, **rep})
    if not modules:
        raise UnsupportedError("no tensor of the patch can be exported as LoRA: nothing to write")
    ranks = [m["rank"] for m in modules]
    r = max(set(ranks), key=lambda x: (ranks.count(x), -x))  # the most common rank is the default
    pattern = {re.escape(m["module"]): m["rank"] for m in modules if m["rank"] != r}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model or patch.base_model,
        "revision": patch.base_revision,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": [m["module"] for m in modules],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    meta = {"format": "pt", "patchkit_patch": patch.id}
    with staged_folder(output, overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "adapter_model.safetensors").write_bytes(serialize(arrays, meta))
    return {
        "output": str(output), "patch": patch.id, "base_model": config["base_model_name_or_path"], "r": r,
        "modules": modules, "skipped": skipped, "exact": all(m["exact"] for m in modules),
        "max_abs_error": max(m["max_abs_error"] for m in modules),
    }
