"""Hostile safetensors headers and patch files: one typed `error:` line each, never a traceback or a
hang, nothing changed on disk, memory bounded; and a tensor of an unknown dtype carried through."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import time

import numpy as np
import pytest

from conftest import build_patch
from helpers import snapshot
from patchkit.core.patchfile import Patch
from patchkit.core.stfile import encode_header, read_header
from patchkit.errors import (
    BaseMismatchError, CheckpointError, PatchFormatError, PatchkitError, UnsupportedError,
)

GOOD_ENTRY = '{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}'


def st_file(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from a header given as JSON text (or bytes), with an optional lying length."""
    raw = header.encode() if isinstance(header, str) else header
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tensor_header(entry: str, name: str = "w") -> str:
    return "{" + json.dumps(name) + ":" + entry + "}"


def one_line_error(r, match=None, code=None):
    """A failed command: exit non-zero through click, no traceback, exactly one `error: ` line."""
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), f"uncaught {r.exception!r}"
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert len(lines[0]) < 600, lines[0]  # a name or value of megabytes is never echoed whole
    if match is not None:
        assert match in lines[0], lines[0]
    if code is not None:
        assert r.exit_code == code, r.stderr


@pytest.fixture
def hostile(tmp_path, copy_ckpt, cli_runner):
    """hostile(data, match=None, checkpoint=True): run inspect, apply --dry-run (the file as the patch)
    and, with `checkpoint`, apply --dry-run and status with the file as a checkpoint's model.safetensors;
    each must fail with one line and leave the folders byte-identical."""
    ck = copy_ckpt()
    good = build_patch(ck).save(tmp_path / "good.safetensors")

    def run(data: bytes, match: str | None = None, checkpoint: bool = True, patch_match: str | None = None):
        path = tmp_path / "hostile.safetensors"
        path.write_bytes(data)
        before = snapshot(ck)
        one_line_error(cli_runner("inspect", path), patch_match or match, PatchFormatError.exit_code)
        one_line_error(cli_runner("apply", path, ck, "--dry-run", "--in-place"), patch_match or match, PatchFormatError.exit_code)
        assert snapshot(ck) == before
        if checkpoint:
            bad = copy_ckpt()
            (bad / "model.safetensors").write_bytes(data)
            before = snapshot(bad)
            one_line_error(cli_runner("apply", good, bad, "--dry-run", "--in-place"), match, CheckpointError.exit_code)
            one_line_error(cli_runner("status", bad), match, CheckpointError.exit_code)
            assert snapshot(bad) == before

    return run


# ---- the JSON itself ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    '{"w":' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"w":' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "}",
    '{"__metadata__":' + '{"a":' * 50_000 + '"x"' + "}" * 50_000 + "}",
    '{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16],"x":' + "[" * 5000 + "]" * 5000 + "}}",
], ids=["arrays", "objects", "in-metadata", "in-an-entry"])
def test_deeply_nested_json(hostile, text):
    hostile(st_file(text, bytes(16)), "header")


@pytest.mark.parametrize("entry", [
    '{"dtype":"F32","shape":[Infinity],"data_offsets":[0,16]}',
    '{"dtype":"F32","shape":[2,2],"data_offsets":[0,Infinity]}',
    '{"dtype":"F32","shape":[-Infinity,2],"data_offsets":[0,16]}',
    '{"dtype":"F32","shape":[NaN],"data_offsets":[0,16]}',
    '{"dtype":"F32","shape":[2,2],"data_offsets":[NaN,16]}',
    '{"dtype":"F32","shape":[1e999],"data_offsets":[0,16]}',
], ids=["inf-shape", "inf-offset", "neg-inf", "nan-shape", "nan-offset", "float-overflow"])
def test_infinity_and_nan(hostile, entry):
    hostile(st_file(tensor_header(entry), bytes(16)), "header")


