"""Planning apply and revert on checkpoint folders: every check, every new row computed, no write.

A `Plan` holds, per tensor, the rows it would change and the steps that make their new bytes, with
the hashes of the rows before and after each step (`patchkit.core.chunks`), the undo records it would
keep and the state after; `patchkit.core.writes` carries it out. Planning reads, hashes and computes
the touched rows a tensor at a time and keeps none of their bytes: writing makes them again, checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import BaseMismatchError, CheckpointError, NonFiniteError, StateError, UnsupportedError
from . import state as st
from .checkpoint import Checkpoint
from .chunks import Overlay, Step
from .dtypes import is_finite, sub_delta, to_float, ulp
from .parallel import map_ordered
from .patchfile import Patch, rows_hash


def load_patch(p) -> Patch:
    """The one resolver of patch references: a `Patch` as it is, a local path, or `hf://OWNER/REPO[/PATH][@REV]`
    (fetched through patchkit.share). Every function that takes a patch turns it into one here."""
    if isinstance(p, Patch):
        return p
    from ..share.sources import resolve_patch  # local paths, and hf:// once the Hub module is present

    return Patch.load(resolve_patch(str(p)))


def short(pid: str) -> str:
    return pid[:12]


@dataclass
class Plan:
    """What an apply or revert will write. `summary()` is what --dry-run prints."""

    action: str
    checkpoint: Path
    patch_ids: list[str]
    overlay: Overlay
    state_after: st.State
    undo: dict[str, dict[str, int]] = field(default_factory=dict)  # patch id -> tensor -> its step (apply)
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

    @property
    def nbytes(self) -> int:
        """Bytes of the rows it writes."""
        ck = self.overlay.ckpt
        return int(sum(len(r) * ck.info(n).row_bytes for n, r in self.overlay.rows.items()))

    def chunks(self, names=None, files: dict | None = None):
        """(tensor, rows, new bytes), one tensor at a time (those of `names`, else all), read again
        from the checkpoint (through `files`, shard -> open handle, when given) and checked."""
        return self.overlay.chunks(sorted(self.overlay.rows) if names is None else names, files)

    def originals(self, pid: str, files: dict | None = None) -> dict:
        """What the undo record of patch `pid` keeps: tensor -> (rows, their bytes before it, deferred)."""
        return self.overlay.originals(self.undo[pid], files)

    def journal_rows(self, files: dict | None = None) -> dict:
        """What a rows journal keeps: tensor -> (rows written, their bytes on disk, deferred)."""
        return self.overlay.disk_rows(files)

    def summary(self) -> dict:
        return {
            "action": self.action,
            "checkpoint": str(self.checkpoint),
            "patches": self.patch_ids,
            "rows": self.rows,
            "tensors": [{"name": n, "rows": int(len(r))} for n, r in sorted(self.overlay.rows.items())],
            "files": self.files,
            "bytes": self.nbytes,
            "forced": self.forced,
            "exact": self.exact,
            "max_error_ulps": self.max_error_ulps,
        }


# ---- planning --------------------------------------------------------------------------------------
@dataclass
class _EditedRows:
    """What planning keeps of one edit's rows: hashes and flags, no bytes."""

    found: str  # hash of the rows as earlier patches of the plan left them
    after: str | None = None  # None when the rows did not match and --force was not given
    hashed: bool = False  # whether `after` is the hash of the computed rows (not the patch's claim)
    overflow_row: int | None = None  # a row the edit would turn from finite to inf or NaN


def _edit_rows(overlay: Overlay, edit, force: bool) -> _EditedRows:
    current = overlay.read(edit.name, edit.rows)
    r = _EditedRows(rows_hash(current))
    if r.found == edit.base_sha256 or force:
        new, nonfinite = edit.new_rows_checked(current)
        # On the rows it was made for, a patch writes the rows its result_sha256 names (the arithmetic
        # is deterministic), so they need no second hash; status then checks rows against that claim.
        matched = r.found == edit.base_sha256 and edit.result_sha256 is not None
        r.after, r.hashed = (edit.result_sha256, False) if matched else (rows_hash(new), True)
        if nonfinite and edit.encoding != "replace":
            bad = is_finite(current, edit.dtype) & ~is_finite(new, edit.dtype)
            if bad.any():
                r.overflow_row = int(edit.rows[np.argwhere(bad)[0][0]])
    return r


def plan_apply(patches, checkpoint, force: bool = False, _ckpt: Checkpoint | None = None) -> Plan:
    """Check every patch against the checkpoint and compute the new rows; writes nothing."""
    ck = _ckpt or Checkpoint(checkpoint)
    patches = [load_patch(p) for p in patches]
    state = st.load_state(ck.path)
    applied = [r.id for r in state.applied]
    overlay = Overlay(ck)
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
        steps, tensors = {}, {}
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
        # Reading, hashing and computing the rows of different tensors is independent: on all cores,
        # each thread holding one tensor's rows at a time. The overlay is only read here; it is
        # written below, in order, once all have finished.
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
            if r.overflow_row is not None:
                row = r.overflow_row
                raise NonFiniteError(
                    f"patch {short(pid)} would overflow tensor {name} to inf at row {row}; nothing was written",
                    tensor=name, row=row,
                )
            tensors[name] = {"rows": edit.n_rows, "after_sha256": r.after}
            steps[name] = overlay.add(name, Step(edit.rows, r.found, edit.new_rows, r.after if r.hashed else None))
        if forced_here:
            plan.forced.append(pid)
        plan.undo[pid] = steps
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
    overlay = Overlay(ck)
    if rec is not None:
        idx = state.applied.index(rec)
        undo = st.read_undo(ck.path, rec.id, ck, lazy=True)  # checked; the bytes are read when written
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

        def read_and_hash(name: str) -> str:
            return rows_hash(overlay.read_disk(name, undo[name][0]))

        for name, found in zip(names, map_ordered(read_and_hash, names)):
            rows, orig = undo[name]
            if found != rec.tensors[name]["after_sha256"] and not force:
                raise StateError(
                    f"rows of tensor {name} changed after patch {short(rec.id)} was applied; "
                    "--force restores the recorded original bytes anyway",
                    tensor=name,
                )
            overlay.add(name, Step(rows, found, partial(_stored_rows, orig)))  # `orig` checks itself when read
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
        found = rows_hash(current)
        if found != edit.result_sha256 and not force:
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
        new = _subtracted(edit, current)
        new_sha256 = rows_hash(new)
        if new_sha256 != edit.base_sha256:
            plan.exact = False
            pv, rv = to_float(current, edit.dtype), to_float(new, edit.dtype)
            ok = np.isfinite(pv) & np.isfinite(rv)
            if ok.any():
                bound = 0.5 * ulp(pv[ok], edit.dtype) / ulp(rv[ok], edit.dtype) + 0.5
                worst = max(worst, float(bound.max()))
        overlay.add(name, Step(edit.rows, found, partial(_subtracted, edit), new_sha256))
        del current, new
    plan.max_error_ulps = worst
    return plan


def _stored_rows(stored, current: np.ndarray) -> np.ndarray:
    return stored.read()


def _subtracted(edit, current: np.ndarray) -> np.ndarray:
    return sub_delta(current, edit.deltas(), edit.dtype)
