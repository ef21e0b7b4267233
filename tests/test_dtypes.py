"""numpy rounding in patchkit.core.dtypes against torch, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from patchkit.core.dtypes import add_delta, from_float, sub_delta, to_float, ulp

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
INT_VIEW = {"BF16": (torch.int16, np.uint16), "F16": (torch.int16, np.uint16), "F32": (torch.int32, np.uint32),
            "F64": (torch.int64, np.uint64)}


SIGNED = {"BF16": np.int16, "F16": np.int16, "F32": np.int32, "F64": np.int64}


def torch_bits(t: torch.Tensor, dtype: str) -> np.ndarray:
    tv, nv = INT_VIEW[dtype]
    return t.contiguous().view(tv).numpy().view(nv)


def np_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(a).view(INT_VIEW[dtype][1])


def special_values(rng) -> np.ndarray:
    f32 = np.finfo(np.float32)
    parts = [
        rng.standard_normal(4000).astype(np.float32),
        (rng.standard_normal(2000) * 1e30).astype(np.float32),  # huge
        (rng.standard_normal(2000) * 1e-30).astype(np.float32),  # tiny, bf16 normal range
        (rng.standard_normal(2000) * 1e-40).astype(np.float32),  # float32 subnormals
        (rng.standard_normal(1000) * 1e-6).astype(np.float32),  # f16 subnormal range
        (rng.standard_normal(1000) * 6e4).astype(np.float32),  # around the f16 max
        rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every bit pattern
        np.array([0.0, -0.0, np.inf, -np.inf, f32.max, -f32.max, f32.tiny, -f32.tiny, f32.smallest_subnormal,
                  -f32.smallest_subnormal, 65504.0, 65520.0, 65519.99, -65520.0, 3.3895314e38, 3.39e38, 1.0, -1.0],
                 dtype=np.float32),
    ]
    # exact ties of bf16 and f16 rounding: halfway between two neighbours, both parities
    bf_ties = (np.arange(0x3F800000, 0x3F800000 + 64 * 0x10000, 0x8000, dtype=np.uint32)).view(np.float32)
    f16 = np.arange(0x3C00, 0x3C00 + 64, dtype=np.uint16).view(np.float16).astype(np.float32)
    f16_ties = (f16[:-1] + f16[1:]) / 2
    out = np.concatenate(parts + [bf_ties, -bf_ties, f16_ties, -f16_ties])
    return out[~np.isnan(out)]


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_from_float_matches_torch_bit_for_bit(dtype):
    x = special_values(np.random.default_rng(0))
    ours = np_bits(from_float(x, dtype), dtype)
    theirs = torch_bits(torch.from_numpy(x).to(TORCH[dtype]), dtype)
    bad = np.flatnonzero(ours != theirs)
    assert bad.size == 0, f"{dtype}: {bad.size} values differ, e.g. {x[bad[:5]]!r}: {ours[bad[:5]]} vs {theirs[bad[:5]]}"


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_from_float_nan_stays_nan(dtype):
    # torch itself gives different NaN bits depending on the code path (0xFFFF from the vectorised
    # bf16 conversion, 0x7FC0 from the scalar one, on the same CPU), so NaN is checked as NaN, and
    # every NaN bit pattern of float32 must give a NaN, never an inf or a number.
    rng = np.random.default_rng(1)
    mant = rng.integers(1, 2**23, 2000, dtype=np.uint64).astype(np.uint32)
    nans = np.concatenate([mant | 0x7F800000, mant | 0xFF800000, np.array([0x7FC00000, 0xFFC00000, 0x7F800001], np.uint32)])
    x = nans.view(np.float32)
    assert np.isnan(x).all()
    ours = from_float(x, dtype)
    back = to_float(ours.view(np.uint8).reshape(len(x), -1), dtype) if dtype == "BF16" else ours
    assert np.isnan(back).all()
    assert np.isnan(torch.from_numpy(x).to(TORCH[dtype]).float().numpy()).all()


@settings(max_examples=200, deadline=None)
@given(bits=hs.lists(hs.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_from_float_bf16_property(bits):
    x = np.array(bits, dtype=np.uint32).view(np.float32)
    x = x[~np.isnan(x)]
    ours = np_bits(from_float(x, "BF16"), "BF16")
    theirs = torch_bits(torch.from_numpy(x.copy()).to(torch.bfloat16), "BF16")
    assert ours.tolist() == theirs.tolist()


def base_values(dtype: str, rng, n: int) -> np.ndarray:
    """n random elements of `dtype` as raw bytes [n/cols, row_bytes], every finite and special pattern."""
    _, nv = INT_VIEW[dtype]
    width = np.dtype(nv).itemsize * 8
    bits = rng.integers(0, 2**width, n, dtype=np.uint64).astype(nv)
    t = torch.from_numpy(bits.view(SIGNED[dtype]).copy()).view(TORCH[dtype])
    bits[torch.isnan(t).numpy()] = 0  # no NaN in the base (NaN bits are not comparable with torch)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0], dtype=TORCH[dtype])
    bits[: len(specials)] = torch_bits(specials, dtype)
    # and plenty of ordinary weights
    normal = torch.from_numpy(rng.standard_normal(n // 2).astype(np.float32) * 0.02).to(TORCH[dtype])
    bits[len(specials) : len(specials) + n // 2] = torch_bits(normal, dtype)
    return bits


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e4, 1e-30, 1e-41, 1e30])
def test_add_delta_matches_torch(dtype, magnitude):
    rng = np.random.default_rng(len(dtype))
    rows, cols = 64, 32
    bits = base_values(dtype, rng, rows * cols)
    raw = bits.view(np.uint8).reshape(rows, -1)
    delta = (rng.standard_normal((rows, cols)) * magnitude).astype(np.float32)
    delta[0, :4] = [0.0, -0.0, np.float32(1e-45), -np.float32(1e-45)]
    with np.errstate(all="ignore"):
        ours = add_delta(raw, delta, dtype).view(INT_VIEW[dtype][1]).reshape(rows, cols)
    w = torch.from_numpy(bits.view(SIGNED[dtype]).copy()).view(TORCH[dtype]).reshape(rows, cols)
    if dtype == "F64":
        ref = (w + torch.from_numpy(delta).double()).to(TORCH[dtype])
    else:
        ref = (w.float() + torch.from_numpy(delta)).to(TORCH[dtype])
    theirs = torch_bits(ref, dtype).reshape(rows, cols)
    is_nan = torch.isnan(ref).numpy()  # inf + -inf cannot happen (deltas are finite); keep the check honest
    assert not is_nan.any()
    bad = np.argwhere(ours != theirs)
    assert bad.size == 0, f"{dtype} x{magnitude}: {len(bad)} elements differ, first at {bad[0].tolist()}"


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_sub_delta_is_add_of_negated(dtype):
    rng = np.random.default_rng(3)
    bits = base_values(dtype, rng, 256)
    raw = bits.view(np.uint8).reshape(8, -1)
    delta = (rng.standard_normal((8, 32)) * 0.1).astype(np.float32)
    assert np.array_equal(sub_delta(raw, delta, dtype), add_delta(raw, -delta, dtype))


def test_ulp():
    assert ulp(np.array([1.0]), "BF16")[0] == 2.0**-7
    assert ulp(np.array([1.0]), "F16")[0] == 2.0**-10
    assert ulp(np.array([1.0]), "F32")[0] == 2.0**-23
    assert ulp(np.array([0.0]), "BF16")[0] == 2.0**-133  # smallest bf16 subnormal spacing
    assert ulp(np.array([-3.0]), "F16")[0] == 2.0**-9


# ---- the blocked kernel against the whole-array reference --------------------------------------------
def reference_add(raw: np.ndarray, delta: np.ndarray, dtype: str) -> tuple[np.ndarray, bool]:
    from patchkit.core.dtypes import is_finite

    with np.errstate(all="ignore"):
        base = to_float(raw, dtype)
        new = np.ascontiguousarray(from_float(base + delta.astype(base.dtype), dtype))
    return new.view(np.uint8).reshape(raw.shape), not bool(is_finite(new, dtype).all())


def random_bits(rng, dtype: str, n: int) -> np.ndarray:
    """Every bit pattern is possible, NaNs and infs of both signs included."""
    width = {"BF16": 16, "F16": 16, "F32": 32, "F64": 64}[dtype]
    bits = rng.integers(0, 2**63, n, dtype=np.uint64)
    return bits.astype(INT_VIEW[dtype][1]) if width < 64 else bits | (rng.integers(0, 2, n, dtype=np.uint64) << 63)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("encoding", ["dense", "per-row", "single"])
@pytest.mark.parametrize("block", [1, 7, 64, 1 << 16])
def test_add_to_rows_equals_reference(monkeypatch, dtype, encoding, block):
    from patchkit.core import dtypes

    monkeypatch.setattr(dtypes, "BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(block + len(encoding))
    rows, cols = 37, 24
    bits = base_values(dtype, rng, rows * cols)
    bits[::5] = random_bits(rng, dtype, len(bits[::5]))  # NaN payloads, infs, anything
    if dtype == "BF16":
        bits[:256] = np.arange(0x7F80, 0x8000, dtype=np.uint16).tolist() + np.arange(0xFF80, 0x10000, dtype=np.uint16).tolist()
    raw = bits.view(np.uint8).reshape(rows, -1)
    direction = (rng.standard_normal(cols) * 0.05).astype(np.float32)
    direction[:2] = [3e38, -0.0]  # overflow to inf in some rows
    if encoding == "dense":
        delta = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        ours = dtypes.add_to_rows(raw, dtype, delta=delta)
    else:
        scale = rng.standard_normal(rows if encoding == "per-row" else 1).astype(np.float32)
        with np.errstate(over="ignore"):
            delta = np.broadcast_to(scale[:, None] * direction[None, :], (rows, cols))
        ours = dtypes.add_to_rows(raw, dtype, direction=direction, scale=scale)
    theirs = reference_add(raw, delta, dtype)
    assert ours[1] == theirs[1]
    bad = np.argwhere(ours[0] != theirs[0])
    assert bad.size == 0, f"{len(bad)} bytes differ, first at {bad[0].tolist()}"


@settings(max_examples=60, deadline=None)
@given(
    dtype=hs.sampled_from(["BF16", "F16", "F32", "F64"]),
    rows=hs.integers(1, 9), cols=hs.integers(1, 9), block=hs.integers(1, 40), seed=hs.integers(0, 2**32 - 1),
    magnitude=hs.sampled_from([0.0, 1e-40, 1e-3, 1.0, 1e38]), nan_delta=hs.booleans(),
)
def test_add_to_rows_property(dtype, rows, cols, block, seed, magnitude, nan_delta):
    """Any bits in the base, any block size, even NaN or inf deltas: the same bytes as the reference."""
    from patchkit.core import dtypes

    old = dtypes.BLOCK_ELEMENTS
    dtypes.BLOCK_ELEMENTS = block
    try:
        rng = np.random.default_rng(seed)
        raw = random_bits(rng, dtype, rows * cols).view(np.uint8).reshape(rows, -1)
        with np.errstate(over="ignore"):  # 1e38 * a normal sample may not fit float32: inf deltas too
            delta = (rng.standard_normal((rows, cols)) * magnitude).astype(np.float32)
        if nan_delta:
            delta.reshape(-1)[rng.integers(0, rows * cols)] = np.array([0xFFFFFFFF], np.uint32).view(np.float32)[0]
        ours = dtypes.add_to_rows(raw, dtype, delta=delta)
        theirs = reference_add(raw, delta, dtype)
    finally:
        dtypes.BLOCK_ELEMENTS = old
    assert ours[1] == theirs[1]
    assert np.array_equal(ours[0], theirs[0])


@pytest.mark.parametrize("block", [5, 1 << 16])
def test_add_to_rows_rounds_exact_ties_to_even(monkeypatch, block):
    """Sums that fall exactly halfway between two bf16 values (and one float32 ulp either side)."""
    from patchkit.core import dtypes

    monkeypatch.setattr(dtypes, "BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(11)
    rows, cols = 16, 64
    w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32)).to(torch.bfloat16)
    wf = w.float().numpy()
    half_ulp = np.ldexp(np.float32(1), (np.frexp(wf)[1] - 9).astype(np.int32)).astype(np.float32)
    k = rng.choice(np.array([1, 3, -1, -3, 5], dtype=np.float32), size=(rows, cols))
    delta = (k * half_ulp).astype(np.float32)
    nudge = rng.integers(-1, 2, size=(rows, cols)).astype(np.int32)  # one float32 ulp below, at, above the tie
    delta = (delta.view(np.int32) + nudge * (delta != 0)).view(np.float32)
    raw = torch_bits(w, "BF16").view(np.uint8).reshape(rows, -1)
    ours = dtypes.add_to_rows(raw, "BF16", delta=delta)[0].view(np.uint16)
    theirs = torch_bits((w.float() + torch.from_numpy(delta)).to(torch.bfloat16), "BF16")
    assert (nudge == 0).sum() > 100  # plenty of exact ties
    assert np.array_equal(ours.reshape(rows, cols), theirs.reshape(rows, cols))