@pytest.mark.parametrize("number", ["1" + "0" * 5000, "1" + "0" * 25, "-" + "9" * 30, "18446744073709551616"],
                         ids=["5001-digits", "26-digits", "negative-31-digits", "2**64"])
def test_huge_integers(hostile, number):
    hostile(st_file(tensor_header('{"dtype":"F32","shape":[' + number + '],"data_offsets":[0,16]}'), bytes(16)), "header")
    hostile(st_file(tensor_header('{"dtype":"F32","shape":[4],"data_offsets":[0,' + number + ']}'), bytes(16)), "header")


@pytest.mark.parametrize("dtype", ['["F32"]', '{"a":1}', "5", "null", "true", '""', '"' + "F" * 10_000 + '"',
                                   '"F32 "', '"f\\u0000"', '"\\ud800"'],
                         ids=["list", "object", "number", "null", "bool", "empty", "very-long", "space", "nul", "lone-surrogate"])
def test_odd_dtypes(hostile, dtype):
    hostile(st_file(tensor_header('{"dtype":' + dtype + ',"shape":[2,2],"data_offsets":[0,16]}'), bytes(16)), "header")


@pytest.mark.parametrize("shape, offsets", [
    ("[true,2]", "[0,16]"), ("[2,2]", "[false,16]"), ("[2.0,2]", "[0,16]"), ("[2,2]", "[0,16.0]"),
    ("[2.5,2]", "[0,16]"), ("[2,2]", "[0.5,16]"), ('["2",2]', "[0,16]"), ("[2,2]", "[0]"), ("[2,2]", "[0,16,32]"),
    ("[-2,-2]", "[0,16]"), ("[2,2]", "[16,0]"), ("2", "[0,16]"), ("[[2],2]", "[0,16]"), ("[" + ",".join(["1"] * 65) + "]", "[0,4]"),
    ("[4294967296,4294967296,4294967296]", "[0,0]"),
], ids=["bool-shape", "bool-offset", "float-2.0", "float-offset-16.0", "float-2.5", "float-offset-0.5", "string-dim",
        "one-offset", "three-offsets", "negative", "reversed", "scalar-shape", "nested-shape", "65-dims", "product-over-2**63"])
def test_only_json_integers_in_shapes_and_offsets(hostile, shape, offsets):
    hostile(st_file(tensor_header('{"dtype":"F32","shape":' + shape + ',"data_offsets":' + offsets + "}"), bytes(16)), "header")


@pytest.mark.parametrize("name", ["", "x" * 5000], ids=["empty", "huge"])
def test_tensor_names_empty_or_huge(hostile, name):
    hostile(st_file(tensor_header(GOOD_ENTRY, name), bytes(16)), "tensor name")


@pytest.mark.parametrize("text", [
    '{"__metadata__":{"a":1},"w":' + GOOD_ENTRY + "}",
    '{"__metadata__":{"a":["x"]},"w":' + GOOD_ENTRY + "}",
    '{"__metadata__":"x","w":' + GOOD_ENTRY + "}",
    '{"__metadata__":{"a":"x","a":"y"},"w":' + GOOD_ENTRY + "}",
    '{"w":' + GOOD_ENTRY + ',"w":' + GOOD_ENTRY + "}",
    '{"w":{"dtype":"F32","dtype":"F16","shape":[2,2],"data_offsets":[0,16]}}',
    '{"w":{"dtype":"F32","shape":[2,2]}}',
    '{"w":"F32"}', '{"w":[1,2]}', '[1,2]', '"text"', "{}x", '{"w":{"t":' + GOOD_ENTRY + "}}",
], ids=["metadata-number", "metadata-list", "metadata-string", "metadata-repeated-key", "repeated-tensor",
        "repeated-key-in-entry", "no-offsets", "entry-string", "entry-list", "top-list", "top-string", "trailing",
        "nested-table"])
def test_malformed_structure(hostile, text):
    hostile(st_file(text, bytes(16)), "header")


