"""Bounded JSON, and the checks of a patch file's metadata and arrays before they become edits.

Every JSON text patchkit reads from a file (safetensors headers, the JSON inside a patch's metadata)
goes through `loads`: no NaN or Infinity, no integer longer than MAX_INT_DIGITS digits, no key given
twice, nesting and size bounded. Every field of a patch is type-checked here, so that a hostile file
gives one PatchFormatError line (or UnsupportedError, for a dtype this version cannot edit).
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from ..errors import PatchFormatError, PatchkitError, UnsupportedError
from .dtypes import DTYPE_NAME, STORAGE, named, shown
from .sharing import SHAREABLE

MAX_INT_DIGITS = 20  # digits of any integer in JSON that patchkit reads (2**64 has 20)
INT_LIMIT = 2**63  # sizes, offsets, row indices and element counts stay below this, as int64 needs
MAX_DIMS = 64  # dimensions of a tensor (numpy's own limit)
MAX_FREE_VALUES = 1_000_000  # JSON values in `provenance` and `eval`
MAX_FREE_DEPTH = 32  # nesting of `provenance` and `eval`
PARTS = {"dense": ("rows", "delta"), "factored": ("rows", "direction", "scale"), "replace": ("rows", "values"),
         "lowrank": ("rows", "U", "V"), "scale": ("rows", "gamma")}
EXCEPTION_PARTS = ("exceptions", "exception_values")
V11 = ("lowrank", "scale")  # encodings that need format v1.1 (format_minor 1)
_FIELD_OF = {"U": "u", "V": "v", "exceptions": "exc_index", "exception_values": "exc_values"}
_HEX64 = re.compile(r"[0-9a-f]{64}")


class JSONError(ValueError):
    """JSON that is malformed or over patchkit's bounds; callers wrap it in their own typed error."""


def env_limit(var: str, default: int) -> int:
    """A positive whole number from the environment variable `var`, or `default` when it is unset."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > MAX_INT_DIGITS or int(raw) == 0:
        raise PatchkitError(f"{var} must be a positive whole number, not {shown(raw)}")
    return int(raw)


# ---- bounded JSON --------------------------------------------------------------------------------
def json_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise JSONError(f"an integer has {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONError(f"the number {shown(text, 30)} is out of range")
    return value


def _json_constant(name: str):
    raise JSONError(f"{name} is not a JSON number")


def dumps(obj) -> str:
    """Canonical JSON (sorted keys, no spaces), as patches store it. A NaN or infinity (an accuracy
    never measured, a perplexity past a float) is written as null: no reader of patches takes them."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        return dumps(_finite(obj))


def _finite(obj):
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def unique_pairs(pairs: list) -> dict:
    """object_pairs_hook building a dict and refusing a key given twice."""
    d = dict(pairs)
    if len(d) != len(pairs):
        raise JSONError(f"an object gives the key {shown(repeated(pairs))} twice")
    return d


def repeated(pairs) -> str:
    """The first key of (key, value) pairs that was seen before."""
    seen = set()
    for k, _ in pairs:
        if k in seen:
            return k
        seen.add(k)
    return ""


