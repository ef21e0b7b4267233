"""Floating-point dtypes of safetensors files, handled with numpy alone (no torch import).

Rows are kept as their raw bytes wherever possible; arithmetic converts them to float32 (float64
for F64 tensors), adds, and rounds once back to the tensor's dtype with round-to-nearest-even,
which is what torch does for every dtype here.
"""

from __future__ import annotations

import re
import sys
import threading

import numpy as np

from ..errors import UnsupportedError


class _Storage(dict):
    """dtype name -> numpy dtype; a name it does not hold raises UnsupportedError, not KeyError."""

    def __missing__(self, dtype):
        raise UnsupportedError(f"tensor dtype {shown(dtype)} is not supported by this version of patchkit")


def shown(value, limit: int = 60) -> str:
    """repr() of a name or value for a message, cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def named(name: str, limit: int = 200) -> str:
    """A tensor name for a message: as it is, or cut when it is longer than `limit` characters."""
    return name if len(name) <= limit else f"{name[:limit]}...({len(name)} characters)"


# A dtype name as safetensors spells them (F8_E4M3, BF16, ...): a tensor of a name patchkit does not
# know is carried through untouched; anything else in the dtype field makes the header malformed.
DTYPE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")

# safetensors dtype -> numpy dtype used to hold the raw elements (BF16 is held as uint16 bits)
STORAGE = _Storage({
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
})
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def itemsize(dtype: str) -> int:
    """Bytes per element; UnsupportedError naming the dtype for one patchkit does not know."""
    if not isinstance(dtype, str) or dtype not in STORAGE:
        raise UnsupportedError(f"tensor dtype {shown(dtype)} is not supported by this version of patchkit")
    return STORAGE[dtype].itemsize


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


def require_arith(dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"cannot do arithmetic on dtype {dtype}")


def is_finite(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Element-wise finiteness of raw bytes (uint8 rows) or typed elements, without converting them."""
    elems = raw.view(STORAGE[dtype]) if raw.dtype == np.uint8 else raw
    if dtype == "BF16":
        return (elems & 0x7F80) != 0x7F80
    return np.isfinite(elems)


def add_delta(raw: np.ndarray, delta: np.ndarray, dtype: str) -> np.ndarray:
    """Rows of raw bytes plus float32 deltas, rounded once to `dtype`; returns raw bytes (uint8)."""
    return add_to_rows(raw, dtype, delta=delta)[0]


# Rows are processed in blocks of about this many elements, through scratch buffers allocated once:
# a block's temporaries stay in the CPU cache, and no array the size of all rows is made besides the
# result (fresh memory costs more than the arithmetic, most of all in virtual machines).
BLOCK_ELEMENTS = 1 << 16
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # which uint16 of a native uint32 holds its high bits