@pytest.mark.parametrize("data, match", [
    (b"", "shorter"), (b"\x01\x00", "shorter"),
    (st_file(tensor_header(GOOD_ENTRY), bytes(16), length=2**64 - 1), "limit"),
    (st_file(tensor_header(GOOD_ENTRY), bytes(16), length=2**26), "truncated"),
    (st_file(tensor_header(GOOD_ENTRY), bytes(8)), "truncated"),
    (st_file(tensor_header(GOOD_ENTRY), bytes(24)), "bytes"),
    (st_file(b"\xff\xfe{}"), "UTF-8"),
    (st_file(tensor_header('{"dtype":"F32","shape":[2],"data_offsets":[8,16]}'), bytes(16)), "gap"),
    (st_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
             bytes(12)), "overlaps"),
], ids=["empty", "short-prefix", "length-2**64", "length-past-file", "data-short", "data-long", "not-utf8", "gap", "overlap"])
def test_lengths_offsets_and_sizes(hostile, data, match):
    hostile(data, match)


# ---- caps ----------------------------------------------------------------------------------------------
def test_header_length_cap_is_configurable(hostile, monkeypatch):
    data = st_file('{"__metadata__":{"pad":"' + "x" * 100_000 + '"},"w":' + GOOD_ENTRY + "}", bytes(16))
    monkeypatch.setenv("PATCHKIT_MAX_HEADER_BYTES", str(1 << 16))  # more than the real checkpoint's header
    hostile(data, "PATCHKIT_MAX_HEADER_BYTES")
    monkeypatch.setenv("PATCHKIT_MAX_HEADER_BYTES", str(1 << 20))
    assert read_header_of(data, monkeypatch) == ["w"]


def read_header_of(data: bytes, monkeypatch) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.safetensors")
        with open(p, "wb") as f:
            f.write(data)
        return list(read_header(p).tensors)


def test_a_bad_limit_variable_is_one_line(tmp_path, cli_runner, monkeypatch, copy_ckpt):
    ck = copy_ckpt()
    p = build_patch(ck).save(tmp_path / "p.safetensors")
    for value in ("many", "0", "-5", "1" * 40):
        monkeypatch.setenv("PATCHKIT_MAX_HEADER_BYTES", value)
        one_line_error(cli_runner("inspect", p), "PATCHKIT_MAX_HEADER_BYTES must be a positive whole number")
        one_line_error(cli_runner("status", ck), "PATCHKIT_MAX_HEADER_BYTES")


