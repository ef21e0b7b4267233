"""Arrays shared between the edits of one patch (format v1.2, docs/format.md).

An edit may take its `rows`, `direction`, `scale`, `U`, `V` or `gamma` array from another edit of the
same patch: the paper's one direction over 30 layers is then stored once, and a projection over every
row of many tensors stores one `rows` array per row count. A sharing is a mapping
{tensor: {part: owner}}, the owner being a tensor that stores that part itself.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .dtypes import STORAGE

SHAREABLE = ("rows", "direction", "scale", "U", "V", "gamma")


def _part(key: str) -> str:
    return key.rsplit("::", 1)[1]


def find(edits: dict) -> dict[str, dict[str, str]]:
    """The sharing a writer uses: an array of a shareable part identical (dtype, shape, bytes as written)
    to one an earlier tensor, in name order, stores is taken from that tensor."""
    owner: dict[tuple, str] = {}
    shares: dict[str, dict[str, str]] = {}
    for name in sorted(edits):
        for key, (dtype, arr) in edits[name].arrays().items():
            part = _part(key)
            if part not in SHAREABLE:
                continue
            a = np.ascontiguousarray(arr, dtype=STORAGE[dtype])
            k = (part, dtype, a.shape, hashlib.sha256(memoryview(a.reshape(-1)).cast("B")).digest())
            if k in owner:
                shares.setdefault(name, {})[part] = owner[k]
            else:
                owner[k] = name
    return shares


def holds(edits: dict, shares: dict[str, dict[str, str]]) -> bool:
    """Whether `shares` is a valid sharing of `edits`: every shared part the very array its owner
    stores, no chains."""
    for name, parts in shares.items():
        for part, owner in parts.items():
            if name not in edits or owner not in edits or part in shares.get(owner, {}):
                return False
            a = edits[name].arrays().get(f"{name}::{part}")
            b = edits[owner].arrays().get(f"{owner}::{part}")
            if a is None or b is None or a[0] != b[0] or not np.array_equal(a[1], b[1]):
                return False
    return True


def stored(arrays: dict, taken: dict[str, str]) -> dict:
    """An edit's arrays without the parts it takes from another edit."""
    return {k: v for k, v in arrays.items() if _part(k) not in taken}
