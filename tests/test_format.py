"""The patch file format v1: deterministic bytes, pinned layout, round trips, and every way a file can be bad."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from patchkit.core.dtypes import STORAGE
from patchkit.core.patchfile import Patch, TensorEdit, factorize, make_edit
from patchkit.core.stfile import serialize
from patchkit.errors import PatchFormatError


# ---- a tiny hand-built patch -------------------------------------------------------------------------
def pinned_patch() -> Patch:
    """One dense F32 edit and one factored BF16 edit, from fixed arrays."""
    base_a = np.arange(12, dtype="<f4").reshape(4, 3)
    rows_a = np.array([1, 3])
    ea = make_edit(
        "model.layers.0.mlp.gate_proj.weight", (4, 3), "F32", rows_a, base_a[rows_a].view(np.uint8),
        delta=np.array([[0.5, -0.25, 1.0], [2.0, 0.0, -1.0]], dtype=np.float32),
    )
    base_b = (np.arange(12, dtype="<u2").reshape(4, 3) + 0x3F80).astype("<u2")  # bf16 bits near 1.0
    rows_b = np.array([0, 2])
    eb = make_edit(
        "model.layers.1.mlp.up_proj.weight", (4, 3), "BF16", rows_b, base_b[rows_b].view(np.uint8),
        delta=np.array([[1, 2, 3], [2, 4, 6]], dtype=np.float32) * np.float32(0.125),
    )
    return Patch(
        edits={ea.name: ea, eb.name: eb},
        base_model="tiny/model",
        base_revision="abc123",
        # patchkit_version given explicitly so that a version bump does not change the pinned bytes
        provenance={"method": "test", "params": {"alpha": 2}, "patchkit_version": "0.1.0"},
        description="pinned",
    )


# The exact header and file hash of `pinned_patch()`. These literals were computed once from the
# implementation and pasted here. If this test fails, what patchkit writes has changed: that is a
# FORMAT CHANGE. Do not just update the literals: bump FORMAT_VERSION, update docs/format.md, and
# make sure readers of v1 files still work.
PINNED_HEADER = (
    '{"__metadata__":{"base":"{\\"model_id\\":\\"tiny/model\\",\\"revision\\":\\"abc123\\",\\"tensors\\":'
    '{\\"model.layers.0.mlp.gate_proj.weight\\":{\\"dtype\\":\\"F32\\",\\"result_sha256\\":'
    '\\"11f5e2b93ccdb65bf974b9ae418453aceba2fa6d625dcc98848637979bdb1cf4\\",\\"rows_sha256\\":'
    '\\"3ebbc8613dc806229332f260f577abc83207e1b2cf837284ac92504f48643e11\\",\\"shape\\":[4,3]},'
    '\\"model.layers.1.mlp.up_proj.weight\\":{\\"dtype\\":\\"BF16\\",\\"result_sha256\\":'
    '\\"4fd72cf69551d16b55392eff8de4bcbb8aa701cdbe5ecbb4c6b7f2efe91b6ab7\\",\\"rows_sha256\\":'
    '\\"3d91af758c8e37a3faf63251ffb6984d81a7c02c92dadd9d22ab10670e6d6aa6\\",\\"shape\\":[4,3]}}}",'
    '"description":"pinned","format":"patchkit.patch","format_version":"1",'
    '"id":"da2407815a99b01582cb3fbcd34f3e18c591db0757b2127a7860a377d058dbfe",'
    '"provenance":"{\\"method\\":\\"test\\",\\"params\\":{\\"alpha\\":2},\\"patchkit_version\\":\\"0.1.0\\"}",'
    '"tensors":"{\\"model.layers.0.mlp.gate_proj.weight\\":{\\"encoding\\":\\"dense\\",\\"rows\\":2},'
    '\\"model.layers.1.mlp.up_proj.weight\\":{\\"encoding\\":\\"factored\\",\\"rows\\":2}}"},'
    '"model.layers.0.mlp.gate_proj.weight::delta":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},'
    '"model.layers.0.mlp.gate_proj.weight::rows":{"dtype":"I64","shape":[2],"data_offsets":[24,40]},'
    '"model.layers.1.mlp.up_proj.weight::direction":{"dtype":"F32","shape":[3],"data_offsets":[40,52]},'
    '"model.layers.1.mlp.up_proj.weight::rows":{"dtype":"I64","shape":[2],"data_offsets":[52,68]},'
    '"model.layers.1.mlp.up_proj.weight::scale":{"dtype":"F32","shape":[2],"data_offsets":[68,76]}}   '
)
PINNED_SHA256 = "33d3b92ac943f36aaba68a7155949d6ee29b4576eb2cf37556a6f4deaa27569b"
PINNED_ID = "da2407815a99b01582cb3fbcd34f3e18c591db0757b2127a7860a377d058dbfe"


def header_text(data: bytes) -> str:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n].decode("utf-8")


def test_pinned_bytes(tmp_path):
    p = pinned_patch()
    path = p.save(tmp_path / "pinned.safetensors")
    data = path.read_bytes()
    assert header_text(data) == PINNED_HEADER
    assert (8 + len(PINNED_HEADER.encode())) % 8 == 0
    assert hashlib.sha256(data).hexdigest() == PINNED_SHA256
    assert p.id == PINNED_ID
    # the id is the sha256 of the file as written without the id key (docs/format.md)
    meta = p._metadata()
    assert hashlib.sha256(serialize(p._arrays(), meta)).hexdigest() == PINNED_ID


def test_saved_twice_byte_identical(tmp_path):
    a = pinned_patch().save(tmp_path / "a.safetensors").read_bytes()
    b = pinned_patch().save(tmp_path / "b.safetensors").read_bytes()
    assert a == b
    # and a load/save cycle writes the same bytes again
    c = Patch.load(tmp_path / "a.safetensors").save(tmp_path / "c.safetensors").read_bytes()
    assert c == a


def test_safe_open_reads_a_patch(tmp_path):
    from safetensors import safe_open

    path = pinned_patch().save(tmp_path / "p.safetensors")
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        meta = f.metadata()
        assert f.get_tensor("model.layers.0.mlp.gate_proj.weight::rows").tolist() == [1, 3]
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight::scale").tolist() == [0.5, 1.0]
    assert names == {
        "model.layers.0.mlp.gate_proj.weight::rows",
        "model.layers.0.mlp.gate_proj.weight::delta",
        "model.layers.1.mlp.up_proj.weight::rows",
        "model.layers.1.mlp.up_proj.weight::direction",
        "model.layers.1.mlp.up_proj.weight::scale",
    }
    assert meta["format"] == "patchkit.patch" and meta["format_version"] == "1" and meta["id"] == PINNED_ID


# ---- round trip (property) ------------------------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64"]


@hs.composite
def edits(draw, name):
    n_rows = draw(hs.integers(1, 12))
    n_cols = draw(hs.integers(1, 9))
    ndim = draw(hs.sampled_from([1, 2, 3])) if n_rows == 1 else draw(hs.sampled_from([2, 3]))
    if ndim == 1:
        shape = (n_cols,)
    elif ndim == 2:
        shape = (n_rows, n_cols)
    else:
        a = draw(hs.sampled_from([d for d in (1, 2, 3, 4) if n_rows % d == 0]))
        shape = (a, n_rows // a, n_cols)
    total_rows = 1 if ndim == 1 else n_rows
    dtype = draw(hs.sampled_from(DTYPES))
    rows = sorted(draw(hs.sets(hs.integers(0, total_rows - 1), min_size=1, max_size=total_rows)))
    rows = np.array(rows, dtype=np.int64)
    seed = draw(hs.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    st = STORAGE[dtype]
    base = np.zeros((len(rows), n_cols), dtype=st)  # any bytes will do for the fingerprint
    base_raw = base.view(np.uint8)
    enc = draw(hs.sampled_from(["dense", "factored1", "factoredN", "replace"]))
    if enc == "replace":
        vals = rng.standard_normal((len(rows), n_cols)).astype(np.float32)
        if dtype == "BF16":
            vals = (vals.view(np.uint32) >> 16).astype(np.uint16)
        else:
            vals = vals.astype(st)
        return make_edit(name, shape, dtype, rows, base_raw, values=vals)
    v = rng.standard_normal(n_cols).astype(np.float32)
    if enc == "factored1":
        delta = np.tile(v, (len(rows), 1))
    elif enc == "factoredN":
        delta = rng.choice(np.array([-2, -0.5, 1, 4], dtype=np.float32), size=len(rows))[:, None] * v[None, :]
    else:
        delta = rng.standard_normal((len(rows), n_cols)).astype(np.float32)
    return make_edit(name, shape, dtype, rows, base_raw, delta=delta)


@hs.composite
def patches(draw):
    n = draw(hs.integers(1, 3))
    es = {}
    for i in range(n):
        e = draw(edits(f"model.layers.{i}.mlp.w{draw(hs.integers(0, 9))}.weight"))
        es[e.name] = e
    desc = draw(hs.one_of(hs.none(), hs.text(min_size=1, max_size=20)))
    return Patch(edits=es, base_model=draw(hs.one_of(hs.none(), hs.just("org/model"))), description=desc,
                 provenance={"method": "prop", "params": {"n": n}}, parents=draw(hs.lists(hs.just("ab" * 32), max_size=1)))


def edits_equal(a: TensorEdit, b: TensorEdit) -> None:
    assert (a.name, a.shape, a.dtype, a.encoding, a.base_sha256, a.result_sha256) == (
        b.name, b.shape, b.dtype, b.encoding, b.base_sha256, b.result_sha256)
    for field in ("rows", "delta", "direction", "scale", "values"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), field


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=patches())
def test_load_save_round_trip(tmp_path, p):
    path = p.save(tmp_path / "rt.safetensors")
    q = Patch.load(path)
    assert q.id == p.id
    assert sorted(q.edits) == sorted(p.edits)
    for name in p.edits:
        edits_equal(p.edits[name], q.edits[name])
    assert (q.base_model, q.description, q.parents) == (p.base_model, p.description, p.parents)
    assert q.provenance["method"] == "prop"
    assert q.to_bytes() == path.read_bytes()


# ---- corruption ------------------------------------------------------------------------------------------
@pytest.fixture
def small_patch(tmp_path):
    return pinned_patch().save(tmp_path / "small.safetensors")


def test_any_flipped_byte_is_detected(small_patch):
    # Bytes are flipped in place with pwrite (rewriting a truncated file is slow on ext4).
    data = small_patch.read_bytes()
    undetected = []
    fd = os.open(small_patch, os.O_RDWR)
    try:
        for i in range(len(data)):
            for mask in (0x01, 0x80):
                os.pwrite(fd, bytes([data[i] ^ mask]), i)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        Patch.load(small_patch)
                except PatchFormatError as e:
                    assert str(e) and "\n" not in str(e)
                else:
                    undetected.append((i, mask))
                os.pwrite(fd, bytes([data[i]]), i)
    finally:
        os.close(fd)
    assert not undetected, f"flips at (byte, mask) {undetected[:10]} were not detected"
    assert Patch.load(small_patch).id == PINNED_ID  # the file is whole again


def test_flipped_data_byte_is_a_content_id_mismatch(small_patch, tmp_path):
    data = bytearray(small_patch.read_bytes())
    data[-1] ^= 0x01  # last byte of the last scale: still a finite float
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(PatchFormatError, match="content id"):
        Patch.load(bad)


def test_every_truncation_is_refused(small_patch):
    data = small_patch.read_bytes()
    fd = os.open(small_patch, os.O_RDWR)
    try:
        for n in range(len(data) - 1, -1, -1):
            os.ftruncate(fd, n)
            with pytest.raises(PatchFormatError, match="not a readable safetensors file"):
                Patch.load(small_patch)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not a readable safetensors"),
        (b"hello, this is not a patch at all\n" * 10, "not a readable safetensors"),
        (struct.pack("<Q", 2**40) + b"{}", "not a readable safetensors"),
        (struct.pack("<Q", 4) + b"[1] ", "not a readable safetensors"),
        (bytes(range(256)) * 4, "not a readable safetensors"),
    ],
    ids=["empty", "text", "huge-header", "not-object", "binary"],
)
def test_garbage_files(tmp_path, content, match):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(PatchFormatError, match=match):
        Patch.load(bad)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(PatchFormatError, match="does not exist"):
        Patch.load(tmp_path / "nope.safetensors")
    with pytest.raises(PatchFormatError, match="folder"):
        Patch.load(tmp_path)


def test_plain_safetensors_is_not_a_patch(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(p))
    with pytest.raises(PatchFormatError, match="not a patchkit patch"):
        Patch.load(p)
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(p), metadata={"format": "pt"})
    with pytest.raises(PatchFormatError, match="not a patchkit patch"):
        Patch.load(p)


def forge(p: Patch, path, arrays=None, meta_update=None, meta_drop=()):
    """Write `p` with changed arrays or metadata and a *valid* content id for what is written,
    so that the reader has to catch the problem itself, not through the id."""
    meta = p._metadata()
    meta.update(meta_update or {})
    for k in meta_drop:
        meta.pop(k, None)
    arr = {}
    for e in p.edits.values():
        arr.update(e.arrays())
    arr.update(arrays or {})
    meta["id"] = hashlib.sha256(serialize(arr, meta)).hexdigest()
    path.write_bytes(serialize(arr, meta))
    return path


def test_forge_without_changes_loads(tmp_path):
    # the forging helper itself writes a valid patch: the failures below are the changes' doing
    p = pinned_patch()
    q = Patch.load(forge(p, tmp_path / "ok.safetensors"))
    assert q.id == p.id


def test_newer_format_version_is_refused(tmp_path):
    path = forge(pinned_patch(), tmp_path / "v2.safetensors", meta_update={"format_version": "2"})
    with pytest.raises(PatchFormatError, match=r"format v2.*upgrade patchkit"):
        Patch.load(path)


def test_bad_format_version_and_missing_metadata(tmp_path):
    with pytest.raises(PatchFormatError, match="format_version"):
        Patch.load(forge(pinned_patch(), tmp_path / "a.safetensors", meta_update={"format_version": "one"}))
    with pytest.raises(PatchFormatError, match="missing or malformed"):
        Patch.load(forge(pinned_patch(), tmp_path / "b.safetensors", meta_drop=["base"]))
    with pytest.raises(PatchFormatError, match="missing or malformed"):
        Patch.load(forge(pinned_patch(), tmp_path / "c.safetensors", meta_update={"tensors": "{not json"}))


D = "model.layers.0.mlp.gate_proj.weight"
F = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({f"{D}::delta": ("F32", np.array([[np.nan, 0, 0], [0, 0, 0]], np.float32))}, "NaN or inf"),
        ({f"{D}::delta": ("F32", np.array([[0, np.inf, 0], [0, 0, 0]], np.float32))}, "NaN or inf"),
        ({f"{F}::direction": ("F32", np.array([0, -np.inf, 0], np.float32))}, "NaN or inf"),
        ({f"{F}::scale": ("F32", np.array([np.nan, 1], np.float32))}, "NaN or inf"),
        ({f"{D}::rows": ("I64", np.array([3, 3]))}, "duplicated"),
        ({f"{D}::rows": ("I64", np.array([3, 1]))}, "not sorted"),
        ({f"{D}::rows": ("I64", np.array([1, 4]))}, r"row index 4 is out of range 0\.\.3"),
        ({f"{D}::rows": ("I64", np.array([-1, 2]))}, "out of range"),
        ({f"{D}::rows": ("I32", np.array([1, 3], np.int32))}, "int64"),
        ({f"{D}::delta": ("F32", np.zeros((2, 4), np.float32))}, r"delta must be float32 \[2, 3\]"),
        ({f"{F}::scale": ("F32", np.ones(3, np.float32))}, "scale must have 2 entries or 1"),
        ({"stray::thing": ("F32", np.ones(1, np.float32))}, "not described by the metadata"),
    ],
    ids=["nan-delta", "inf-delta", "inf-direction", "nan-scale", "dup-rows", "unsorted-rows", "row-too-big",
         "row-negative", "rows-int32", "delta-shape", "scale-len", "stray-tensor"],
)
def test_invalid_content_is_refused(tmp_path, arrays, match):
    path = forge(pinned_patch(), tmp_path / "bad.safetensors", arrays=arrays)
    with pytest.raises(PatchFormatError, match=match):
        Patch.load(path)


def test_missing_tensor_and_unknown_encoding(tmp_path):
    p = pinned_patch()
    meta = p._metadata()
    arr = {}
    for e in p.edits.values():
        arr.update(e.arrays())
    del arr[f"{D}::delta"]
    meta["id"] = hashlib.sha256(serialize(arr, meta)).hexdigest()
    (tmp_path / "m.safetensors").write_bytes(serialize(arr, meta))
    with pytest.raises(PatchFormatError, match=f"missing tensor {D}::delta"):
        Patch.load(tmp_path / "m.safetensors")
    tensors = json.loads(meta["tensors"])
    tensors[D]["encoding"] = "sparse"
    path = forge(p, tmp_path / "e.safetensors", meta_update={"tensors": json.dumps(tensors)})
    with pytest.raises(PatchFormatError, match="unknown encoding 'sparse'"):
        Patch.load(path)


def test_writer_refuses_invalid_edits(tmp_path):
    p = pinned_patch()
    p.edits[D].delta = np.array([[np.nan, 0, 0], [0, 0, 0]], np.float32)
    with pytest.raises(PatchFormatError, match="NaN or inf"):
        p.save(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(PatchFormatError, match="at least one tensor"):
        Patch(edits={}).to_bytes()
    with pytest.raises(PatchFormatError, match="duplicated"):
        make_edit("w", (4, 3), "F32", [1, 1], np.zeros((2, 12), np.uint8), delta=np.zeros((2, 3), np.float32))
    with pytest.raises(PatchFormatError, match="out of range"):
        make_edit("w", (4, 3), "F32", [1, 9], np.zeros((2, 12), np.uint8), delta=np.zeros((2, 3), np.float32))


def test_unknown_metadata_keys_load_with_a_warning(tmp_path):
    p = pinned_patch()
    path = forge(p, tmp_path / "x.safetensors", meta_update={"x-future-key": "hello"})
    with pytest.warns(UserWarning, match="x-future-key"):
        q = Patch.load(path)
    assert q.extra == {"x-future-key": "hello"}
    assert q.id != p.id  # the key is part of the content
    # kept as it is: saving again gives the same bytes
    assert q.to_bytes() == path.read_bytes()


# ---- factorize --------------------------------------------------------------------------------------------
def test_factorize_single_scale():
    v = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    delta = np.tile(v, (5, 1))
    direction, scale = factorize(delta)
    assert scale.shape == (1,) and np.array_equal(direction * scale[0], v)
    e = make_edit("w", (8, 16), "F32", [0, 1, 2, 3, 7], np.zeros((5, 64), np.uint8), delta=delta)
    assert e.encoding == "factored" and e.scale.shape == (1,)
    assert np.array_equal(e.deltas(), delta)


def test_factorize_per_row_scale():
    rng = np.random.default_rng(1)
    v = rng.standard_normal(16).astype(np.float32)
    s = np.array([1, -2, 0.5, 3, 0], dtype=np.float32)
    delta = s[:, None] * v[None, :]
    direction, scale = factorize(delta)
    assert scale.shape == (5,)
    assert np.array_equal(scale[:, None] * direction[None, :], delta)
    e = make_edit("w", (8, 16), "F32", [0, 1, 2, 3, 7], np.zeros((5, 64), np.uint8), delta=delta)
    assert e.encoding == "factored" and np.array_equal(e.deltas(), delta)


def test_factorize_falls_back_to_dense():
    rng = np.random.default_rng(2)
    delta = rng.standard_normal((5, 16)).astype(np.float32)
    assert factorize(delta) is None
    e = make_edit("w", (8, 16), "F32", [0, 1, 2, 3, 7], np.zeros((5, 64), np.uint8), delta=delta)
    assert e.encoding == "dense" and np.array_equal(e.delta, delta)
    # nearly a multiple, but not bit for bit: still dense
    v = rng.standard_normal(16).astype(np.float32)
    near = np.stack([v, v * np.float32(2)])
    near[1, 3] = np.nextafter(near[1, 3], np.float32(np.inf))
    assert factorize(near) is None
    assert factorize(np.zeros((3, 4), np.float32))[1].shape == (1,)  # all rows equal (zero)
    e = make_edit("w", (8, 16), "F32", [0, 1, 2, 3, 7], np.zeros((5, 64), np.uint8), delta=np.tile(v, (5, 1)), factor=False)
    assert e.encoding == "dense"


def test_factorize_is_bit_exact_with_signed_zeros():
    # -0.0 == 0.0 numerically, but old + (-0.0) and old + 0.0 differ when old is -0.0: the
    # encoding must give back the very bits of the deltas it was given.
    delta = np.array([[-0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    fac = factorize(delta)
    if fac is not None:
        direction, scale = fac
        scale = np.repeat(scale, 2) if len(scale) == 1 else scale
        assert (scale[:, None] * direction[None, :]).view(np.uint32).tolist() == delta.view(np.uint32).tolist()
    e = make_edit("w", (4, 2), "F32", [0, 1], np.zeros((2, 8), np.uint8), delta=delta)
    assert e.deltas().view(np.uint32).tolist() == delta.view(np.uint32).tolist()
    base = np.array([[-0.0, 0.0], [-0.0, 0.0]], dtype=np.float32)
    new = e.new_rows(base.view(np.uint8)).view(np.float32)
    assert np.signbit(new[0, 0]) and not np.signbit(new[1, 0])


def test_rows_are_read_the_same_without_preadv(monkeypatch, tmp_path):
    """Where os.preadv is missing (not every macOS build of Python has it), rows are read with os.pread."""
    from patchkit.core import stfile, tensorio

    rng = np.random.default_rng(4)
    arr = rng.integers(0, 2**16, size=(40, 24), dtype=np.uint16)
    path = tmp_path / "t.safetensors"
    path.write_bytes(stfile.serialize({"w": ("BF16", arr)}, {}))
    info = stfile.read_header(path).tensors["w"]
    rows = np.array([0, 1, 2, 7, 20, 39], dtype=np.int64)
    fast = tensorio.read_rows(info, rows)
    monkeypatch.setattr(tensorio, "_HAS_PREADV", False)
    slow = tensorio.read_rows(info, rows)
    assert np.array_equal(fast, slow) and np.array_equal(fast.view(np.uint16), arr[rows])


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 5)])
def test_rows_hash_is_sha256_of_the_bytes_for_every_shape(shape):
    from patchkit.core.patchfile import rows_hash

    a = np.arange(int(np.prod(shape)), dtype=np.uint16).reshape(shape)
    assert rows_hash(a) == hashlib.sha256(a.tobytes()).hexdigest()
    assert rows_hash(a.T) == hashlib.sha256(np.ascontiguousarray(a.T).tobytes()).hexdigest()  # not contiguous


def test_nan_and_infinity_in_metadata_are_written_as_null(tmp_path):
    """A probe never scored (NaN accuracy) or a perplexity past a float must not make an unreadable patch."""
    p = pinned_patch()
    p.provenance = {"method": "test", "accuracy": {"train": float("nan")}, "patchkit_version": "0.1.0"}
    p.evaluation = {"ppl": [float("inf"), 1.5, float("-inf")]}
    q = Patch.load(p.save(tmp_path / "nan.safetensors"))
    assert q.provenance["accuracy"]["train"] is None and q.evaluation == {"ppl": [None, 1.5, None]}
    assert pinned_patch().to_bytes() == pinned_patch().to_bytes()  # finite metadata: written as before