def many_empty_tensors(n: int) -> bytes:
    entries = ",".join(f'"t{i:08d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
    return st_file("{" + entries + "}")


def test_patch_tensor_cap(hostile, monkeypatch, tmp_path, copy_ckpt):
    monkeypatch.setenv("PATCHKIT_MAX_PATCH_TENSORS", "50")
    data = many_empty_tensors(51)
    path = tmp_path / "many.safetensors"
    path.write_bytes(data)
    with pytest.raises(PatchFormatError, match="more than 50 tensors"):
        Patch.load(path)
    assert len(read_header(path).tensors) == 51  # a checkpoint shard has no such cap
    # a real patch just under the cap still loads
    ck = copy_ckpt()
    p = build_patch(ck).save(tmp_path / "p.safetensors")
    monkeypatch.setenv("PATCHKIT_MAX_PATCH_TENSORS", str(len(read_header(p).tensors)))
    assert Patch.load(p).id == p_id(p)
    monkeypatch.setenv("PATCHKIT_MAX_PATCH_TENSORS", str(len(read_header(p).tensors) - 1))
    with pytest.raises(PatchFormatError, match="PATCHKIT_MAX_PATCH_TENSORS"):
        Patch.load(p)


def p_id(path) -> str:
    return read_header(path).metadata["id"]


def test_a_patch_of_many_empty_tensors_stops_early(tmp_path, monkeypatch):
    """The tensor cap of patch files stops parsing early: a header declaring ten times the cap is
    refused in a fraction of the time and memory its full parse takes."""
    import tracemalloc

    monkeypatch.setenv("PATCHKIT_MAX_PATCH_TENSORS", "10000")
    path = tmp_path / "big.safetensors"
    path.write_bytes(many_empty_tensors(100_000))
    size = path.stat().st_size
    tracemalloc.start()
    with pytest.raises(PatchFormatError, match="more than 10000 tensors"):
        Patch.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * size, (peak, size)  # the header's bytes, its text, and 10,000 entries


def test_big_checkpoint_header_is_linear(tmp_path):
    """A checkpoint header of many empty tensors is read with memory in proportion to it."""
    import tracemalloc

    path = tmp_path / "model.safetensors"
    path.write_bytes(many_empty_tensors(50_000))
    size = path.stat().st_size
    tracemalloc.start()
    header = read_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(header.tensors) == 50_000
    assert peak < 12 * size, (peak, size)


# ---- FIFOs, devices, folders ---------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_shard_and_fifo_patch_return_at_once(tmp_path, copy_ckpt):
    ck = copy_ckpt()
    good = build_patch(ck).save(tmp_path / "good.safetensors")
    before = snapshot(ck)
    (ck / "model.safetensors").rename(tmp_path / "model.safetensors.real")
    os.mkfifo(ck / "model.safetensors")
    fifo_patch = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo_patch)
    other = copy_ckpt()
    for args, code in (
        (["status", ck], CheckpointError.exit_code),
        (["apply", good, ck, "--dry-run", "--in-place"], CheckpointError.exit_code),
        (["apply", good, ck, "-o", tmp_path / "out"], CheckpointError.exit_code),
        (["inspect", fifo_patch], PatchFormatError.exit_code),
        (["apply", fifo_patch, other, "--dry-run", "--in-place"], PatchFormatError.exit_code),
    ):
        t = time.monotonic()
        r = run_cli_subprocess(args, timeout=20)
        assert time.monotonic() - t < 20
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
        if code is not None:
            assert r.returncode == code, r.stderr
    err = run_cli_subprocess(["status", ck], timeout=20).stderr
    assert "FIFO" in err or "not a regular file" in err
    os.unlink(ck / "model.safetensors")
    (tmp_path / "model.safetensors.real").rename(ck / "model.safetensors")
    assert snapshot(ck) == before


def run_cli_subprocess(args, timeout):
    import subprocess

    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "patchkit", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_device_and_folder_are_refused(tmp_path, copy_ckpt, cli_runner):
    ck = copy_ckpt()
    one_line_error(cli_runner("inspect", "/dev/zero"), "not a regular file")
    one_line_error(cli_runner("inspect", tmp_path), "folder")
    os.unlink(ck / "model.safetensors")
    os.symlink("/dev/zero", ck / "model.safetensors")
    one_line_error(cli_runner("status", ck), "device")


def test_a_symlink_to_a_regular_shard_is_read(tmp_path, copy_ckpt, cli_runner):
    ck = copy_ckpt()
    real = tmp_path / "blob"
    shutil.move(ck / "model.safetensors", real)
    os.symlink(real, ck / "model.safetensors")
    r = cli_runner("status", ck)
    assert r.exit_code == 0, r.output


