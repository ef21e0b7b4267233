"""Fuzzing the readers of safetensors headers and patch files, in-process: random JSON headers, random
length prefixes, random bytes, and bit flips, truncations and insertions in a real patch and a real
shard. Every failure must be a typed error (STFormatError from `read_header`, whose callers wrap it;
PatchkitError everywhere else), and memory must stay bounded. About 10,000 cases in all, derandomized,
within a minute on two cores."""

from __future__ import annotations

import json
import os
import resource
import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchkit.core import ops
from patchkit.core.checkpoint import Checkpoint
from patchkit.core.patchfile import Patch, make_edit
from patchkit.core.stfile import STFormatError, read_header, serialize
from patchkit.errors import PatchkitError

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, a patch made for it, and scratch paths that every case overwrites."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": ("BF16", rng.integers(0x3C00, 0x3F00, size=(6, 8), dtype=np.uint16)),
        "model.layers.0.input_layernorm.weight": ("F32", rng.standard_normal(8).astype(np.float32)),
        "model.norm.weight": ("F16", rng.standard_normal((2, 4)).astype(np.float16)),
        "model.step": ("I64", np.array(3, dtype=np.int64)),
    }
    ck = root / "ck"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(serialize(tensors, {"format": "pt"}))
    c = Checkpoint(ck)
    edits = {}
    for name, rows in (("model.layers.0.mlp.up_proj.weight", [1, 4]), ("model.layers.0.input_layernorm.weight", [0])):
        info = c.tensors[name]
        rows = np.array(rows, dtype=np.int64)
        delta = np.full((len(rows), info.n_cols), 0.125, dtype=np.float32)
        edits[name] = make_edit(name, info.shape, info.dtype, rows, c.read_rows(name, rows), delta=delta)
    patch_path = Patch(edits=edits, base_model="fuzz", provenance={"method": "fuzz", "params": {"k": [1, 2]}},
                       evaluation={"score": 0.5}).save(root / "patch.safetensors")
    scratch_ck = root / "scratch-ck"
    scratch_ck.mkdir()
    return {
        "ck": ck, "patch_path": patch_path, "patch": Patch.load(patch_path),
        "patch_bytes": patch_path.read_bytes(), "shard_bytes": (ck / "model.safetensors").read_bytes(),
        "file": root / "case.safetensors", "scratch_ck": scratch_ck, "rss_start": peak_rss_mb(),
    }


