"""Planning apply and revert on checkpoint folders: every check, every new row computed, no write.

A `Plan` holds the rows it would change per tensor (over the bytes on disk), the undo records it
would keep and the state after; `patchkit.core.writes` carries it out. Only the touched rows are ever
in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BaseMismatchError, CheckpointError, NonFiniteError, StateError, UnsupportedError
from . import state as st
from .checkpoint import Checkpoint
from .dtypes import is_finite, sub_delta, to_float, ulp
from .parallel import map_ordered
from .patchfile import Patch, rows_hash
from .stfile import open_regular


def load_patch(p) -> Patch:
    """The one resolver of patch references: a `Patch` as it is, a local path, or `hf://OWNER/REPO[/PATH][@REV]`
    (fetched through patchkit.share). Every function that takes a patch turns it into one here."""
    if isinstance(p, Patch):
        return p
    from ..share.sources import resolve_patch  # local paths, and hf:// once the Hub module is present

    return Patch.load(resolve_patch(str(p)))


def short(pid: str) -> str:
    return pid[:12]


class _Overlay:
    """The rows a plan has changed so far, per tensor, over the checkpoint's bytes on disk."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.rows: dict[str, np.ndarray] = {}
        self.raw: dict[str, np.ndarray] = {}
        self.disk: dict[str, np.ndarray] = {}  # bytes on disk for self.rows (for the journal)

    def read_disk(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The rows' bytes on disk, all runs of rows read through one open handle."""
        with open_regular(self.ckpt.info(name).file) as f:
            return self.ckpt.read_rows(name, rows, f)

    def read(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the rows as the plan has left them so far, the rows on disk)."""
        disk = self.read_disk(name, rows)
        if name not in self.rows:
            return disk, disk  # neither is ever written to
        out = disk.copy()
        pos = np.searchsorted(self.rows[name], rows)
        pos = np.minimum(pos, len(self.rows[name]) - 1)
        hit = self.rows[name][pos] == rows
        out[hit] = self.raw[name][pos[hit]]
        return out, disk

    def write(self, name: str, rows: np.ndarray, raw: np.ndarray, disk: np.ndarray) -> None:
        """Record new bytes for `rows`; `disk` is their bytes on disk (from `read`)."""
        if name not in self.rows:
            self.rows[name], self.raw[name], self.disk[name] = rows.copy(), raw, disk
            return
        all_rows = np.union1d(self.rows[name], rows)
        new_raw = np.empty((len(all_rows), raw.shape[1]), dtype=np.uint8)
        new_disk = np.empty_like(new_raw)
        old_pos = np.searchsorted(all_rows, self.rows[name])
        new_raw[old_pos], new_disk[old_pos] = self.raw[name], self.disk[name]
        pos = np.searchsorted(all_rows, rows)
        new_raw[pos], new_disk[pos] = raw, disk
        self.rows[name], self.raw[name], self.disk[name] = all_rows, new_raw, new_disk


@dataclass
class Plan:
    """What an apply or revert will write. `summary()` is what --dry-run prints."""

    action: str
    checkpoint: Path
    patch_ids: list[str]
    overlay: _Overlay
    state_after: st.State
    undo: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    undo_hashes: dict[str, dict[str, str]] = field(default_factory=dict)  # sha256 of each undo record's bytes
    forced: list[str] = field(default_factory=list)
    exact: bool = True
    max_error_ulps: float = 0.0

    @property
    def files(self) -> list[str]:
        ck = self.overlay.ckpt
        return sorted({str(ck.info(n).file.relative_to(ck.path)) for n in self.overlay.rows})

    @property
    def rows(self) -> int:
        return int(sum(len(r) for r in self.overlay.rows.values()))

    def summary(self) -> dict:
        ck = self.overlay.ckpt
        return {
            "action": self.action,
            "checkpoint": str(self.checkpoint),
            "patches": self.patch_ids,
            "rows": self.rows,
            "tensors": [{"name": n, "rows": int(len(r))} for n, r in sorted(self.overlay.rows.items())],
            "files": self.files,
            "bytes": int(sum(len(r) * ck.info(n).row_bytes for n, r in self.overlay.rows.items())),
            "forced": self.forced,
            "exact": self.exact,
            "max_error_ulps": self.max_error_ulps,
        }


# ---- planning --------------------------------------------------------------------------------------
@dataclass
class _EditedRows:
    current: np.ndarray  # the rows as earlier patches of the plan left them
    disk: np.ndarray  # the rows on disk
    found: str  # hash of `current`
    new: np.ndarray | None = None  # None when the rows did not match and --force was not given
    nonfinite: bool = False
    after: str | None = None


def _edit_rows(overlay: _Overlay, edit, force: bool) -> _EditedRows:
    current, disk = overlay.read(edit.name, edit.rows)
    r = _EditedRows(current, disk, rows_hash(current))
    if r.found == edit.base_sha256 or force:
        r.new, r.nonfinite = edit.new_rows_checked(current)
        # On the rows it was made for, a patch writes the rows its result_sha256 names (the arithmetic
        # is deterministic), so they need no second hash; status then checks rows against that claim.
        matched = r.found == edit.base_sha256 and edit.result_sha256 is not None
        r.after = edit.result_sha256 if matched else rows_hash(r.new)
    return r


def plan_apply(patches, checkpoint, force: bool = False, _ckpt: Checkpoint | None = None) -> Plan:
    """Check every patch against the checkpoint and compute the new rows; writes nothing."""
    ck = _ckpt or Checkpoint(checkpoint)
    patches = [load_patch(p) for p in patches]
    state = st.load_state(ck.path)
    applied = [r.id for r in state.applied]
    overlay = _Overlay(ck)
    plan = Plan("apply", ck.path, [], overlay, st.State(list(state.applied)))
    for patch in patches:
        pid = patch.id
        if pid in applied:
            raise StateError(f"patch {short(pid)} is already applied to {ck.path}", patch=pid)
        missing = [p for p in patch.parents if p not in applied]
        if missing:
            raise StateError(
                f"patch {short(pid)} was made on top of patch {short(missing[0])}, which is not applied to {ck.path}: apply it first",
                patch=pid, parent=missing[0],
            )
        forced_here = False
        originals, tensors = {}, {}
        names = sorted(patch.edits)
        for name in names:
            edit, info = patch.edits[name], ck.info(name)
            if not info.known:
                raise UnsupportedError(f"patch {short(pid)} edits tensor {name}, of dtype {info.dtype}, which this "
                                       "version of patchkit cannot edit", tensor=name)
            if tuple(info.shape) != tuple(edit.shape) or info.dtype != edit.dtype:
                raise BaseMismatchError(
                    f"patch {short(pid)} was made for another base: tensor {name} is {info.dtype} {list(info.shape)} "
                    f"in the checkpoint, {edit.dtype} {list(edit.shape)} in the patch",
                    tensor=name,
                )
        # Reading, hashing and computing the rows of different tensors is independent: on all cores.
        # The overlay is only read here; it is written below, in order, once all have finished.
        results = map_ordered(lambda n: _edit_rows(overlay, patch.edits[n], force), names)
        if not force and all(r.found == patch.edits[n].result_sha256 != patch.edits[n].base_sha256
                             for n, r in zip(names, results)):
            # A checkpoint that already holds what the patch writes, without a record of it (patched
            # elsewhere, or uploaded without its .patchkit/ folder): say so, rather than "another base".
            raise StateError(
                f"patch {short(pid)} is already in {ck.path}: every row it touches holds what it writes, "
                "though no record says so; `patchkit revert` takes it out (approximately, without the record)",
                patch=pid,
            )
        for name, r in zip(names, results):
            edit = patch.edits[name]
            if r.found != edit.base_sha256:
                if not force:
                    raise BaseMismatchError(
                        f"patch {short(pid)} was made for another base: the touched rows of tensor {name} differ "
                        "(use --force to add its deltas anyway)",
                        tensor=name, expected=edit.base_sha256, found=r.found,
                    )
                forced_here = True
            if r.nonfinite and edit.encoding != "replace":
                bad = is_finite(r.current, edit.dtype) & ~is_finite(r.new, edit.dtype)
                if bad.any():
                    row = int(edit.rows[np.argwhere(bad)[0][0]])
                    raise NonFiniteError(
                        f"patch {short(pid)} would overflow tensor {name} to inf at row {row}; nothing was written",
                        tensor=name, row=row,
                    )
            originals[name] = (edit.rows, r.current)
            tensors[name] = {"rows": edit.n_rows, "after_sha256": r.after}
            overlay.write(name, edit.rows, r.new, r.disk)
        if forced_here:
            plan.forced.append(pid)
        plan.undo[pid] = originals
        plan.undo_hashes[pid] = {name: r.found for name, r in zip(names, results)}
        src = str(patch.path) if patch.path is not None else None
        plan.state_after.applied.append(st.AppliedRecord(pid, src, patch.rows, forced_here, list(patch.parents), tensors))
        plan.patch_ids.append(pid)
        applied.append(pid)
    return plan


def _find_record(state: st.State, patch) -> tuple[st.AppliedRecord | None, Patch | None]:
    if isinstance(patch, (str, Path)) and not Path(patch).exists() and not str(patch).startswith("hf://"):
        matches = [r for r in state.applied if r.id.startswith(str(patch))] if len(str(patch)) >= 6 else []
        if len(matches) == 1:
            return matches[0], None
        if len(matches) > 1:
            raise StateError(f"patch id prefix {patch} is ambiguous")
    p = load_patch(patch)
    return state.find(p.id), p


def plan_revert(patch, checkpoint, force: bool = False, _ckpt: Checkpoint | None = None) -> Plan:
    ck = _ckpt or Checkpoint(checkpoint)
    state = st.load_state(ck.path)
    rec, p = _find_record(state, patch)
    overlay = _Overlay(ck)
    if rec is not None:
        idx = state.applied.index(rec)
        undo = st.read_undo(ck.path, rec.id, ck)
        if undo is None:
            raise CheckpointError(f"the undo record of patch {short(rec.id)} is missing from {ck.state_dir}")
        if set(undo) != set(rec.tensors):
            raise CheckpointError(f"the undo record of patch {short(rec.id)} in {ck.state_dir} does not cover the "
                                  "tensors the state lists; move it away (nothing was written)")
        for later in state.applied[idx + 1 :]:
            if rec.id in later.parents:
                raise StateError(f"patch {short(later.id)} was made on top of patch {short(rec.id)}: revert it first", child=later.id)
            later_rows = st.undo_rows(ck.path, later.id, ck) or {}
            for name, (rows, _) in undo.items():
                if name in later_rows and np.intersect1d(rows, later_rows[name]).size:
                    raise StateError(
                        f"patch {short(later.id)}, applied later, edits the same rows of {name}: revert it first",
                        later=later.id, tensor=name,
                    )
        names = sorted(undo)

        def read_and_hash(name: str) -> tuple[np.ndarray, str]:
            current = overlay.read_disk(name, undo[name][0])
            return current, rows_hash(current)

        for name, (current, found) in zip(names, map_ordered(read_and_hash, names)):
            rows, orig = undo[name]
            if found != rec.tensors[name]["after_sha256"] and not force:
                raise StateError(
                    f"rows of tensor {name} changed after patch {short(rec.id)} was applied; "
                    "--force restores the recorded original bytes anyway",
                    tensor=name,
                )
            overlay.write(name, rows, orig, current)
        after = st.State([r for r in state.applied if r.id != rec.id])
        return Plan("revert", ck.path, [rec.id], overlay, after)
    # No record: the checkpoint was patched elsewhere. Subtract the deltas; exact only if it shows.
    plan = Plan("revert", ck.path, [p.id], overlay, state)
    worst = 0.0
    for name in sorted(p.edits):
        edit = p.edits[name]
        info = ck.info(name)
        if not info.known:
            raise UnsupportedError(f"patch {short(p.id)} edits tensor {name}, of dtype {info.dtype}, which this "
                                   "version of patchkit cannot edit", tensor=name)
        if tuple(info.shape) != tuple(edit.shape) or info.dtype != edit.dtype:
            raise BaseMismatchError(f"patch {short(p.id)} does not fit this checkpoint: tensor {name} differs in shape or dtype", tensor=name)
        current = overlay.read_disk(name, edit.rows)
        if rows_hash(current) != edit.result_sha256 and not force:
            raise StateError(
                f"patch {short(p.id)} is not applied to {ck.path}: the rows of {name} differ from what it writes "
                "(--force subtracts its deltas anyway)",
                tensor=name,
            )
        if edit.encoding in ("replace", "scale"):
            how = "replaced whole" if edit.encoding == "replace" else "multiplied (a scale edit: its factors round away bits)"
            raise UnsupportedError(f"tensor {name} is {how} by patch {short(p.id)}; without its undo record it cannot be "
                                   "reverted (revert where it was applied, or apply the patch to a fresh copy of the base)",
                                   tensor=name)
        new = sub_delta(current, edit.deltas(), edit.dtype)
        if rows_hash(new) != edit.base_sha256:
            plan.exact = False
            pv, rv = to_float(current, edit.dtype), to_float(new, edit.dtype)
            ok = np.isfinite(pv) & np.isfinite(rv)
            if ok.any():
                bound = 0.5 * ulp(pv[ok], edit.dtype) / ulp(rv[ok], edit.dtype) + 0.5
                worst = max(worst, float(bound.max()))
        overlay.write(name, edit.rows, new, current)
    plan.max_error_ulps = worst
    return plan