# ---- patch files: metadata ---------------------------------------------------------------------------------
def forged(tmp_path, ck, meta_update=None, arrays=None, drop=(), name="forged.safetensors", raw_arrays=None):
    """A patch with changed metadata or arrays and a valid content id for what it holds."""
    p = build_patch(ck, tensors=("model.layers.0.mlp.gate_proj.weight", "lm_head.weight"), kinds=["dense", "factored"])
    meta = p._metadata()
    meta.update(meta_update or {})
    for k in drop:
        meta.pop(k, None)
    arr = {}
    for e in p.edits.values():
        arr.update(e.arrays())
    arr.update(arrays or {})
    entries, blobs = [], []
    for n in sorted(arr):
        dtype, a = arr[n]
        a = np.ascontiguousarray(a)
        entries.append((n, dtype, tuple(a.shape), a.nbytes))
        blobs.append(a.tobytes())
    for n, (dtype, shape, blob) in (raw_arrays or {}).items():
        entries.append((n, dtype, shape, len(blob)))
        blobs.append(blob)
    order = sorted(range(len(entries)), key=lambda i: entries[i][0])
    entries, blobs = [entries[i] for i in order], [blobs[i] for i in order]
    meta["id"] = hashlib.sha256(encode_header(entries, {k: v for k, v in meta.items() if k != "id"}) + b"".join(blobs)).hexdigest()
    path = tmp_path / name
    path.write_bytes(encode_header(entries, meta) + b"".join(blobs))
    return path


G = "model.layers.0.mlp.gate_proj.weight"


def _base(ck, tmp_path, change):
    p = build_patch(ck, tensors=(G, "lm_head.weight"), kinds=["dense", "factored"])
    base = json.loads(p._metadata()["base"])
    change(base)
    return {"base": json.dumps(base)}


@pytest.mark.parametrize("key, value", [
    ("tensors", "[]"), ("tensors", "{}"), ("tensors", "5"), ("tensors", '{"x":1}'), ("base", "[]"), ("base", '"x"'),
    ("provenance", "[1]"), ("provenance", '"x"'), ("parents", '{"a":1}'), ("parents", "[1]"), ("parents", '["short"]'),
    ("eval", "[1,2]"), ("eval", "3"),
    ("eval", '{"a":' + "[" * 3000 + "]" * 3000 + "}"), ("provenance", '{"a":' * 3000 + "1" + "}" * 3000),
    ("provenance", '{"n":' + "9" * 5000 + "}"), ("eval", '{"n":' + "9" * 25 + "}"), ("eval", '{"n":NaN}'),
    ("eval", '{"n":-Infinity}'), ("eval", '{"n":1e999}'), ("eval", '{"a":1,"a":2}'),
    ("eval", "[" + "[]," * 1_000_001 + "[]]"), ("tensors", "{not json"),
    ("format_version", "1.0"), ("format_version", "9" * 5000), ("format_version", ""), ("format_version", "0"),
], ids=lambda v: v if len(str(v)) < 20 else f"{str(v)[:12]}...{len(str(v))}")
def test_patch_metadata_types(tmp_path, copy_ckpt, cli_runner, key, value):
    ck = copy_ckpt()
    path = forged(tmp_path, ck, {key: value})
    before = snapshot(ck)
    for args in (["inspect", path], ["apply", path, ck, "--dry-run", "--in-place"]):
        one_line_error(cli_runner(*args), None, PatchFormatError.exit_code)
    assert snapshot(ck) == before


@pytest.mark.parametrize("change", [
    lambda b: b.update(model_id=5), lambda b: b.update(revision=["x"]), lambda b: b.update(tensors=[]),
    lambda b: b["tensors"][G].update(shape=[48.0, 32]), lambda b: b["tensors"][G].update(shape=[True, 32]),
    lambda b: b["tensors"][G].update(shape="48,32"), lambda b: b["tensors"][G].update(shape=[-48, 32]),
    lambda b: b["tensors"][G].update(shape=[10**19, 10**19]), lambda b: b["tensors"][G].update(dtype=["BF16"]),
    lambda b: b["tensors"][G].update(dtype=""), lambda b: b["tensors"][G].update(dtype="B" * 5000),
    lambda b: b["tensors"][G].update(rows_sha256=5), lambda b: b["tensors"][G].update(rows_sha256="abc"),
    lambda b: b["tensors"][G].update(result_sha256=[]), lambda b: b["tensors"][G].update(shape=[49, 32]),
    lambda b: b["tensors"][G].update(shape=[48, 33]), lambda b: b["tensors"].pop(G), lambda b: b["tensors"].update({G: 5}),
], ids=["model-id-number", "revision-list", "tensors-list", "float-shape", "bool-shape", "string-shape",
        "negative-shape", "huge-shape", "dtype-list", "dtype-empty", "dtype-huge", "sha-number", "sha-short",
        "result-list", "rows-shape-mismatch", "cols-shape-mismatch", "no-fingerprint", "entry-number"])
