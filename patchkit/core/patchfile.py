"""The patch file, format v1 (specified in docs/format.md): a `Patch` to and from `.safetensors`.

No model, no torch, no network: numpy and the standard library only, so that `inspect` and
`status` start fast.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import PatchFormatError, PatchkitError, UnsupportedError
from . import encodings, patchcheck
from .dtypes import FLOAT_DTYPES, add_to_rows, from_float, is_finite, named, shown, to_float
from .encodings import factorize
from .patchcheck import dumps
from .sharing import find as find_sharing, holds as sharing_holds, stored as stored_arrays
from .stfile import STFormatError, atomic_write_bytes, open_regular, patch_tensor_limit, read_header, serialize
from .tensorio import read_tensor

FORMAT_NAME = "patchkit.patch"
FORMAT_VERSION = 1
FORMAT_MINOR = 2  # v1.1: `lowrank`, `scale`, exceptions; v1.2: shared arrays. Written only by files that use them
ENCODINGS = encodings.ENCODINGS
KNOWN_KEYS = {"format", "format_version", "format_minor", "id", "tensors", "base", "provenance", "parents", "eval", "description"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def rows_hash(raw_rows: np.ndarray) -> str:
    """Fingerprint of rows' bytes: sha256 over the rows concatenated in index order."""
    # the array's own buffer, no copy; flat first, as memoryview cannot cast a 2-d view with a 0 in its shape
    return hashlib.sha256(memoryview(np.ascontiguousarray(raw_rows).reshape(-1)).cast("B")).hexdigest()


def n_rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows, shape[-1]


