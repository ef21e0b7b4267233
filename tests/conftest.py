"""Shared fixtures: tiny random Llama checkpoints built once per session, and patch builders.

The session checkpoints are read-only: a test that writes copies one into its `tmp_path` first
(`copy_ckpt`). Patches are built directly from the checkpoint's bytes with `make_edit`, so these
tests depend on nothing but the core modules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from patchkit.core.checkpoint import Checkpoint
from patchkit.core.patchfile import Patch, make_edit

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ST_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
VARIANTS = [(d, s) for d in ("bf16", "fp16", "fp32") for s in (False, True)]
VARIANT_IDS = [f"{d}-{'sharded' if s else 'single'}" for d, s in VARIANTS]

# The tensors the standard test patch edits: in both shards of the sharded checkpoints.
EDIT_TENSORS = (
    "model.layers.0.mlp.gate_proj.weight",  # 48 rows, shard 1
    "model.layers.1.input_layernorm.weight",  # 1-d: one row, shard 1
    "model.layers.2.mlp.up_proj.weight",  # shard 2
    "lm_head.weight",  # shard 2
)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    """(dtype name, sharded) -> a tiny Llama checkpoint folder. Never write into these."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for dname, sharded in VARIANTS:
        out[(dname, sharded)] = helpers.tiny_llama(root / f"{dname}-{int(sharded)}", TORCH_DTYPES[dname], sharded=sharded)
    # a model of the same architecture with other weights, for "patch made for another model"
    out[("bf16-other", False)] = helpers.tiny_llama(root / "bf16-other", torch.bfloat16, seed=1)
    return out


@pytest.fixture(params=VARIANTS, ids=VARIANT_IDS)
def variant(request):
    return request.param


@pytest.fixture
def copy_ckpt(ckpts, tmp_path):
    """copy_ckpt(dtype="bf16", sharded=False, name=None) -> a private copy in tmp_path."""
    counter = [0]

    def copy(dtype: str = "bf16", sharded: bool = False, name: str | None = None) -> Path:
        counter[0] += 1
        dst = tmp_path / (name or f"ckpt{counter[0]}")
        shutil.copytree(ckpts[(dtype, sharded)], dst)
        return dst

    return copy


def build_patch(ckpt: Path, seed: int = 0, tensors=EDIT_TENSORS, scale: float = 0.05, kinds=None, rows_per=5) -> Patch:
    """A patch editing a few rows of each tensor in `tensors`: dense, factored and replace edits."""
    rng = np.random.default_rng(seed)
    ck = Checkpoint(ckpt)
    edits = {}
    for i, name in enumerate(tensors):
        info = ck.tensors[name]
        n = min(rows_per, info.n_rows)
        rows = np.sort(rng.choice(info.n_rows, size=n, replace=False)).astype(np.int64)
        base_raw = ck.read_rows(name, rows)
        kind = (kinds or ("dense", "factored", "dense", "factored"))[i % 4]
        if kind == "dense":
            delta = (rng.standard_normal((n, info.n_cols)) * scale).astype(np.float32)
            edits[name] = make_edit(name, info.shape, info.dtype, rows, base_raw, delta=delta)
        elif kind == "factored":
            v = (rng.standard_normal(info.n_cols) * scale).astype(np.float32)
            s = rng.choice(np.array([-2, -1, -0.5, 0.5, 1, 2], dtype=np.float32), size=n)  # exact multiples
            edits[name] = make_edit(name, info.shape, info.dtype, rows, base_raw, delta=s[:, None] * v[None, :])
        else:  # replace
            from patchkit.core.dtypes import STORAGE

            # the base rows with the lowest mantissa bit of every element flipped: finite, not the base
            u = base_raw.copy()
            u[:, :: STORAGE[info.dtype].itemsize] ^= 1
            vals = u.view(STORAGE[info.dtype]).copy()
            edits[name] = make_edit(name, info.shape, info.dtype, rows, base_raw, values=vals)
    return Patch(edits=edits, base_model="tiny-llama", provenance={"method": "test", "params": {"seed": seed}})


@pytest.fixture
def make_patch(tmp_path):
    """make_patch(ckpt, seed=0, **kw) -> path of a saved patch built from `ckpt`'s bytes."""

    def make(ckpt: Path, seed: int = 0, name: str | None = None, **kw) -> Path:
        p = build_patch(ckpt, seed=seed, **kw)
        return p.save(tmp_path / (name or f"patch-{seed}.safetensors"))

    return make


def reference_apply(state: dict[str, torch.Tensor], patch: Patch) -> dict[str, torch.Tensor]:
    """The edit done with torch in memory: w[rows] = (w[rows].float() + delta).to(dtype)."""
    out = {k: v.clone() for k, v in state.items()}
    for name, e in patch.edits.items():
        w = out[name]
        view = w.view(1, -1) if w.ndim <= 1 else w.view(-1, w.shape[-1])
        idx = torch.from_numpy(np.array(e.rows))
        if e.encoding == "replace":
            raw = torch.from_numpy(np.ascontiguousarray(e.values).view(np.uint8).copy())
            view[idx] = raw.view(w.dtype).reshape(len(e.rows), -1)
        else:
            d = torch.from_numpy(e.deltas().copy())
            view[idx] = (view[idx].float() + d).to(w.dtype)
    return out


def load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_tensors_bitequal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        ix = x.contiguous().view(torch.uint8) if x.ndim else x.reshape(1).view(torch.uint8)
        iy = y.contiguous().view(torch.uint8) if y.ndim else y.reshape(1).view(torch.uint8)
        assert torch.equal(ix, iy), f"tensor {name} differs"


def run_cli_subprocess(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PATCHKIT_CRASH_AT", None)
    env.update(env_extra or {})
    kw.setdefault("timeout", 120)
    return subprocess.run(
        [sys.executable, "-m", "patchkit", *map(str, args)],  # the console script's own entry point
        env=env, capture_output=True, text=True, **kw,
    )


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    from patchkit.cli import cli

    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)

    return run