def test_patch_base_metadata_types(tmp_path, copy_ckpt, cli_runner, change):
    ck = copy_ckpt()
    path = forged(tmp_path, ck, _base(ck, tmp_path, change))
    before = snapshot(ck)
    for args in (["inspect", path], ["apply", path, ck, "--dry-run", "--in-place"]):
        r = cli_runner(*args)
        if args[0] == "apply" and r.exit_code == BaseMismatchError.exit_code:
            one_line_error(r)  # a shape the patch file holds consistently, but not the checkpoint's
        else:
            one_line_error(r, None, PatchFormatError.exit_code)
    assert snapshot(ck) == before


@pytest.mark.parametrize("rows, match", [
    ([0, 1, 2, 3, 48], "out of range"), ([-1, 0, 1, 2, 3], "out of range"), ([0, 1, 2, 4, 3], "not sorted"),
    ([0, 1, 2, 3, 3], "duplicated"), ([0, 1, 2, 3, 2**62], "out of range"), ([0, 1, 2, 3], "delta must be"),
], ids=["past-end", "negative", "unsorted", "duplicated", "huge", "fewer-rows-than-deltas"])
def test_patch_row_indices(tmp_path, copy_ckpt, cli_runner, rows, match):
    ck = copy_ckpt()
    path = forged(tmp_path, ck, arrays={f"{G}::rows": ("I64", np.array(rows, dtype=np.int64))})
    one_line_error(cli_runner("inspect", path), match, PatchFormatError.exit_code)
    one_line_error(cli_runner("apply", path, ck, "--dry-run", "--in-place"), match, PatchFormatError.exit_code)


@pytest.mark.parametrize("tensors_meta, match", [
    ({"encoding": "sparse", "rows": 5}, "unknown encoding 'sparse'"),
    ({"encoding": ["dense"], "rows": 5}, "tensors"),
    ({"encoding": "dense", "rows": True}, "rows"),
    ({"encoding": "dense", "rows": 5.0}, "rows"),
    ({"encoding": "dense", "rows": 4}, "row count"),
    ({"encoding": "dense", "rows": "5"}, "rows"),
], ids=["unknown-encoding", "encoding-list", "rows-bool", "rows-float", "rows-wrong", "rows-string"])
def test_patch_tensors_metadata(tmp_path, copy_ckpt, cli_runner, tensors_meta, match):
    ck = copy_ckpt()
    p = build_patch(ck, tensors=(G, "lm_head.weight"), kinds=["dense", "factored"])
    tensors = json.loads(p._metadata()["tensors"])
    tensors[G] = tensors_meta
    path = forged(tmp_path, ck, {"tensors": json.dumps(tensors)})
    one_line_error(cli_runner("inspect", path), match, PatchFormatError.exit_code)


def test_newer_format_version_names_the_version_it_needs(tmp_path, copy_ckpt, cli_runner):
    path = forged(tmp_path, copy_ckpt(), {"format_version": "7", "tensors": '{"x":{"encoding":"sparse-v7"}}'})
    one_line_error(cli_runner("inspect", path), "uses patch format v7", PatchFormatError.exit_code)


@pytest.mark.parametrize("arrays", [
    {f"{G}::rows": ("F32", np.zeros(5, np.float32))},
    {f"{G}::delta": ("F16", np.zeros((5, 32), np.float16))},
    {f"{G}::delta": ("F32", np.zeros((5, 31), np.float32))},
    {f"{G}::delta": ("F32", np.zeros((4, 32), np.float32))},
    {f"{G}::rows": ("I64", np.zeros((5, 1), np.int64))},
], ids=["rows-float", "delta-f16", "delta-cols", "delta-rows", "rows-2d"])
def test_patch_arrays_that_do_not_match(tmp_path, copy_ckpt, cli_runner, arrays):
    path = forged(tmp_path, copy_ckpt(), arrays=arrays)
    one_line_error(cli_runner("inspect", path), None, PatchFormatError.exit_code)


