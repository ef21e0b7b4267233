"""Exactness, as properties: on random small checkpoints (random shapes, dtypes, special values in
the base, deltas from subnormal to huge), apply equals torch's arithmetic and revert gives back every
byte; an apply that would overflow changes nothing."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as hs
from safetensors.torch import save_file

from conftest import load_tensors
from helpers import snapshot
from patchkit.core import ops
from patchkit.core.dtypes import STORAGE
from patchkit.core.patchfile import Patch, make_edit
from patchkit.errors import NonFiniteError

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SIGNED = {"BF16": torch.int16, "F16": torch.int16, "F32": torch.int32}
SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-45, 6e-8, -6e-5, 65504.0, 3.0e38, -1.0]
MAGNITUDE = {"zero": 0.0, "subnormal": 1e-41, "tiny": 1e-30, "small": 1e-3, "unit": 1.0, "large": 1e4, "huge": 1e30}


@hs.composite
def tensor_specs(draw):
    dtype = draw(hs.sampled_from(["BF16", "F16", "F32"]))
    cols = draw(hs.integers(1, 9))
    shape = draw(hs.sampled_from([(cols,), (draw(hs.integers(1, 10)), cols), (2, draw(hs.integers(1, 4)), cols)]))
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    rows = sorted(draw(hs.sets(hs.integers(0, n_rows - 1), min_size=1, max_size=n_rows)))
    return {
        "dtype": dtype, "shape": shape, "rows": rows, "seed": draw(hs.integers(0, 2**31)),
        "specials": draw(hs.floats(0, 0.5)), "nan": draw(hs.booleans()),
        "magnitude": draw(hs.sampled_from(list(MAGNITUDE))),
        "encoding": draw(hs.sampled_from(["dense", "factored", "replace"])),
    }


def make_base(spec) -> torch.Tensor:
    rng = np.random.default_rng(spec["seed"])
    n = int(np.prod(spec["shape"]))
    vals = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 5, n)).astype(np.float32)
    mask = rng.random(n) < spec["specials"]
    vals[mask] = rng.choice(np.array(SPECIAL, dtype=np.float32), size=int(mask.sum()))
    t = torch.from_numpy(vals).to(TORCH[spec["dtype"]]).reshape(spec["shape"])
    if spec["nan"]:
        t.view(-1)[int(rng.integers(0, n))] = float("nan")
    return t


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], sharded: bool) -> None:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "toy"}')
    if not sharded or len(tensors) < 2:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    half = {n: ("model-00001-of-00002.safetensors" if i % 2 == 0 else "model-00002-of-00002.safetensors")
            for i, n in enumerate(names)}
    for fname in sorted(set(half.values())):
        save_file({n: tensors[n] for n in names if half[n] == fname}, folder / fname, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": half}))


def make_patch_for(name, spec, base: torch.Tensor):
    rng = np.random.default_rng(spec["seed"] + 1)
    rows = np.array(spec["rows"], dtype=np.int64)
    cols = spec["shape"][-1]
    view = base.reshape(-1, cols)
    sel = view[torch.from_numpy(rows)].contiguous()
    raw = sel.view(SIGNED[spec["dtype"]]).numpy().view(np.uint8).reshape(len(rows), -1)
    mag = MAGNITUDE[spec["magnitude"]]
    if spec["encoding"] == "replace":
        vals = torch.from_numpy((rng.standard_normal((len(rows), cols)) * 0.1).astype(np.float32)).to(TORCH[spec["dtype"]])
        values = vals.view(SIGNED[spec["dtype"]]).numpy().view(STORAGE[spec["dtype"]])
        return make_edit(name, spec["shape"], spec["dtype"], rows, raw, values=values)
    if spec["encoding"] == "factored":
        v = (rng.standard_normal(cols) * mag).astype(np.float32)
        s = rng.choice(np.array([1, -1, 0.5, 2, -4], dtype=np.float32), size=len(rows))
        delta = s[:, None] * v[None, :]
    else:
        delta = (rng.standard_normal((len(rows), cols)) * mag).astype(np.float32)
        delta[rng.random(delta.shape) < 0.1] = -0.0
    return make_edit(name, spec["shape"], spec["dtype"], rows, raw, delta=delta)


def torch_reference(base: dict[str, torch.Tensor], patch: Patch) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in base.items()}
    for name, e in patch.edits.items():
        w = out[name].view(-1, e.shape[-1])
        idx = torch.from_numpy(np.array(e.rows))
        if e.encoding == "replace":
            w[idx] = torch.from_numpy(np.array(e.values).view(np.uint8)).view(w.dtype).reshape(len(e.rows), -1)
        else:
            w[idx] = (w[idx].float() + torch.from_numpy(e.deltas().copy())).to(w.dtype)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(SIGNED[{v: k for k, v in TORCH.items()}[t.dtype]])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=hs.lists(tensor_specs(), min_size=1, max_size=3), sharded=hs.booleans(), in_place=hs.booleans())
def test_apply_then_revert_gives_back_every_byte(tmp_path, specs, sharded, in_place):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        tensors = {f"model.layers.{i}.w.weight": make_base(s) for i, s in enumerate(specs)}
        ck = work / "ck"
        write_checkpoint(ck, tensors, sharded)
        edits = {f"model.layers.{i}.w.weight": make_patch_for(f"model.layers.{i}.w.weight", s, tensors[f"model.layers.{i}.w.weight"])
                 for i, s in enumerate(specs)}
        patch = Patch(edits=edits)
        path = patch.save(work / "p.safetensors")
        before = snapshot(ck)
        out = ck if in_place else work / "out"
        try:
            ops.apply(path, ck, None if in_place else out, in_place=in_place)
        except NonFiniteError:
            # refused: the result would overflow to inf; nothing was written anywhere
            event("refused: overflow")
            assert snapshot(ck) == before and not (work / "out").exists()
            return
        # the applied weights are torch's arithmetic, bit for bit (NaN results aside:
        # torch's own NaN bits depend on its code path)
        got, want = load_tensors(out), torch_reference(tensors, patch)
        for name in tensors:
            nan = torch.isnan(want[name])
            assert torch.equal(bits(got[name])[~nan], bits(want[name])[~nan]), name
            assert torch.isnan(got[name][nan]).all()
        event("applied")
        if in_place:
            ops.revert(path, ck, in_place=True)
            assert snapshot(ck) == before
        else:
            r = ops.revert(path, out, work / "back")
            assert r["exact"] is True
            assert snapshot(work / "back") == before
    finally:
        shutil.rmtree(work, ignore_errors=True)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=hs.lists(tensor_specs(), min_size=1, max_size=2))
def test_revert_without_record_is_exact_when_it_says_so(tmp_path, specs):
    """Without the undo record, revert subtracts: `exact` must be true exactly when the bytes are back,
    and the error must stay within `max_error_ulps`."""
    specs = [dict(s, nan=False, encoding="dense" if s["encoding"] == "replace" else s["encoding"]) for s in specs]
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        tensors = {f"t{i}.weight": make_base(s) for i, s in enumerate(specs)}
        ck = work / "ck"
        write_checkpoint(ck, tensors, sharded=False)
        patch = Patch(edits={f"t{i}.weight": make_patch_for(f"t{i}.weight", s, tensors[f"t{i}.weight"]) for i, s in enumerate(specs)})
        path = patch.save(work / "p.safetensors")
        try:
            ops.apply(path, ck, work / "out")
        except NonFiniteError:
            return
        shutil.rmtree(work / "out" / ".patchkit")
        r = ops.revert(path, work / "out", in_place=True)
        back = load_tensors(work / "out")
        same = all(torch.equal(bits(back[n]), bits(tensors[n])) for n in tensors)
        assert r["exact"] is same
        event(f"exact={same}")
        assert np.isfinite(r["max_error_ulps"])
        if same:
            assert r["max_error_ulps"] == 0
        from patchkit.core.dtypes import ulp

        for n, t in tensors.items():
            a, b = back[n].double().numpy().ravel(), t.double().numpy().ravel()
            ok = np.isfinite(a) & np.isfinite(b)
            if ok.any():
                err = np.abs(a[ok] - b[ok]) / ulp(a[ok], specs[int(n[1:].split(".")[0])]["dtype"])
                assert err.max() <= r["max_error_ulps"] + 1e-9, (n, err.max(), r["max_error_ulps"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
