"""Format v1.1: the `lowrank` and `scale` encodings and exceptions: pinned bytes, version refusals, bit-exact
arithmetic against a torch reference, and apply / revert / inspect on a tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from conftest import load_tensors
from patchkit.core import ops
from patchkit.core.checkpoint import Checkpoint
from patchkit.core.dtypes import STORAGE
from patchkit.core.encodings import exceptions_for
from patchkit.core.patchfile import Patch, TensorEdit, make_edit
from patchkit.core.stfile import serialize
from patchkit.errors import PatchFormatError

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
L, S, X = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"


def pinned_v11() -> Patch:
    """A rank-2 lowrank BF16 edit, a scale F16 edit and a dense F32 edit with one exception."""
    base_a = (np.arange(12, dtype="<u2").reshape(4, 3) + 0x3F80).astype("<u2")  # bf16 bits near 1.0
    rows = np.array([0, 3])
    ea = make_edit(L, (4, 3), "BF16", rows, base_a[rows].view(np.uint8),
                   u=np.array([[1.0, 0.5], [-2.0, 0.25]], np.float32), v=np.array([[0.125, 0, -0.25], [1, 2, 4]], np.float32))
    base_b = np.arange(8, dtype="<f2").reshape(2, 4)
    eb = make_edit(S, (2, 4), "F16", np.array([1]), base_b[[1]].view(np.uint8), gamma=np.array([0.5], np.float32))
    base_c = np.arange(6, dtype="<f4").reshape(3, 2)
    ec = make_edit(X, (3, 2), "F32", np.array([2]), base_c[[2]].view(np.uint8), delta=np.array([[1.0, 1.0]], np.float32),
                   factor=False, exceptions=(np.array([1], np.int64), np.array([7.5], "<f4")))
    return Patch(edits={e.name: e for e in (ea, eb, ec)}, base_model="tiny/model", base_revision="abc123",
                 provenance={"method": "test", "params": {"alpha": 2}, "patchkit_version": "0.1.0"}, description="pinned v1.1")


# Computed once from the implementation and pasted: a change here is a FORMAT CHANGE (see test_format.py).
PINNED_V11_HEADER = (
    '{"__metadata__":{"base":"{\\"model_id\\":\\"tiny/model\\",\\"revision\\":\\"abc123\\",\\"tensors\\":{\\"model.layers.0.mlp.down_proj.weight\\":'
    '{\\"dtype\\":\\"BF16\\",\\"result_sha256\\":\\"50bad1fc434573d90dcc26686531f7998f763fc18a0a12a63dbb29367986f9b2\\",\\"rows_sha256\\":'
    '\\"8438db08bd0b37b2da860f310503a65ca71c6385744ea6e1a77c45d9640ac78a\\",\\"shape\\":[4,3]},\\"model.layers.0.mlp.up_proj.weight\\":'
    '{\\"dtype\\":\\"F16\\",\\"result_sha256\\":\\"98595cfa7ab9f90bd0066cdd61394584877969637aa27d1adab3281c96121977\\",\\"rows_sha256\\":'
    '\\"d765a72d9a82aede434f6d817351317f0b8c64e80ae4171a7f290a48646f6654\\",\\"shape\\":[2,4]},\\"model.layers.1.self_attn.o_proj.weight\\":'
    '{\\"dtype\\":\\"F32\\",\\"result_sha256\\":\\"453992fd604e63dc493657e24272fc58dddc1ae9bba662622bd0e779068922d6\\",\\"rows_sha256\\":'
    '\\"84c4426d4f7c3fb46daf2e28151e2adbdb53091cd52dfbc76c7edf418b1ff65d\\",\\"shape\\":[3,2]}}}","description":"pinned v1.1",'
    '"format":"patchkit.patch","format_minor":"1","format_version":"1",'
    '"id":"e1b67ab2adb57b2c153b22942f98145b3bca5bda61d4807510ec5b28d8a790e0",'
    '"provenance":"{\\"method\\":\\"test\\",\\"params\\":{\\"alpha\\":2},\\"patchkit_version\\":\\"0.1.0\\"}",'
    '"tensors":"{\\"model.layers.0.mlp.down_proj.weight\\":{\\"encoding\\":\\"lowrank\\",\\"rows\\":2},'
    '\\"model.layers.0.mlp.up_proj.weight\\":{\\"encoding\\":\\"scale\\",\\"rows\\":1},'
    '\\"model.layers.1.self_attn.o_proj.weight\\":{\\"encoding\\":\\"dense\\",\\"exceptions\\":1,\\"rows\\":1}}"},'
    '"model.layers.0.mlp.down_proj.weight::U":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},'
    '"model.layers.0.mlp.down_proj.weight::V":{"dtype":"F32","shape":[2,3],"data_offsets":[16,40]},'
    '"model.layers.0.mlp.down_proj.weight::rows":{"dtype":"I64","shape":[2],"data_offsets":[40,56]},'
    '"model.layers.0.mlp.up_proj.weight::gamma":{"dtype":"F32","shape":[1],"data_offsets":[56,60]},'
    '"model.layers.0.mlp.up_proj.weight::rows":{"dtype":"I64","shape":[1],"data_offsets":[60,68]},'
    '"model.layers.1.self_attn.o_proj.weight::delta":{"dtype":"F32","shape":[1,2],"data_offsets":[68,76]},'
    '"model.layers.1.self_attn.o_proj.weight::exception_values":{"dtype":"F32","shape":[1],"data_offsets":[76,80]},'
    '"model.layers.1.self_attn.o_proj.weight::exceptions":{"dtype":"I64","shape":[1],"data_offsets":[80,88]},'
    '"model.layers.1.self_attn.o_proj.weight::rows":{"dtype":"I64","shape":[1],"data_offsets":[88,96]}}    '
)
PINNED_V11_SHA256 = "28a5b151eb2901c6da4949fc8d3677e70416a9abc06c8c7c44bd624ff31f2b66"
PINNED_V11_ID = "e1b67ab2adb57b2c153b22942f98145b3bca5bda61d4807510ec5b28d8a790e0"


def test_pinned_v11_bytes(tmp_path):
    p = pinned_v11()
    data = p.save(tmp_path / "p.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert data[8 : 8 + n].decode() == PINNED_V11_HEADER
    assert hashlib.sha256(data).hexdigest() == PINNED_V11_SHA256 and p.id == PINNED_V11_ID
    q = Patch.load(tmp_path / "p.safetensors")
    assert q.id == PINNED_V11_ID and q.to_bytes() == data
    assert q.summary()["format"] == "patchkit.patch v1.1"
    assert [(t["encoding"], t["rank"], t["exceptions"]) for t in q.summary()["tensors"]] == [
        ("lowrank", 2, 0), ("scale", None, 0), ("dense", None, 1)]


def test_pinned_v11_values():
    p = pinned_v11()
    # lowrank BF16: rows 0 and 3 of 1.0+k*2^-7 ... plus U @ V, accumulated k = 0, 1 in float32
    base = ((np.arange(12, dtype=np.uint32).reshape(4, 3) + 0x3F80) << 16).view(np.float32)[[0, 3]]
    d = np.array([[1.0], [-2.0]], np.float32) * np.array([[0.125, 0, -0.25]], np.float32)
    d = d + np.array([[0.5], [0.25]], np.float32) * np.array([[1, 2, 4]], np.float32)
    expect = torch.from_numpy(base + d).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    raw = (np.arange(12, dtype="<u2").reshape(4, 3) + 0x3F80).astype("<u2")[[0, 3]].view(np.uint8)
    assert np.array_equal(p.edits[L].new_rows(raw).view(np.uint16), expect)
    got = p.edits[S].new_rows(np.arange(8, dtype="<f2").reshape(2, 4)[[1]].view(np.uint8)).view(np.float16)
    assert got.tolist() == [[2.0, 2.5, 3.0, 3.5]]
    got = p.edits[X].new_rows(np.array([[4.0, 5.0]], "<f4").view(np.uint8)).view(np.float32)
    assert got.tolist() == [[5.0, 7.5]]  # 5 + 1 = 6, then the exception sets 7.5


def forged(p: Patch, path, meta_update=None, entry_update=None):
    meta = p._metadata()
    meta.update(meta_update or {})
    if entry_update:
        t = json.loads(meta["tensors"])
        for name, upd in entry_update.items():
            t[name].update(upd)
        meta["tensors"] = json.dumps(t)
    arr = {}
    for e in p.edits.values():
        arr.update(e.arrays())
    meta.pop("id", None)
    meta["id"] = hashlib.sha256(serialize(arr, meta)).hexdigest()
    path.write_bytes(serialize(arr, meta))
    return path


def test_version_refusals(tmp_path):
    p = pinned_v11()
    with pytest.raises(PatchFormatError, match=r"format v1\.3; this patchkit reads v1\.2: upgrade patchkit"):
        Patch.load(forged(p, tmp_path / "a.safetensors", {"format_minor": "3"}))
    with pytest.raises(PatchFormatError, match=r"uses encoding lowrank, which needs patch format v1\.1"):
        Patch.load(forged(p, tmp_path / "b.safetensors", {"format_minor": "0"}))
    with pytest.raises(PatchFormatError, match="format_minor is not a whole number"):
        Patch.load(forged(p, tmp_path / "c.safetensors", {"format_minor": "1.5"}))
    with pytest.raises(PatchFormatError, match="unknown encoding 'sparse'"):
        Patch.load(forged(p, tmp_path / "d.safetensors", entry_update={L: {"encoding": "sparse"}}))
    with pytest.raises(PatchFormatError, match="exception count does not match"):
        Patch.load(forged(p, tmp_path / "e.safetensors", entry_update={X: {"exceptions": 2}}))
    with pytest.raises(PatchFormatError, match="not described by the metadata"):
        Patch.load(forged(p, tmp_path / "f.safetensors", entry_update={X: {"exceptions": None}}))


def test_invalid_v11_edits_are_refused():
    z = np.zeros((2, 6), np.uint8)
    with pytest.raises(PatchFormatError, match=r"V must be float32 \[1, 3\]"):
        make_edit("w", (4, 3), "F16", [0, 1], z, u=np.ones((2, 1)), v=np.ones((2, 3)))
    with pytest.raises(PatchFormatError, match="NaN or inf"):
        make_edit("w", (4, 3), "F16", [0, 1], z, gamma=np.array([1, np.inf]))
    with pytest.raises(PatchFormatError, match="sorted, unique and within 0..5"):
        make_edit("w", (4, 3), "F16", [0, 1], z, gamma=np.ones(2), exceptions=(np.array([6]), np.zeros(1, np.float16)))
    with pytest.raises(PatchFormatError, match=r"exception values must be \[1\] of F16"):
        make_edit("w", (4, 3), "F16", [0, 1], z, gamma=np.ones(2), exceptions=(np.array([5]), np.zeros(1, np.float32)))


# ---- the arithmetic, against torch -------------------------------------------------------------------------
def torch_reference(e, base: torch.Tensor) -> torch.Tensor:
    """The defined arithmetic written with torch: float32 ops one at a time, one rounding to the dtype."""
    w = base.float()
    if e.encoding == "lowrank":
        u, v = torch.from_numpy(e.u.copy()), torch.from_numpy(e.v.copy())
        d = u[:, 0:1] * v[0:1]
        for k in range(1, u.shape[1]):
            d = d + u[:, k : k + 1] * v[k : k + 1]
        out = (w + d).to(base.dtype)
    else:
        g = torch.from_numpy(e.gamma.copy())
        out = (w * g[:, None]).to(base.dtype)
    if e.exc_index is not None:
        flat = out.reshape(-1)
        vals = torch.from_numpy(np.array(e.exc_values).view(np.int16 if e.dtype != "F32" else np.float32).copy())
        flat.view(torch.int16 if e.dtype != "F32" else torch.float32)[torch.from_numpy(e.exc_index.copy())] = vals
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=hs.sampled_from(["BF16", "F16", "F32"]), enc=hs.sampled_from(["lowrank", "scale"]), n=hs.integers(1, 5),
       cols=hs.integers(1, 9), r=hs.integers(1, 4), n_exc=hs.integers(0, 3), seed=hs.integers(0, 2**16))
def test_round_trip_and_arithmetic(tmp_path, dtype, enc, n, cols, r, n_exc, seed):
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.standard_normal((n, cols)).astype(np.float32)).to(TORCH[dtype])
    raw = base.view(torch.int16 if dtype != "F32" else torch.float32).numpy().view(np.uint8).reshape(n, -1).copy()
    kw = ({"u": rng.standard_normal((n, r)).astype(np.float32), "v": (rng.standard_normal((r, cols)) * 0.1).astype(np.float32)}
          if enc == "lowrank" else {"gamma": rng.uniform(-2, 2, n).astype(np.float32)})
    idx = np.sort(rng.choice(n * cols, size=min(n_exc, n * cols), replace=False)).astype(np.int64)
    vals = rng.standard_normal(len(idx)).astype(np.float32)
    vals = (vals.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else vals.astype(STORAGE[dtype])
    e = make_edit("model.layers.0.mlp.down_proj.weight", (n + 2, cols), dtype, np.arange(n) + 1, raw, exceptions=(idx, vals), **kw)
    q = Patch.load(Patch(edits={e.name: e}, provenance={"method": "prop"}).save(tmp_path / "p.safetensors"))
    e2 = q.edits[e.name]
    assert e2.encoding == enc and e2.n_exceptions == len(idx)
    got = e2.new_rows(raw)
    ref = torch_reference(e2, base)
    assert got.tobytes() == ref.view(torch.int16 if dtype != "F32" else torch.float32).numpy().tobytes()


def test_rank_one_lowrank_is_factored():
    rng = np.random.default_rng(3)
    raw = torch.randn(6, 10).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).copy()
    s, v = rng.standard_normal(6).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    a = make_edit("w", (6, 10), "BF16", np.arange(6), raw, u=s[:, None], v=v[None, :])
    b = TensorEdit("w", (6, 10), "BF16", np.arange(6), "factored", "0" * 64, direction=v, scale=s)
    assert a.new_rows(raw).tobytes() == b.new_rows(raw).tobytes()


# ---- on a checkpoint -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dname", ["bf16", "fp32"])
def test_apply_lowrank_equals_torch_matmul_with_exceptions(ckpts, tmp_path, cli_runner, dname):
    """apply reproduces (w.float() + U @ V).to(dtype) exactly: the kernel where it agrees, exceptions elsewhere."""
    base = ckpts[(dname, False)]
    dt = {"bf16": "BF16", "fp32": "F32"}[dname]
    n_exc = 0
    ck = Checkpoint(base)
    state = load_tensors(base)
    gen = torch.Generator().manual_seed(0)
    target_state = {k: v.clone() for k, v in state.items()}
    edits = {}
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        w = state[name]
        u = torch.randn(w.shape[0], 8, generator=gen)
        v = torch.randn(8, w.shape[1], generator=gen) * 0.05
        target = (w.float() + u @ v).to(w.dtype)
        target_state[name] = target
        rows = np.arange(w.shape[0], dtype=np.int64)
        old = ck.read_rows(name, rows)
        plain = make_edit(name, ck.tensors[name].shape, dt, rows, old, u=u.numpy(), v=v.numpy())
        tgt = target.contiguous().view(torch.uint8).numpy().reshape(len(rows), -1).copy()
        exc = exceptions_for(plain.new_rows(old), tgt, dt)
        edits[name] = make_edit(name, ck.tensors[name].shape, dt, rows, old, u=u.numpy(), v=v.numpy(), exceptions=exc)
        assert edits[name].n_exceptions < w.numel() // 2  # where the two summation orders round apart
        n_exc += edits[name].n_exceptions
    assert n_exc > 0 or dt == "BF16"  # float32 keeps the summation order's last bits: exceptions carry them
    p = Patch(edits=edits, provenance={"method": "test"}).save(tmp_path / "lr.safetensors")
    ops.apply(str(p), base, tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    for k in state:
        assert out[k].view(-1).view(torch.uint8).equal(target_state[k].view(-1).view(torch.uint8)), k
    ops.revert(str(p), tmp_path / "out", tmp_path / "back")
    back = load_tensors(tmp_path / "back")
    assert all(back[k].view(torch.uint8).equal(state[k].view(torch.uint8)) for k in state)
    human = cli_runner("inspect", p)
    # every row of both tensors is edited: the second stores no rows of its own (v1.2, shared arrays)
    assert human.exit_code == 0 and "lowrank r8" in human.output and "v1.2" in human.output
    if dt == "BF16":
        return
    human = cli_runner("inspect", pinned_v11().save(tmp_path / "pinned.safetensors"))
    assert "lowrank r2" in human.output and "scale" in human.output and "+1 exceptions" in human.output


def test_a_scale_patch_without_its_undo_record_is_refused_in_one_line(ckpts, tmp_path, cli_runner):
    """A checkpoint patched elsewhere (no .patchkit/): a scale edit has no deltas to subtract, so revert
    says what to do instead, exits non-zero and writes nothing."""
    import filecmp
    import shutil

    base = ckpts[("bf16", False)]
    ck = Checkpoint(base)
    name = "model.layers.0.mlp.up_proj.weight"
    rows = np.array([1, 5, 9], np.int64)
    e = make_edit(name, tuple(ck.tensors[name].shape), ck.tensors[name].dtype, rows, ck.read_rows(name, rows),
                  gamma=np.array([0.5, 0.25, 0.75], np.float32))
    p = Patch(edits={name: e}, provenance={"method": "damping"}).save(tmp_path / "damp.safetensors")
    ops.apply(str(p), base, tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / ".patchkit")
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").glob("*.safetensors")}
    r = cli_runner("revert", p, tmp_path / "out", "--in-place")
    assert r.exit_code != 0 and r.output.count("\n") == 1
    assert "multiplied" in r.output and "without its undo record it cannot be reverted" in r.output
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").glob("*.safetensors")} == before
    assert not (tmp_path / "out" / ".patchkit").exists() and filecmp.cmp(base / "config.json", tmp_path / "out" / "config.json")