def test_patch_array_of_unknown_dtype(tmp_path, copy_ckpt, cli_runner):
    path = forged(tmp_path, copy_ckpt(), raw_arrays={"extra::thing": ("F8_E8M0", (4,), bytes(4))})
    one_line_error(cli_runner("inspect", path), "F8_E8M0", PatchFormatError.exit_code)


# ---- unknown dtypes in a checkpoint ----------------------------------------------------------------------------
UNKNOWN = {"zz.scales": ("F8_E8M0", (6, 8), bytes(range(48))), "aa.packed": ("F4", (4, 8), bytes(range(16)))}


def with_unknown_dtypes(ck):
    """Rewrite ck/model.safetensors with two more tensors, of dtypes patchkit does not know."""
    path = ck / "model.safetensors"
    header = read_header(path)
    items = []
    with open(path, "rb") as f:
        for name, info in header.tensors.items():
            items.append((name, info.dtype, info.shape, os.pread(f.fileno(), info.nbytes, info.offset)))
    items += [(n, d, s, b) for n, (d, s, b) in UNKNOWN.items()]
    items.sort()
    data = encode_header([(n, d, s, len(b)) for n, d, s, b in items], header.metadata) + b"".join(b for *_, b in items)
    path.write_bytes(data)
    return ck


def test_unknown_dtype_tensor_is_carried_through(tmp_path, copy_ckpt, cli_runner):
    ck = with_unknown_dtypes(copy_ckpt())
    header = read_header(ck / "model.safetensors")
    info = header.tensors["zz.scales"]
    assert not info.known and info.nbytes == 48 and info.n_rows == 6 and info.row_bytes == 8
    with pytest.raises(UnsupportedError, match="F8_E8M0"):
        info.n_cols
    assert header.tensors["aa.packed"].nbytes == 16  # 4 bits an element: its size is not checked against its shape
    p = build_patch(ck).save(tmp_path / "p.safetensors")
    original = snapshot(ck)
    assert cli_runner("status", ck).exit_code == 0
    assert cli_runner("inspect", p).exit_code == 0
    r = cli_runner("apply", p, ck, "--in-place")
    assert r.exit_code == 0, r.output
    assert cli_runner("status", ck).exit_code == 0
    out = tmp_path / "out"
    r = cli_runner("revert", p, ck, "-o", out)
    assert r.exit_code == 0, r.output
    assert snapshot(out) == original
    r = cli_runner("diff", out, ck, "-o", tmp_path / "d.safetensors", "--full")
    assert r.exit_code == 0, r.output
    r = cli_runner("revert", p, ck, "--in-place")
    assert r.exit_code == 0, r.output
    assert snapshot(ck) == original


def _unknown_patch(tmp_path, ck, dtype: str):
    """A whole (valid content id) patch replacing row 2 of zz.scales, claiming `dtype` for it."""
    name = "zz.scales"
    vals = bytes([7] * 8)
    base = {"model_id": None, "revision": None, "tensors": {name: {
        "shape": [6, 8], "dtype": dtype, "rows_sha256": hashlib.sha256(UNKNOWN[name][2][16:24]).hexdigest(),
        "result_sha256": hashlib.sha256(vals).hexdigest()}}}
    meta = {"format": "patchkit.patch", "format_version": "1", "provenance": '{"method":"test"}',
            "tensors": json.dumps({name: {"encoding": "replace", "rows": 1}}), "base": json.dumps(base)}
    entries = [(f"{name}::rows", "I64", (1,), 8), (f"{name}::values", dtype, (1, 8), 8)]
    blobs = np.array([2], np.int64).tobytes() + vals
    meta["id"] = hashlib.sha256(encode_header(entries, meta) + blobs).hexdigest()
    path = tmp_path / f"touch-{dtype}.safetensors"
    path.write_bytes(encode_header(entries, meta) + blobs)
    return path