@dataclass
class TensorEdit:
    """The edit of one tensor: sorted unique row indices and how those rows change.

    Rows lie along the output axis: a tensor of shape (d0, ..., dk) is seen as prod(d0..dk-1) rows
    of dk elements, each a contiguous byte range in the checkpoint.
    - dense:    new = round(old + delta[i])             delta float32 [n, cols]
    - factored: new = round(old + scale[i] * direction)  direction float32 [cols], scale [n] or [1]
    - replace:  new = values[i]                          values in the tensor's own dtype
    - lowrank:  new = round(old + U[i] @ V)              U float32 [n, r], V float32 [r, cols] (v1.1)
    - scale:    new = round(gamma[i] * old)              gamma float32 [n] or [1] (v1.1)
    Every encoding but replace may carry exceptions (v1.1): flat indices into the n x cols edited
    elements, int64, and their exact values in the tensor's dtype, set after the arithmetic.
    The arithmetic of the v1.1 parts is in `encodings`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    rows: np.ndarray
    encoding: str
    base_sha256: str
    result_sha256: str | None = None
    delta: np.ndarray | None = None
    direction: np.ndarray | None = None
    scale: np.ndarray | None = None
    values: np.ndarray | None = None
    u: np.ndarray | None = None
    v: np.ndarray | None = None
    gamma: np.ndarray | None = None
    exc_index: np.ndarray | None = None
    exc_values: np.ndarray | None = None

    @property
    def rank(self) -> int | None:
        return {"lowrank": None if self.u is None else int(self.u.shape[1]), "factored": 1}.get(self.encoding)

    @property
    def n_exceptions(self) -> int:
        return 0 if self.exc_index is None else int(len(self.exc_index))

    @property
    def minor(self) -> int:
        """The format minor version this edit needs: 1 for the v1.1 encodings and exceptions, else 0."""
        return int(self.encoding in encodings.V11_ENCODINGS or self.exc_index is not None)

    @property
    def n_rows(self) -> int:
        return int(len(self.rows))

    @property
    def n_cols(self) -> int:
        return n_rows_cols(self.shape)[1]

    def deltas(self) -> np.ndarray:
        """The per-row float32 deltas (dense, factored and lowrank encodings; exceptions not included)."""
        if self.encoding == "dense":
            return self.delta
        if self.encoding == "lowrank":
            return encodings.lowrank_delta(self.u, self.v)
        if self.encoding == "scale":
            raise UnsupportedError(f"tensor {named(self.name)}: a scale edit multiplies its rows and has no deltas")
        if self.encoding == "factored":
            scale = self.scale if len(self.scale) == len(self.rows) else np.repeat(self.scale, len(self.rows))
            return (scale[:, None].astype(np.float32) * self.direction[None, :]).astype(np.float32)
        raise PatchFormatError(f"tensor {self.name}: a replace edit has no deltas")

    def new_rows(self, old_raw: np.ndarray) -> np.ndarray:
        """Raw bytes of the edited rows, given the raw bytes of the rows before the edit."""
        return self.new_rows_checked(old_raw)[0]

    def new_rows_checked(self, old_raw: np.ndarray) -> tuple[np.ndarray, bool]:
        """(raw bytes of the edited rows, whether any of their elements is inf or NaN)."""
        if self.encoding == "replace":
            new = np.ascontiguousarray(self.values).view(np.uint8).reshape(old_raw.shape)
            return new, not bool(is_finite(new, self.dtype).all()) if self.dtype in FLOAT_DTYPES else False
        if self.encoding == "factored":
            new, bad = add_to_rows(old_raw, self.dtype, direction=self.direction, scale=self.scale)
        elif self.encoding == "lowrank":
            new, bad = encodings.apply_lowrank(old_raw, self.dtype, self.u, self.v)
        elif self.encoding == "scale":
            new, bad = encodings.apply_scale(old_raw, self.dtype, self.gamma)
        else:
            new, bad = add_to_rows(old_raw, self.dtype, delta=self.delta)
        if self.exc_index is not None:
            new, bad = encodings.apply_exceptions(new, self.dtype, self.exc_index, self.exc_values)
        return new, bad

    def arrays(self) -> dict[str, tuple[str, np.ndarray]]:
        out = {f"{self.name}::rows": ("I64", self.rows)}
        if self.encoding == "dense":
            out[f"{self.name}::delta"] = ("F32", self.delta)
        elif self.encoding == "factored":
            out[f"{self.name}::direction"] = ("F32", self.direction)
            out[f"{self.name}::scale"] = ("F32", self.scale)
        elif self.encoding == "lowrank":
            out[f"{self.name}::U"] = ("F32", self.u)
            out[f"{self.name}::V"] = ("F32", self.v)
        elif self.encoding == "scale":
            out[f"{self.name}::gamma"] = ("F32", self.gamma)
        else:
            out[f"{self.name}::values"] = (self.dtype, self.values)
        if self.exc_index is not None:
            out[f"{self.name}::exceptions"] = ("I64", self.exc_index)
            out[f"{self.name}::exception_values"] = (self.dtype, self.exc_values)
        return out

    def validate(self) -> None:
        encodings.validate_edit(self, n_rows_cols(self.shape))

    def if_exact(self, old: np.ndarray, new: np.ndarray) -> "TensorEdit | None":
        """This edit, with its result_sha256 set, if it is valid and turns the rows `old` into `new`
        bit for bit; else None (how diff accepts a candidate encoding)."""
        try:
            self.validate()
        except PatchkitError:
            return None
        result = self.new_rows(old)
        if not np.array_equal(result, new):
            return None
        self.result_sha256 = rows_hash(result)
        return self


def make_edit(name, shape, dtype, rows, base_raw, *, delta=None, values=None, factor=True, u=None, v=None,
              gamma=None, exceptions=None) -> TensorEdit:
    """Build an edit from float32 deltas (factored automatically when exact), replacement values, low-rank
    factors `u` [n, r] and `v` [r, cols], or per-row factors `gamma`; `exceptions` = (flat indices, values)
    are set after the arithmetic (format v1.1).

    `base_raw` is the raw bytes of the touched rows in the base, for the fingerprint.
    """
    rows = np.asarray(rows, dtype=np.int64)
    base = rows_hash(base_raw)
    shape = tuple(shape)
    if values is not None:
        edit = TensorEdit(name, shape, dtype, rows, "replace", base, values=values)
    elif u is not None:
        edit = TensorEdit(name, shape, dtype, rows, "lowrank", base, u=np.ascontiguousarray(u, dtype=np.float32),
                          v=np.ascontiguousarray(v, dtype=np.float32))
    elif gamma is not None:
        edit = TensorEdit(name, shape, dtype, rows, "scale", base, gamma=np.ascontiguousarray(gamma, dtype=np.float32))
    else:
        delta = np.ascontiguousarray(delta, dtype=np.float32)
        fac = factorize(delta) if factor else None
        if fac is not None:
            edit = TensorEdit(name, shape, dtype, rows, "factored", base, direction=fac[0], scale=fac[1])
        else:
            edit = TensorEdit(name, shape, dtype, rows, "dense", base, delta=delta)
    if exceptions is not None and len(exceptions[0]):
        edit.exc_index = np.ascontiguousarray(exceptions[0], dtype=np.int64)
        edit.exc_values = np.ascontiguousarray(exceptions[1])
    edit.validate()
    edit.result_sha256 = rows_hash(edit.new_rows(np.asarray(base_raw, dtype=np.uint8)))
    return edit


@dataclass
class Patch:
    """A set of row edits for one base model, with its fingerprint, provenance and evaluation."""

    edits: dict[str, TensorEdit]
    base_model: str | None = None
    base_revision: str | None = None
    provenance: dict = field(default_factory=dict)
    parents: list[str] = field(default_factory=list)
    evaluation: dict | None = None
    description: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    # The file's own sharing of arrays, for a patch read from a file: written back the same way, so
    # that a loaded patch keeps its bytes and its id (a v1.0 file stays v1.0). None: share all it can.
    sharing: dict[str, dict[str, str]] | None = field(default=None, repr=False, compare=False)

    # ---- serialisation -------------------------------------------------------------------------
    def base_fingerprint(self) -> dict:
        """The `base` object: the model id and revision, and per tensor its shape, dtype and rows hashes."""
        tensors = {n: {"shape": list(e.shape), "dtype": e.dtype, "rows_sha256": e.base_sha256, "result_sha256": e.result_sha256}
                   for n, e in sorted(self.edits.items())}
        return {"model_id": self.base_model, "revision": self.base_revision, "tensors": tensors}

    def _shares(self) -> dict[str, dict[str, str]]:
        """Per tensor, the parts it takes from another tensor (format v1.2, `sharing`): the file's own
        sharing for a patch read from a file while its arrays still allow it, else all it can."""
        if self.sharing is not None and sharing_holds(self.edits, self.sharing):
            return self.sharing
        return find_sharing(self.edits)

    def _layout(self) -> tuple[dict[str, str], dict[str, tuple[str, np.ndarray]]]:
        """(metadata without id, the arrays to write): what the file holds."""
        shares = self._shares()
        arrays = {}
        for name, e in self.edits.items():
            e.validate()
            taken = shares.get(name, {})
            arrays.update(stored_arrays(e.arrays(), taken))
        return self._metadata(shares), arrays

    def _arrays(self) -> dict[str, tuple[str, np.ndarray]]:
        return self._layout()[1]

    def _metadata(self, shares: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
        shares = self._shares() if shares is None else shares
        prov = dict(self.provenance)
        prov.setdefault("patchkit_version", __version__)
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "tensors": dumps({n: _tensor_entry(e, shares.get(n)) for n, e in sorted(self.edits.items())}),
            "base": dumps(self.base_fingerprint()),
            "provenance": dumps(prov),
        }
        if self.parents:
            meta["parents"] = dumps(list(self.parents))
        if self.evaluation is not None:
            meta["eval"] = dumps(self.evaluation)
        if self.description:
            meta["description"] = self.description
        minor = max(self.minor, 2 if shares else 0)
        if minor:
            meta["format_minor"] = str(minor)
        meta.update(self.extra)
        return meta

    @property
    def minor(self) -> int:
        """The format minor version the edits' encodings need: 0 (plain v1, no format_minor key) or 1.
        A file that shares arrays between edits is v1.2 (`format_version` in `summary()`)."""
        return max(e.minor for e in self.edits.values()) if self.edits else 0

    @property
    def file_minor(self) -> int:
        """The format minor version of the file as written: `minor`, or 2 when it shares arrays."""
        return max(self.minor, 2 if self._shares() else 0)

    def to_bytes(self) -> bytes:
        if not self.edits:
            raise PatchFormatError("a patch must edit at least one tensor")
        meta, arrays = self._layout()
        meta["id"] = hashlib.sha256(serialize(arrays, meta)).hexdigest()
        return serialize(arrays, meta)

    @property
    def id(self) -> str:
        meta, arrays = self._layout()
        return hashlib.sha256(serialize(arrays, meta)).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_bytes(path, self.to_bytes())
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Patch":
        """Read and check a patch file; every problem is one PatchFormatError (UnsupportedError for a
        tensor of a dtype this version cannot edit), with at most PATCHKIT_MAX_PATCH_TENSORS tensors."""
        path = Path(path)
        if not path.exists():
            raise PatchFormatError(f"patch file {path} does not exist", path=path)
        max_tensors = patch_tensor_limit()
        try:
            header = read_header(path, max_tensors=max_tensors)
        except (STFormatError, OSError) as e:
            raise PatchFormatError(f"{path} is not a readable safetensors file: {e}", path=path) from None
        meta = header.metadata
        minor = patchcheck.check_version(path, meta, FORMAT_NAME, FORMAT_VERSION, FORMAT_MINOR)
        fields = patchcheck.check_metadata(path, meta, max_tensors, minor)
        if "unsupported" in fields:
            patchcheck.refuse_unsupported(path, header, meta, fields["unsupported"])
        unknown = {k: v for k, v in meta.items() if k not in KNOWN_KEYS or (k == "format_minor" and minor == 0)}
        if unknown:
            listed = ", ".join(shown(k, 40) for k in sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            warnings.warn(f"{path}: unknown metadata keys kept as they are: {listed}", stacklevel=2)
        arrays = patchcheck.read_arrays(path, header, read_tensor, open_regular)
        try:
            patch = cls(
                edits=patchcheck.build_edits(path, fields, arrays, TensorEdit),
                base_model=fields["base"].get("model_id"),
                base_revision=fields["base"].get("revision"),
                provenance=fields["provenance"],
                parents=list(fields["parents"]),
                evaluation=fields["eval"],
                description=meta.get("description"),
                extra=unknown,
                path=path,
                sharing={n: dict(t[3]) for n, t in fields["tensors"].items() if t[3]},
            )
            actual = patch.id
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError) as e:
            # a safety net: every field is checked above, so this names a case the checks missed
            raise PatchFormatError(f"{path}: metadata is missing or malformed ({e.__class__.__name__}: {str(e)[:80]})") from None
        if meta.get("id") != actual:
            raise PatchFormatError(f"{path}: content id does not match the content: the file is corrupted or was edited")
        return patch

    # ---- summaries -------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return sum(e.n_rows for e in self.edits.values())

    def summary(self) -> dict:
        per_layer: dict[str, int] = {}
        tensors = []
        for name in sorted(self.edits, key=lambda n: (layer_of(n) is None, layer_of(n) or 0, n)):
            e = self.edits[name]
            layer = layer_of(name)
            per_layer[str(layer) if layer is not None else "other"] = per_layer.get(str(layer) if layer is not None else "other", 0) + e.n_rows
            n_rows, n_cols = n_rows_cols(e.shape)
            tensors.append({
                "name": name, "rows": e.n_rows, "of_rows": n_rows, "encoding": e.encoding,
                "shape": list(e.shape), "dtype": e.dtype, "layer": layer, "rank": e.rank, "exceptions": e.n_exceptions,
            })
        nbytes = self.path.stat().st_size if self.path is not None and self.path.exists() else len(self.to_bytes())
        return {
            "id": self.id,
            "format": f"{FORMAT_NAME} v{FORMAT_VERSION}" + (f".{self.file_minor}" if self.file_minor else ""),
            "rows": self.rows,
            "tensors": tensors,
            "rows_per_layer": per_layer,
            "bytes": nbytes,
            "base": self.base_fingerprint(),
            "provenance": self.provenance,
            "parents": self.parents,
            "eval": self.evaluation,
            "description": self.description,
        }


def _tensor_entry(e: TensorEdit, shared: dict[str, str] | None = None) -> dict:
    entry = {"encoding": e.encoding, "rows": e.n_rows}
    if e.exc_index is not None:
        entry["exceptions"] = e.n_exceptions
    if shared:
        entry["shared"] = dict(sorted(shared.items()))
    return entry


__all__ = ["Patch", "TensorEdit", "make_edit", "factorize", "rows_hash", "layer_of", "from_float", "to_float"]