def add_to_rows(raw: np.ndarray, dtype: str, *, delta: np.ndarray | None = None, direction: np.ndarray | None = None,
                scale: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """round(float(rows) + delta) for rows of raw bytes (uint8 [n, row_bytes]), rounded once to `dtype`.

    The delta is dense (`delta`, float32 [n, cols]) or factored (`scale[i] * direction` in float32,
    `scale` with n entries or 1), the product never materialised for all rows. Returns the new raw
    bytes (uint8, same shape) and whether any element of them is inf or NaN. The result is bit for
    bit `from_float(to_float(raw) + delta)`.
    """
    require_arith(dtype)
    raw = np.ascontiguousarray(raw)
    storage = STORAGE[dtype]
    n = raw.shape[0]
    elems = raw.view(storage).reshape(n, -1)
    cols = elems.shape[1]
    out = np.empty(raw.shape, dtype=np.uint8)
    if n == 0 or cols == 0:
        return out, False
    out_elems = out.view(storage).reshape(n, cols)
    work = compute_dtype(dtype)
    per_row = delta_row = None
    if delta is None:
        direction = np.asarray(direction, dtype=np.float32)
        scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        if len(scale) == n and n > 1:
            per_row = scale
        else:
            with np.errstate(over="ignore"):
                delta_row = (scale[:1, None] * direction[None, :]).astype(np.float32)
        if not (np.isfinite(direction).all() and np.isfinite(scale).all()):
            return _add_reference(elems, _block_delta(None, per_row, direction, delta_row, 0, n), dtype, raw.shape)
    else:
        delta = np.asarray(delta).reshape(n, cols)
        if work == np.float32 and delta.dtype != np.float32:
            delta = delta.astype(np.float32)
    k = max(1, min(n, BLOCK_ELEMENTS // cols))
    acc = _scratch("acc", (k, cols), np.uint32 if dtype == "BF16" else work)
    tmp = _scratch("tmp", (k, cols), np.uint32) if dtype == "BF16" else None
    dblock = _scratch("delta", (k, cols), np.float32) if per_row is not None else None
    nonfinite = False
    with np.errstate(over="ignore", invalid="ignore"):
        for r0 in range(0, n, k):
            r1 = min(n, r0 + k)
            a = acc[: r1 - r0]
            if dtype == "BF16":  # bf16 bits << 16 are the float32 bits of the same value
                np.left_shift(elems[r0:r1], 16, out=a, dtype=np.uint32)
                f = a.view(np.float32)
            else:
                np.copyto(a, elems[r0:r1])
                f = a
            if delta is not None:
                if not np.isfinite(delta[r0:r1]).all():  # NaN payloads could carry in the rounding below
                    new, bad = _add_reference(elems[r0:r1], delta[r0:r1], dtype, (r1 - r0, raw.shape[1]))
                    out[r0:r1] = new
                    nonfinite = nonfinite or bad
                    continue
                np.add(f, delta[r0:r1], out=f)
            elif per_row is not None:
                d = dblock[: r1 - r0]
                np.multiply(per_row[r0:r1, None], direction[None, :], out=d)
                np.add(f, d, out=f)
            else:
                np.add(f, delta_row, out=f)
            o = out_elems[r0:r1]
            if dtype == "BF16":
                # round to nearest even: add 0x7FFF plus the lowest kept bit, keep the high 16 bits.
                # With finite deltas a NaN sum comes only from a NaN in the base, whose low 16 bits
                # are zero, so it cannot carry out of the word: it stays NaN or becomes inf, and the
                # block is then redone by `from_float`, which keeps NaNs NaN.
                t = tmp[: r1 - r0]
                np.right_shift(a, 16, out=t)
                np.bitwise_and(t, 1, out=t)
                np.add(a, t, out=a)
                np.add(a, 0x7FFF, out=a)
                np.copyto(o, a.view(np.uint16)[:, _HIGH_HALF::2])
                exp = t.view(np.uint16)[:, : cols]  # reuse the scratch for the exponent bits
                np.bitwise_and(o, 0x7F80, out=exp)
                if exp.max() == 0x7F80:
                    nonfinite = True
                    o[...] = from_float(to_float(elems[r0:r1], dtype) + _block_delta(delta, per_row, direction, delta_row, r0, r1), dtype)
            else:
                if dtype == "F16":
                    np.copyto(o, f, casting="unsafe")
                else:
                    np.copyto(o, f, casting="same_kind")
                if not nonfinite and not np.isfinite(o).all():
                    nonfinite = True
    return out, nonfinite


_SCRATCH = threading.local()


def _scratch(key: str, shape: tuple[int, int], dtype) -> np.ndarray:
    """A scratch array of this thread, reused from call to call (about 3 blocks' worth per thread)."""
    size = shape[0] * shape[1] * np.dtype(dtype).itemsize
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = cache.get(key)
    if buf is None or buf.size < size:
        buf = cache[key] = np.empty(max(size, BLOCK_ELEMENTS * 4), dtype=np.uint8)
    return buf[:size].view(dtype).reshape(shape)


def _add_reference(elems: np.ndarray, delta: np.ndarray, dtype: str, shape) -> tuple[np.ndarray, bool]:
    """The plain whole-array computation, for inputs with NaN or inf deltas."""
    with np.errstate(over="ignore", invalid="ignore"):
        base = to_float(elems, dtype)
        new = np.ascontiguousarray(from_float(base + delta.astype(base.dtype, copy=False), dtype))
    return new.view(np.uint8).reshape(shape), not bool(is_finite(new, dtype).all())


def _block_delta(delta, per_row, direction, delta_row, r0, r1):
    if delta is not None:
        return delta[r0:r1].astype(np.float32)
    if per_row is not None:
        return per_row[r0:r1, None] * direction[None, :]
    return delta_row


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