def test_a_patch_touching_an_unknown_dtype_is_refused(tmp_path, copy_ckpt, cli_runner):
    ck = with_unknown_dtypes(copy_ckpt())
    before = snapshot(ck)
    path = _unknown_patch(tmp_path, ck, "F8_E8M0")
    one_line_error(cli_runner("inspect", path), "F8_E8M0", UnsupportedError.exit_code)
    one_line_error(cli_runner("apply", path, ck, "--in-place"), "F8_E8M0", UnsupportedError.exit_code)
    # the same file with one byte of its data changed is a damaged file, not an unsupported one
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    one_line_error(cli_runner("inspect", path), "content id", PatchFormatError.exit_code)
    # a patch claiming a dtype patchkit knows for that tensor is refused too, naming the real dtype
    one_line_error(cli_runner("apply", _u8_patch(tmp_path), ck, "--in-place"), "F8_E8M0")
    assert snapshot(ck) == before


def _u8_patch(tmp_path):
    """A valid patch that replaces row 2 of zz.scales, made as if the tensor were U8."""
    from patchkit.core.patchfile import make_edit

    base_raw = np.frombuffer(UNKNOWN["zz.scales"][2][16:24], np.uint8).reshape(1, 8)
    edit = make_edit("zz.scales", (6, 8), "U8", [2], base_raw, values=np.full((1, 8), 7, np.uint8))
    return Patch(edits={"zz.scales": edit}).save(tmp_path / "u8.safetensors")


def test_a_known_dtype_patch_on_an_unknown_dtype_tensor_is_unsupported(tmp_path, copy_ckpt, cli_runner):
    ck = with_unknown_dtypes(copy_ckpt())
    r = cli_runner("apply", _u8_patch(tmp_path), ck, "--in-place")
    one_line_error(r, "F8_E8M0", UnsupportedError.exit_code)


def test_library_errors_are_typed(tmp_path):
    """Every hostile header read directly raises STFormatError (callers wrap it), and Patch.load a
    PatchkitError."""
    from patchkit.core.stfile import STFormatError

    for text in ('{"w":' + "[" * 10000 + "]" * 10000 + "}", '{"w":{"dtype":["x"],"shape":[1],"data_offsets":[0,4]}}'):
        p = tmp_path / "x.safetensors"
        p.write_bytes(st_file(text, bytes(4)))
        with pytest.raises(STFormatError):
            read_header(p)
        with pytest.raises(PatchkitError):
            Patch.load(p)


@pytest.mark.parametrize("text", [
    '{"x":[[1]],"a":"' + '\\"' * 2_000_000,  # a string that never ends, after a nesting alarm
    '{"x":[[1]],"a":"' + '\\"' * 2_000_000 + "\\",
    '{"__metadata__":{"s":"[[ ,{","a":"' + '\\"' * 2_000_000 + '"}}',  # a false alarm: brackets in strings
    ("[1" * 2000 + "]") * 1000,  # brackets that close just before 4096 characters, over and over
    '{"a":[' + '"",' * 1_000_000 + '""]}',  # a long array of strings (no number hook sees them)
    '{"a":[' + "[]," * 1_000_000 + "[]]}",  # an array of arrays (no object hook sees them)
], ids=["unterminated", "trailing-backslash", "false-alarm", "near-4096", "strings", "arrays"])
def test_prescans_stay_linear(tmp_path, text):
    path = tmp_path / "x.safetensors"
    path.write_bytes(st_file(text))
    t = time.perf_counter()
    try:
        read_header(path)
    except PatchkitError:
        pass
    except ValueError as e:  # STFormatError
        assert "header" in str(e)
    assert time.perf_counter() - t < 10
