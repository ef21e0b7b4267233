"""Format v1.2: arrays shared between edits are stored once (pinned bytes, round trips, refusals)."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from patchkit.core.patchcheck import check_minor
from patchkit.core.patchfile import Patch, make_edit
from patchkit.core.stfile import serialize
from patchkit.errors import PatchFormatError

A, B, C = (f"model.layers.{i}.mlp.gate_proj.weight" for i in range(3))


def base_rows(seed: int, n: int = 6, cols: int = 4) -> np.ndarray:
    """bf16 bits of an n x cols tensor near 1.0."""
    return (np.random.default_rng(seed).integers(0, 64, (n, cols)) + 0x3F80).astype("<u2")


def shared_patch(layers: int = 3) -> Patch:
    """The paper's shape: one direction and one scale over every layer, the same rows in two of them."""
    direction = np.array([0.25, -0.5, 1.0, 0.125], np.float32)
    edits = {}
    for i, name in enumerate(f"model.layers.{i}.mlp.gate_proj.weight" for i in range(layers)):
        rows = np.array([1, 4] if i != 1 else [0, 5])
        base = base_rows(i)
        edits[name] = make_edit(name, (6, 4), "BF16", rows, base[rows].view(np.uint8),
                                delta=np.repeat(direction[None, :] * np.float32(2.0), 2, axis=0))
    return Patch(edits=edits, base_model="tiny/model", base_revision="abc123",
                 provenance={"method": "test", "params": {}, "patchkit_version": "0.1.0"}, description="pinned v1.2")


def header_of(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n])


# Computed once from the implementation and pasted: a change here is a FORMAT CHANGE (see test_format.py).
PINNED_V12_TENSORS = (
    '{"model.layers.0.mlp.gate_proj.weight":{"encoding":"factored","rows":2},"model.layers.1.mlp.gate_proj.weight":'
    '{"encoding":"factored","rows":2,"shared":{"direction":"model.layers.0.mlp.gate_proj.weight","scale":'
    '"model.layers.0.mlp.gate_proj.weight"}},"model.layers.2.mlp.gate_proj.weight":{"encoding":"factored","rows":2,'
    '"shared":{"direction":"model.layers.0.mlp.gate_proj.weight","rows":"model.layers.0.mlp.gate_proj.weight",'
    '"scale":"model.layers.0.mlp.gate_proj.weight"}}}'
)
PINNED_V12_ID = "beef6fd388d52add9202a86d2dda7a894d780e9a19ead1a4d9eed0ba87bb4560"
PINNED_V12_FILE_SHA256 = "e7f12a30fad64288afaff065c98c0353d998da3f601a81126788043e6aa9d1fd"


def test_shared_arrays_are_stored_once_and_pinned(tmp_path):
    p = shared_patch()
    data = p.save(tmp_path / "p.safetensors").read_bytes()
    h = header_of(data)
    meta = h.pop("__metadata__")
    assert meta["format_minor"] == "2"
    assert sorted(h) == [f"{A}::direction", f"{A}::rows", f"{A}::scale", f"{B}::rows"]
    entries = json.loads(meta["tensors"])
    assert entries[A] == {"encoding": "factored", "rows": 2}
    assert entries[B] == {"encoding": "factored", "rows": 2, "shared": {"direction": A, "scale": A}}
    assert entries[C] == {"encoding": "factored", "rows": 2, "shared": {"direction": A, "rows": A, "scale": A}}
    assert meta["tensors"] == PINNED_V12_TENSORS
    assert meta["id"] == PINNED_V12_ID
    assert hashlib.sha256(data).hexdigest() == PINNED_V12_FILE_SHA256
    assert p.summary()["format"] == "patchkit.patch v1.2"


def test_round_trip_gives_the_same_edits_and_rows(tmp_path):
    p = shared_patch(layers=5)
    q = Patch.load(p.save(tmp_path / "p.safetensors"))
    assert q.id == p.id and sorted(q.edits) == sorted(p.edits)
    for name, e in p.edits.items():
        f = q.edits[name]
        assert np.array_equal(e.rows, f.rows) and np.array_equal(e.direction, f.direction) and np.array_equal(e.scale, f.scale)
        base = base_rows(int(name.split(".")[2]))[e.rows].view(np.uint8)
        assert np.array_equal(e.new_rows(base), f.new_rows(base))
    assert q.to_bytes() == (tmp_path / "p.safetensors").read_bytes()


def test_sharing_shrinks_the_paper_shape():
    """30 layers, one direction of 576: stored once instead of 30 times."""
    direction = np.random.default_rng(0).standard_normal(576).astype(np.float32)
    edits = {}
    for i in range(30):
        name = f"model.layers.{i}.mlp.gate_proj.weight"
        rows = np.sort(np.random.default_rng(i).choice(1536, 71, replace=False))
        base = np.zeros((71, 576), "<u2").view(np.uint8)
        edits[name] = make_edit(name, (1536, 576), "BF16", rows, base, delta=np.repeat(direction[None] * np.float32(3), 71, axis=0))
    p = Patch(edits=edits, provenance={"method": "test"})
    shared = len(p.to_bytes())
    unshared = len(serialize({k: v for e in edits.values() for k, v in e.arrays().items()}, p._metadata({})))
    assert sum(1 for k in p._arrays() if k.endswith("::direction")) == 1
    # 29 copies of the direction fewer; the metadata names the owner instead (about 100 bytes per tensor)
    assert shared <= unshared - 29 * (576 * 4 - 100), (shared, unshared)