def loads(text: str, *, pairs_hook=unique_pairs, int_hook=json_int, max_values: int | None = None,
          max_depth: int | None = None):
    """json.loads with bounds: no NaN or Infinity, no integer of more than MAX_INT_DIGITS digits, no
    float out of range, no key given twice, fewer than `max_values` values (counted from the brackets
    and commas before parsing) and at most `max_depth` levels of nesting; JSONError otherwise. Deep
    nesting stops at the interpreter's recursion limit whatever `max_depth` says."""
    if max_values is not None and text.count(",") + text.count("[") + text.count("{") >= max_values:
        raise JSONError(f"holds more than {max_values} JSON values")
    collect = gc.isenabled()
    gc.disable()  # millions of small containers: the collector would walk them again and again
    try:
        value = json.loads(text, parse_int=int_hook, parse_float=_json_float, parse_constant=_json_constant,
                           object_pairs_hook=pairs_hook)
    except RecursionError:
        raise JSONError("JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise JSONError(f"not valid JSON ({e.msg} at character {e.pos})") from None
    except JSONError:
        raise
    except ValueError as e:  # an integer past the interpreter's own digit limit
        raise JSONError(f"JSON holds a number patchkit cannot read ({str(e)[:60]})") from None
    finally:
        if collect:
            gc.enable()
    if max_depth is not None and _depth_over(value, max_depth):
        raise JSONError(f"JSON is nested more than {max_depth} levels deep")
    return value


def _depth_over(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def elements(shape) -> int | None:
    """Element count of a shape given as JSON, or None if it is not a list of at most MAX_DIMS
    integers from 0 whose running product stays below 2**63 (the check safetensors itself makes)."""
    if type(shape) is not list or len(shape) > MAX_DIMS:
        return None
    n = 1
    for s in shape:
        if type(s) is not int or not 0 <= s < INT_LIMIT:
            return None
        n *= s
        if n >= INT_LIMIT:
            return None
    return n


# ---- patch metadata --------------------------------------------------------------------------------
def _field(path: Path, meta: dict, key: str, default, kind: type, max_values: int, max_depth: int):
    if key not in meta:
        if default is None:
            raise PatchFormatError(f"{path}: metadata is missing or malformed (no {key})")
        return default
    try:
        value = loads(meta[key], max_values=max_values, max_depth=max_depth)
    except JSONError as e:
        raise PatchFormatError(f"{path}: metadata is missing or malformed ({key}: {e})") from None
    if type(value) is not kind:
        raise PatchFormatError(f"{path}: metadata is missing or malformed ({key} is not a JSON {kind.__name__})")
    return value


def _bad(path: Path, what: str) -> PatchFormatError:
    return PatchFormatError(f"{path}: metadata is missing or malformed ({what})")


def _opt_str(v) -> bool:
    return v is None or type(v) is str


def check_version(path: Path, meta: dict[str, str], name: str, version: int, minor: int) -> int:
    """Refuse a file that is not a patch of format `name`, or of a version newer than `version`.`minor`;
    return its minor version."""
    if meta.get("format") != name:
        raise PatchFormatError(f"{path} is a safetensors file but not a patchkit patch (no format={name})", path=path)
    got = meta.get("format_version", "")
    if not re.fullmatch(r"-?[0-9]{1,9}", got):
        raise PatchFormatError(f"{path}: format_version is not an integer")
    if int(got) < 1:
        raise PatchFormatError(f"{path}: format_version {int(got)} does not exist (patch formats start at v1)")
    if int(got) > version:
        raise PatchFormatError(f"{path} uses patch format v{int(got)}; this patchkit reads v{version}: upgrade patchkit")
    return check_minor(path, meta, minor)


def check_minor(path: Path, meta: dict[str, str], reads: int) -> int:
    """The file's format minor version (`format_minor`, absent for plain v1 files), refused when it is
    newer than the `reads` this version of patchkit knows."""
    raw = meta.get("format_minor")
    if raw is None:
        return 0
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise PatchFormatError(f"{path}: format_minor is not a whole number")
    if int(raw) > reads:
        raise PatchFormatError(f"{path} uses patch format v1.{int(raw)}; this patchkit reads v1.{reads}: upgrade patchkit")
    return int(raw)


def check_metadata(path: Path, meta: dict[str, str], max_tensors: int, minor: int = 0) -> dict:
    """The JSON fields of a patch's metadata, parsed and type-checked:
    {"tensors": {name: (encoding, rows)}, "base": {...}, "tensor_base": {name: (shape, dtype, rows_sha256,
    result_sha256)}, "provenance": dict, "parents": [str], "eval": dict or None}."""
    n = max_tensors * (MAX_DIMS + 16) + 64
    tensors = _field(path, meta, "tensors", None, dict, n, 3)
    base = _field(path, meta, "base", None, dict, n, 4)
    prov = _field(path, meta, "provenance", {}, dict, MAX_FREE_VALUES, MAX_FREE_DEPTH)
    parents = _field(path, meta, "parents", [], list, max_tensors + 64, 1)
    evaluation = _field(path, meta, "eval", None, dict, MAX_FREE_VALUES, MAX_FREE_DEPTH) if "eval" in meta else None
    if not tensors:
        raise _bad(path, "tensors names no tensor")
    if len(tensors) > max_tensors:
        raise PatchFormatError(f"{path}: the patch edits {len(tensors)} tensors, more than {max_tensors} (PATCHKIT_MAX_PATCH_TENSORS)")
    if not all(type(p) is str and _HEX64.fullmatch(p) for p in parents):
        raise _bad(path, "parents must be a list of patch ids")
    if not (_opt_str(base.get("model_id")) and _opt_str(base.get("revision"))):
        raise _bad(path, "base model_id and revision must be strings or null")
    base_tensors = base.get("tensors")
    if type(base_tensors) is not dict:
        raise _bad(path, "base has no tensors object")
    edits, tensor_base, fields = {}, {}, {}
    for name, tm in tensors.items():
        where = f"tensor {shown(name)}"
        if not name:
            raise _bad(path, "a tensor name is empty")
        if type(tm) is not dict or type(tm.get("encoding")) is not str or type(tm.get("rows")) is not int:
            raise _bad(path, f"{where}: tensors entries must hold an encoding string and a rows integer")
        if tm["encoding"] not in PARTS:
            raise PatchFormatError(f"{path}: tensor {named(name)} has unknown encoding {shown(tm['encoding'])}")
        exc = tm.get("exceptions")
        if exc is not None and (type(exc) is not int or exc < 1):
            raise _bad(path, f"{where}: exceptions must be a positive integer")
        if (tm["encoding"] in V11 or exc is not None) and minor < 1:
            what = f"encoding {tm['encoding']}" if tm["encoding"] in V11 else "exceptions"
            raise PatchFormatError(f"{path}: tensor {named(name)} uses {what}, which needs patch format v1.1, "
                                   "but the file does not declare it (format_minor)")
        shared = tm.get("shared")
        if shared is not None:
            if type(shared) is not dict or not shared or not all(type(o) is str for o in shared.values()):
                raise _bad(path, f"{where}: shared must be an object naming, per part, the tensor that stores it")
            if minor < 2:
                raise PatchFormatError(f"{path}: tensor {named(name)} shares arrays, which needs patch format v1.2, "
                                       "but the file does not declare it (format_minor)")
            for part in shared:
                if part not in SHAREABLE or part not in PARTS[tm["encoding"]]:
                    raise _bad(path, f"{where}: part {shown(part, 40)} cannot be shared by a {tm['encoding']} edit")
        edits[name] = (tm["encoding"], tm["rows"], exc, shared or {})
        bt = base_tensors.get(name)
        if bt is None:
            raise PatchFormatError(f"{path}: tensor {named(name)} has no base fingerprint")
        if type(bt) is not dict or elements(bt.get("shape")) is None:
            raise _bad(path, f"{where}: base shape must be a list of at most {MAX_DIMS} integers from 0 to 2**63")
        dtype = bt.get("dtype")
        if type(dtype) is not str or not DTYPE_NAME.fullmatch(dtype):
            raise _bad(path, f"{where}: base dtype {shown(dtype, 40)} is not a dtype name")
        if dtype not in STORAGE and "unsupported" not in fields:
            fields["unsupported"] = (name, dtype)
        rows_sha, result_sha = bt.get("rows_sha256"), bt.get("result_sha256")
        if type(rows_sha) is not str or not _HEX64.fullmatch(rows_sha) or not (
                result_sha is None or type(result_sha) is str and _HEX64.fullmatch(result_sha)):
            raise _bad(path, f"{where}: rows_sha256 and result_sha256 must be sha256 hex digests")
        tensor_base[name] = (tuple(bt["shape"]), dtype, rows_sha, result_sha)
    for name, (_, _, _, shared) in edits.items():
        for part, owner in shared.items():
            if owner == name or owner not in edits or part in edits[owner][3] or part not in PARTS[edits[owner][0]]:
                raise _bad(path, f"tensor {shown(name)}: its {part} is shared with {shown(owner, 80)}, which does not store one")
    fields.update(tensors=edits, base=base, tensor_base=tensor_base, provenance=prov, parents=parents, eval=evaluation)
    return fields


def refuse_unsupported(path: Path, header, meta: dict[str, str], unsupported: tuple[str, str]) -> None:
    """A patch for a tensor of a dtype this version cannot edit: UnsupportedError if the file is whole
    (its content id matches its bytes, whatever the dtypes), PatchFormatError if it is damaged."""
    import hashlib

    from .stfile import encode_header, open_regular
    from .tensorio import pread_exact

    infos = [header.tensors[n] for n in sorted(header.tensors)]
    h = hashlib.sha256(encode_header([(i.name, i.dtype, i.shape, i.nbytes) for i in infos],
                                     {k: v for k, v in meta.items() if k != "id"}))
    with open_regular(path) as f:
        for i in infos:
            h.update(pread_exact(path, i.offset, i.nbytes, f))
    if h.hexdigest() != meta.get("id"):
        raise PatchFormatError(f"{path}: content id does not match the content: the file is corrupted or was edited")
    name, dtype = unsupported
    raise UnsupportedError(f"{path}: tensor {named(name)} has dtype {dtype}, which this version of patchkit cannot edit")


def read_arrays(path: Path, header, read_tensor, open_file) -> dict[str, np.ndarray]:
    """Every array of a patch file, each of a dtype patchkit knows."""
    for name, info in header.tensors.items():
        if not info.known:
            raise PatchFormatError(f"{path}: array {shown(name)} has dtype {info.dtype}, which no patch holds")
    try:
        with open_file(path) as f:
            return {name: read_tensor(info, f) for name, info in header.tensors.items()}
    except (ValueError, OSError) as e:
        raise PatchFormatError(f"{path}: cannot read tensor data ({e})") from None


def build_edits(path: Path, fields: dict, arrays: dict[str, np.ndarray], edit_class) -> dict:
    """The validated edits, each made of the arrays its encoding names; no array left undescribed."""
    edits, expected = {}, set()
    for name, (enc, n_rows, n_exc, shared) in fields["tensors"].items():
        parts = PARTS[enc] + (EXCEPTION_PARTS if n_exc is not None else ())
        keys = [f"{shared.get(p, name)}::{p}" for p in parts]
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise PatchFormatError(f"{path}: missing tensor {named(missing[0])}")
        expected.update(keys)
        got = {_FIELD_OF.get(p, p): arrays[k] for p, k in zip(parts, keys)}
        shape, dtype, rows_sha, result_sha = fields["tensor_base"][name]
        rows = got.pop("rows")
        edit = edit_class(name, shape, dtype, rows, enc, rows_sha, result_sha, **got)
        edit.validate()
        if n_rows != edit.n_rows:
            raise PatchFormatError(f"{path}: tensor {named(name)} row count does not match its metadata")
        if (n_exc or 0) != edit.n_exceptions:
            raise PatchFormatError(f"{path}: tensor {named(name)} exception count does not match its metadata")
        edits[name] = edit
    stray = set(arrays) - expected
    if stray:
        raise PatchFormatError(f"{path}: tensor {named(min(stray))} is not described by the metadata")
    return edits
