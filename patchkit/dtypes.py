"""Floating-point dtypes of safetensors files, handled with numpy alone (no torch import).

Rows are kept as their raw bytes wherever possible; arithmetic converts them to float32 (float64
for F64 tensors), adds, and rounds once back to the tensor's dtype with round-to-nearest-even,
which is what torch does for every dtype here.
"""

from __future__ import annotations

import numpy as np

from .errors import UnsupportedError

# safetensors dtype -> numpy dtype used to hold the raw elements (BF16 is held as uint16 bits)
STORAGE = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def itemsize(dtype: str) -> int:
    try:
        return STORAGE[dtype].itemsize
    except KeyError:
        raise UnsupportedError(f"tensor dtype {dtype} is not supported") from None


def require_float(dtype: str, name: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedError(
            f"tensor {name} has dtype {dtype}; patches edit F64, F32, F16 and BF16 tensors only"
        )


def compute_dtype(dtype: str) -> np.dtype:
    return np.dtype("<f8") if dtype == "F64" else np.dtype("<f4")


def to_float(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw bytes (uint8, last axis = row bytes) or typed elements -> float32 (float64 for F64)."""
    elems = raw.view(STORAGE[dtype]) if raw.dtype == np.uint8 else raw
    if dtype == "BF16":
        return (elems.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F64":
        return elems.astype(np.float64)
    if dtype in ("F32", "F16"):
        return elems.astype(np.float32)
    raise UnsupportedError(f"cannot do arithmetic on dtype {dtype}")


def from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32/float64 -> elements of `dtype` (BF16 as uint16 bits), rounded once, to nearest even."""
    if dtype == "BF16":
        f = np.ascontiguousarray(values, dtype=np.float32)
        u = f.view(np.uint32)
        b = u >> 16  # round to nearest even: add 0x7FFF plus the lowest kept bit, then drop 16 bits
        b &= 1
        b += 0x7FFF
        b += u
        b >>= 16
        rounded = b.astype(np.uint16)
        nan = np.isnan(f)
        if nan.any():
            rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
        return rounded
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16)
    if dtype == "F32":
        return values.astype(np.float32)
    if dtype == "F64":
        return values.astype(np.float64)
    raise UnsupportedError(f"cannot do arithmetic on dtype {dtype}")


def is_finite(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Element-wise finiteness of raw bytes (uint8 rows) or typed elements, without converting them."""
    elems = raw.view(STORAGE[dtype]) if raw.dtype == np.uint8 else raw
    if dtype == "BF16":
        return (elems & 0x7F80) != 0x7F80
    return np.isfinite(elems)


def add_delta(raw: np.ndarray, delta: np.ndarray, dtype: str) -> np.ndarray:
    """Rows of raw bytes plus float32 deltas, rounded once to `dtype`; returns raw bytes (uint8)."""
    base = to_float(raw, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = base + delta.astype(base.dtype, copy=False)
    return np.ascontiguousarray(from_float(out, dtype)).view(np.uint8).reshape(raw.shape)


def sub_delta(raw: np.ndarray, delta: np.ndarray, dtype: str) -> np.ndarray:
    return add_delta(raw, -delta.astype(np.float64 if dtype == "F64" else np.float32), dtype)


def ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of `dtype` at each value (float64), for error bounds in ulps."""
    v = np.abs(values.astype(np.float64))
    if dtype == "BF16":
        mant, min_exp = 7, -126
    elif dtype == "F16":
        mant, min_exp = 10, -14
    elif dtype == "F32":
        mant, min_exp = 23, -126
    else:
        mant, min_exp = 52, -1022
    with np.errstate(divide="ignore"):
        exp = np.floor(np.log2(np.where(v > 0, v, 1.0)))
    exp = np.maximum(np.where(v > 0, exp, min_exp), min_exp)
    return np.ldexp(1.0, (exp - mant).astype(np.int64))