def test_an_unshared_patch_keeps_its_format(tmp_path):
    p = shared_patch(layers=1)
    meta = header_of(p.to_bytes())["__metadata__"]
    assert "format_minor" not in meta and "shared" not in meta["tensors"]


def forged(p: Patch, path, entries=None, meta=None, drop=(), add=None):
    m = p._metadata()
    m.update(meta or {})
    t = json.loads(m["tensors"])
    for name, entry in (entries or {}).items():
        t[name] = entry
    m["tensors"] = json.dumps(t, sort_keys=True, separators=(",", ":"))
    arrays = {k: v for k, v in p._arrays().items() if k not in drop}
    arrays.update(add or {})
    m.pop("id", None)
    m["id"] = hashlib.sha256(serialize(arrays, m)).hexdigest()
    path.write_bytes(serialize(arrays, m))
    return path


@pytest.mark.parametrize("case, match", [
    ("minor1", r"shares arrays, which needs patch format v1\.2"),
    ("chain", "which does not store one"),
    ("self", "which does not store one"),
    ("missing-owner", "which does not store one"),
    ("not-shareable", "cannot be shared"),
    ("not-an-object", "shared must be an object"),
    ("stray", "not described by the metadata"),
    ("wrong-length", "rows|row count"),
])
def test_bad_sharing_is_refused(tmp_path, case, match):
    p = shared_patch()
    c_entry = {"encoding": "factored", "rows": 2, "shared": {"direction": A, "rows": A, "scale": A}}
    kw = {
        "minor1": {"meta": {"format_minor": "1"}},
        "chain": {"entries": {C: {**c_entry, "shared": {"direction": B, "rows": A, "scale": A}}}},
        "self": {"entries": {C: {**c_entry, "shared": {"direction": C, "rows": A, "scale": A}}}},
        "missing-owner": {"entries": {C: {**c_entry, "shared": {"direction": "model.nothing", "rows": A, "scale": A}}}},
        "not-shareable": {"entries": {C: {**c_entry, "shared": {"delta": A, "rows": A, "scale": A}}}},
        "not-an-object": {"entries": {C: {**c_entry, "shared": ["direction"]}}},
        "stray": {"add": {f"{C}::rows": ("I64", np.array([1, 4]))}},
        "wrong-length": {"entries": {B: {"encoding": "factored", "rows": 2, "shared": {"direction": A, "scale": A, "rows": A}},
                                     C: {"encoding": "factored", "rows": 3, "shared": {"direction": A, "rows": A, "scale": A}}}},
    }[case]
    with pytest.raises(PatchFormatError, match=match):
        Patch.load(forged(p, tmp_path / f"{case}.safetensors", **kw))


def test_an_older_reader_asks_for_an_upgrade(tmp_path):
    meta = header_of(shared_patch().to_bytes())["__metadata__"]
    with pytest.raises(PatchFormatError, match=r"uses patch format v1\.2; this patchkit reads v1\.1: upgrade patchkit"):
        check_minor(tmp_path / "p.safetensors", meta, 1)


def test_a_file_keeps_its_own_sharing(tmp_path):
    """A v1.0 file whose edits repeat an array (written before v1.2) loads with its id, and saves back
    byte for byte; the same edits written afresh share the array (v1.2) and apply the same."""
    p = shared_patch()
    p.sharing = {}
    old = p.save(tmp_path / "v10.safetensors").read_bytes()
    assert "format_minor" not in header_of(old)["__metadata__"]
    q = Patch.load(tmp_path / "v10.safetensors")
    assert q.id == p.id and q.to_bytes() == old
    q.description = "with a new description"
    assert "format_minor" not in header_of(q.to_bytes())["__metadata__"]
    fresh = Patch(edits=q.edits, provenance=q.provenance)
    assert header_of(fresh.to_bytes())["__metadata__"]["format_minor"] == "2"
    r = Patch.load(fresh.save(tmp_path / "v12.safetensors"))
    for name, e in q.edits.items():
        base = base_rows(int(name.split(".")[2]))[e.rows].view(np.uint8)
        assert np.array_equal(e.new_rows(base), r.edits[name].new_rows(base))


def test_a_sharing_that_no_longer_holds_is_recomputed():
    p = shared_patch()
    p.sharing = {C: {"direction": A}}
    p.edits[C].direction = p.edits[C].direction * np.float32(2)
    assert C not in p._shares() or "direction" not in p._shares()[C]