def expect_typed(fn, *args, allowed=PatchkitError):
    """Call fn; any exception other than `allowed` fails the case."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)
    except allowed:
        return None


def check_as_patch(world, data: bytes) -> None:
    path = world["file"]
    path.write_bytes(data)
    expect_typed(read_header, path, allowed=STFormatError)
    patch = expect_typed(Patch.load, path)
    if patch is not None:  # a mutation the reader accepts must still plan cleanly
        expect_typed(ops.plan_apply, [patch], world["ck"])


def check_as_shard(world, data: bytes, plan: bool = True) -> None:
    ck = world["scratch_ck"]
    (ck / "model.safetensors").write_bytes(data)
    if expect_typed(Checkpoint, ck) is not None:
        expect_typed(ops.status, ck)
        if plan:
            expect_typed(ops.plan_apply, [world["patch"]], ck)


# ---- random JSON headers ------------------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([10**25, -(10**30), 2**63, 2**64, -1])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["F32", "BF16", "F8_E8M0", "F4", "", "x" * 300]))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                           max_leaves=6)
dims = st.integers(0, 6) | st.sampled_from([-1, 2**63, 10**21, True, 2.0, 2.5, "2"])
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "F8_E8M0", "F4", "", "f32"]) | json_values,
    "shape": st.lists(dims, max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(0, 300) | st.sampled_from([-1, 2**64, 1.0, True, None]), min_size=0, max_size=3)
                    | json_values,
}, optional={"extra": json_values})
headers = st.dictionaries(st.text(max_size=10) | st.just("__metadata__"), entries | json_values, max_size=4)


def header_bytes(obj, data_len: int, length=None) -> bytes:
    text = json.dumps(obj, allow_nan=True).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + bytes(data_len)


@settings(max_examples=700, **FUZZ)
@given(headers, st.integers(0, 320))
def test_random_json_headers(world, header, data_len):
    data = header_bytes(header, data_len)
    check_as_patch(world, data)
    check_as_shard(world, data, plan=False)


@settings(max_examples=400, **FUZZ)
@given(json_values, st.integers(0, 64))
def test_random_json_values_as_headers(world, value, data_len):
    data = header_bytes(value, data_len)
    check_as_patch(world, data)
    check_as_shard(world, data, plan=False)


# Hypothesis draws recursive values slowly: the bulk of the random headers comes from a seeded
# generator instead, which picks each field from values that are valid, nearly valid or hostile.
NASTY = [None, True, False, 0, 1, -1, 2.0, 2.5, 1e308, float("inf"), float("nan"), 2**63, 2**64, 10**25, -(10**30),
         "", "2", "F32", "x" * 2000, [], {}, [[]], [1, [2]], {"a": {"b": [1]}}]
DTYPES = ["F32", "BF16", "F16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "F8_E8M0", "F4", "", "f32 ", "\u0000"]


def seeded_header(seed: int) -> tuple[dict, int]:
    import random

    rng = random.Random(seed)
    header, pos = {}, 0
    if rng.random() < 0.3:
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"a": rng.choice(NASTY)}, rng.choice(NASTY),
                                             {"format": "patchkit.patch", "format_version": "1", "tensors": "{}"}])
    for i in range(rng.randrange(0, 6)):
        dtype = rng.choice(DTYPES) if rng.random() < 0.9 else rng.choice(NASTY)
        shape = [rng.randrange(0, 5) for _ in range(rng.randrange(0, 4))]
        size = int(np.prod(shape)) * ({"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8}.get(dtype, 1) if isinstance(dtype, str) else 1)
        offsets = [pos, pos + size]
        for field in (shape, offsets):
            if field and rng.random() < 0.25:
                field[rng.randrange(len(field))] = rng.choice(NASTY)
        entry = {"dtype": dtype, "shape": shape if rng.random() < 0.9 else rng.choice(NASTY),
                 "data_offsets": offsets if rng.random() < 0.9 else rng.choice(NASTY)}
        if rng.random() < 0.1:
            entry.pop(rng.choice(list(entry)))
        name = rng.choice([f"t{i}", f"t{i}", "", "x" * 2000, "__metadata__", "t0", "a::rows"])
        header[name] = entry if rng.random() < 0.95 else rng.choice(NASTY)
        pos += size if rng.random() < 0.9 else rng.randrange(-2, 3)
    return header, max(0, pos + (rng.randrange(-2, 3) if rng.random() < 0.2 else 0))


@settings(max_examples=2000, **FUZZ)
@given(st.integers(0, 2**32))
def test_seeded_random_headers(world, seed):
    header, data_len = seeded_header(seed)
    data = header_bytes(header, data_len)
    check_as_patch(world, data)
    check_as_shard(world, data)


@settings(max_examples=1000, **FUZZ)
@given(st.sampled_from(["patch", "shard"]),
       st.integers(-2048, 2048) | st.sampled_from([2**63, 2**64 - 1, 100 * 2**20, 100 * 2**20 + 1, 2**32]))
def test_random_length_prefixes(world, which, change):
    real = world["patch_bytes"] if which == "patch" else world["shard_bytes"]
    (n,) = struct.unpack("<Q", real[:8])
    length = n + change if abs(change) <= 2048 else change
    data = struct.pack("<Q", max(0, min(length, 2**64 - 1))) + real[8:]
    check_as_patch(world, data)
    check_as_shard(world, data)


@settings(max_examples=1000, **FUZZ)
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes(world, blob, with_prefix):
    data = (struct.pack("<Q", len(blob)) + blob) if with_prefix else blob
    check_as_patch(world, data)
    check_as_shard(world, data, plan=False)


# ---- mutations of real files ---------------------------------------------------------------------------------------
def mutations(source: str):
    """(kind, position in the header or anywhere, value) applied to the patch's or the shard's bytes."""
    return st.tuples(st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "delete", "digit"]),
                     st.floats(0, 1), st.integers(0, 255), st.booleans())


FRAGILE = b"0123456789[]{}\",:-eE.tfnINa "


def mutate(real: bytes, kind: str, where: float, value: int, anywhere: bool) -> bytes:
    (n,) = struct.unpack("<Q", real[:8])
    span = len(real) if anywhere else 8 + n
    i = min(int(where * span), len(real) - 1)
    b = bytearray(real)
    if kind == "flip":
        b[i] ^= 1 << (value % 8)
    elif kind == "truncate":
        del b[i:]
    elif kind == "insert":
        b[i:i] = bytes([value])
    elif kind == "delete":
        del b[i]
    else:  # a digit, bracket, quote or letter where JSON is most fragile
        b[i] = FRAGILE[value % len(FRAGILE)]
    return bytes(b)


@settings(max_examples=2700, **FUZZ)
@given(mutations("patch"))
def test_mutated_patch(world, m):
    check_as_patch(world, mutate(world["patch_bytes"], *m))


@settings(max_examples=2300, **FUZZ)
@given(mutations("shard"))
def test_mutated_shard(world, m):
    check_as_shard(world, mutate(world["shard_bytes"], *m))


def test_fuzzing_kept_memory_bounded(world):
    """Peak RSS of this process grew by less than 150 MB over all the cases above (each case's header
    is at most a few kilobytes, or claims up to 2**64 bytes without being read)."""
    assert peak_rss_mb() - world["rss_start"] < 150


def test_the_cli_wraps_what_read_header_raises(tmp_path, cli_runner, world):
    """read_header raises STFormatError by design; the commands wrap it into one line each."""
    import shutil

    bad = json.dumps({"w": {"dtype": ["F32"], "shape": [True], "data_offsets": [0, float("inf")]}}, allow_nan=True).encode()
    data = struct.pack("<Q", len(bad)) + bad
    patch = tmp_path / "bad.safetensors"
    patch.write_bytes(data)
    ck = tmp_path / "ck"
    shutil.copytree(world["ck"], ck)
    (ck / "model.safetensors").write_bytes(data)
    for args in (["inspect", patch], ["status", ck], ["apply", patch, ck, "--dry-run", "--in-place"],
                 ["revert", patch, ck, "--dry-run", "--in-place"], ["diff", ck, ck, "-o", tmp_path / "d.safetensors"]):
        r = cli_runner(*args)
        assert r.exit_code != 0 and isinstance(r.exception, SystemExit), (args, r.exception)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    assert os.path.exists(ck / "model.safetensors")
