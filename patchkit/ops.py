"""apply, revert and status on checkpoint folders: plan first (every check, no write), then do.

Only the touched rows are ever in memory. With an output folder, untouched shards are copied (or
hard-linked) and touched shards are copied and then have their rows rewritten; in place, only the
touched rows' bytes are rewritten, under a journal (see `patchkit.state`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import state as st
from .checkpoint import Checkpoint
from .dtypes import is_finite, sub_delta, to_float, ulp
from .errors import (
    BaseMismatchError, CheckpointError, LockedError, NonFiniteError, OutputExistsError, PatchkitError, StateError, UnsupportedError,
)
from .format import Patch, rows_hash
from .fsutil import staged_folder
from .parallel import map_ordered
from .stfile import write_rows



def load_patch(p) -> Patch:
    if isinstance(p, Patch):
        return p
    from .sources import resolve_patch  # local paths, and hf:// once the Hub module is present

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
        with open(self.ckpt.info(name).file, "rb") as f:
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
        undo = st.read_undo(ck.path, rec.id)
        if undo is None:
            raise CheckpointError(f"the undo record of patch {short(rec.id)} is missing from {ck.state_dir}")
        for later in state.applied[idx + 1 :]:
            if rec.id in later.parents:
                raise StateError(f"patch {short(later.id)} was made on top of patch {short(rec.id)}: revert it first", child=later.id)
            later_rows = st.undo_rows(ck.path, later.id) or {}
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
        if tuple(info.shape) != tuple(edit.shape) or info.dtype != edit.dtype:
            raise BaseMismatchError(f"patch {short(p.id)} does not fit this checkpoint: tensor {name} differs in shape or dtype", tensor=name)
        current = overlay.read_disk(name, edit.rows)
        if rows_hash(current) != edit.result_sha256 and not force:
            raise StateError(
                f"patch {short(p.id)} is not applied to {ck.path}: the rows of {name} differ from what it writes "
                "(--force subtracts its deltas anyway)",
                tensor=name,
            )
        if edit.encoding == "replace":
            raise UnsupportedError(f"tensor {name} is replaced whole by patch {short(p.id)}; without its undo record it cannot be reverted")
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


# ---- doing -------------------------------------------------------------------------------------------
def _check_output(ckpt_path: Path, output: Path, overwrite: bool) -> None:
    out, src = output.resolve(), ckpt_path.resolve()
    if out == src or src in out.parents:
        raise CheckpointError(f"output {output} must not be the checkpoint or lie inside it; use --in-place to edit it")
    if out in src.parents:
        # replacing it (--overwrite) would delete the checkpoint being read
        raise CheckpointError(f"output {output} contains the checkpoint {ckpt_path}; choose a folder outside it")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output {output} already exists (use --overwrite to replace it)", path=output)
    if not output.parent.exists():
        raise CheckpointError(f"the folder {output.parent} for the output does not exist")


def _own_files(paths) -> None:
    """Give each weight file about to be rewritten in place an inode of its own. A hard link (from
    `apply -o --link`) or a symlink (a Hub cache snapshot) would otherwise carry the write into
    another checkpoint or into the cache. The copy has the same bytes, so a crash here changes nothing."""
    for path in paths:
        if not (path.is_symlink() or path.stat().st_nlink > 1):
            continue
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)  # follows a symlink to the bytes it points at
            shutil.copymode(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _write_in_place(plan: Plan, fsync: bool = False) -> None:
    """Rewrite the touched rows inside the checkpoint's own files, under a journal.

    A process killed at any point leaves a journal that the next command rolls back. With `fsync`
    every step is also forced to disk in order, so that a power cut cannot reorder them.
    """
    ck = plan.overlay.ckpt
    _own_files(sorted({ck.info(n).file for n in plan.overlay.rows}))
    for pid, originals in plan.undo.items():
        st.write_undo(ck.path, pid, originals, fsync=fsync)
    st.crashpoint("after-undo")
    before = st.load_state(ck.path)
    if plan.action == "apply":
        st.write_journal(ck.path, before, undo_ids=list(plan.undo), fsync=fsync)
    else:
        rows = {name: (plan.overlay.rows[name], plan.overlay.disk[name]) for name in sorted(plan.overlay.rows)}
        st.write_journal(ck.path, before, rows=rows, fsync=fsync)
    st.crashpoint("after-journal")
    by_file: dict[Path, list[str]] = {}
    for name in plan.overlay.rows:
        by_file.setdefault(ck.info(name).file, []).append(name)

    def write_file(item: tuple[Path, list[str]]) -> None:
        path, names = item
        with open(path, "r+b") as f:
            for name in sorted(names):
                write_rows(ck.info(name), plan.overlay.rows[name], plan.overlay.raw[name], f)
                st.crashpoint("mid-write")
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    # Writes to one file are serialised by the kernel; different files are written side by side.
    map_ordered(write_file, sorted(by_file.items()))
    st.crashpoint("after-write")
    st.save_state(ck.path, plan.state_after, fsync=fsync)
    st.crashpoint("after-state")
    st.clear_journal(ck.path, fsync=fsync)
    st.collect_garbage(ck.path)


def _copy_file(pair: tuple[Path, Path]) -> None:
    shutil.copyfile(*pair)
    shutil.copymode(*pair)


def _write_output(plan: Plan, output: Path, link: bool, overwrite: bool) -> None:
    ck = plan.overlay.ckpt
    touched = {ck.info(n).file for n in plan.overlay.rows}
    weight_files = {ck.path / f for f in ck.files}
    with staged_folder(output) as tmp:
        copies = []
        for root, dirs, files in os.walk(ck.path):
            rootp = Path(root)
            dirs[:] = sorted(d for d in dirs if not (rootp == ck.path and d == st.STATE_DIR))
            dest = tmp / rootp.relative_to(ck.path)
            dest.mkdir(exist_ok=True)
            for fname in sorted(files):
                src = rootp / fname
                if link and src in weight_files and src not in touched:
                    os.link(src, dest / fname)
                else:
                    copies.append((src, dest / fname))
        # The kernel copies (sendfile), so copies of different files go side by side on all cores;
        # biggest first, so that a small file does not end up alone at the end.
        copies.sort(key=lambda c: -c[0].stat().st_size)
        map_ordered(_copy_file, copies)
        st.crashpoint("output-copied")
        for path in sorted(touched):
            out_file = tmp / path.relative_to(ck.path)
            with open(out_file, "r+b") as f:
                for name in sorted(n for n in plan.overlay.rows if ck.info(n).file == path):
                    write_rows(ck.info(name), plan.overlay.rows[name], plan.overlay.raw[name], f)
        # Like `cp`, the new folder is not fsynced: it appears whole under its name (a rename), and a
        # killed process loses nothing; only a power cut before the kernel writes it back could.
        st.copy_state(ck.path, tmp)
        for pid, originals in plan.undo.items():
            st.write_undo(tmp, pid, originals)
        st.save_state(tmp, plan.state_after)
        st.collect_garbage(tmp)


def _run(plan_fn, target, checkpoint, output, in_place, force, link, overwrite, dry_run, fsync=False) -> dict:
    checkpoint = Path(checkpoint)
    if (output is None) == (not in_place):
        raise PatchkitError("give exactly one of an output folder (-o) or --in-place")
    output = Path(output) if output is not None else None
    ck = Checkpoint(checkpoint)
    if output is not None:
        _check_output(ck.path, output, overwrite)
    with st.locked(ck.path):
        if not dry_run:
            st.recover(ck.path)
        plan = plan_fn(target, ck.path, force=force, _ckpt=ck)
        result = plan.summary()
        result["dry_run"] = dry_run
        result["output"] = str(output if output is not None else ck.path)
        if dry_run:
            return result
        if in_place:
            _write_in_place(plan, fsync)
        else:
            _write_output(plan, output, link, overwrite)
    return result


def apply(patches, checkpoint, output=None, *, in_place=False, force=False, link=False, overwrite=False, dry_run=False,
          fsync=False, on_overlap: str | None = None, weights=None) -> dict:
    """Apply one or more patches, in order, in one pass. Returns the plan's summary plus `applied`.

    `fsync` forces every in-place step to disk in order (safe against power loss, slower); without
    it an in-place write is still safe against the process being killed at any moment.
    With `on_overlap` (sum, error or last) several patches are first merged into one patch against
    this checkpoint by `patchkit.merge.merge_patches`, under the same rules as `patchkit merge`; the
    checkpoint then records that merged patch (revert it as one)."""
    if isinstance(patches, (str, Path, Patch)):
        patches = [patches]
    if on_overlap is not None and len(patches) > 1:
        from .merge import merge_patches

        patches = [merge_patches([load_patch(p) for p in patches], weights=weights, on_overlap=on_overlap,
                                 base=Checkpoint(checkpoint), allow_different_base=force)]
    result = _run(plan_apply, patches, checkpoint, output, in_place, force, link, overwrite, dry_run, fsync)
    result["applied"] = result["patches"]
    return result


def revert(patch, checkpoint, output=None, *, in_place=False, force=False, overwrite=False, dry_run=False, fsync=False) -> dict:
    """Take a patch out again: bit for bit from the undo record, or approximately without one."""
    result = _run(plan_revert, patch, checkpoint, output, in_place, force, False, overwrite, dry_run, fsync)
    result["reverted"] = result["patches"]
    return result


def status(checkpoint) -> dict:
    """The patches applied to a checkpoint, in order, and whether their rows still hold what apply wrote."""
    ck = Checkpoint(checkpoint)
    recovered = False
    if st.has_journal(ck.path):
        with st.locked(ck.path):
            recovered = st.recover(ck.path)
    elif st.has_leftovers(ck.path):
        try:
            with st.locked(ck.path):
                st.recover(ck.path)  # no journal: only removes what no applied patch refers to
        except LockedError:
            pass  # another process is writing: those files are its own, not leftovers
    state = st.load_state(ck.path)
    undos = {rec.id: st.undo_rows(ck.path, rec.id) or {} for rec in state.applied}
    # which (patch, tensor) rows still hash to what apply recorded: every tensor read side by side
    checks = [(rec, name) for rec in state.applied for name in sorted(rec.tensors) if name in undos[rec.id]]
    hashes = map_ordered(lambda c: rows_hash(ck.read_rows(c[1], undos[c[0].id][c[1]])), checks)
    holds = {(rec.id, name): h == rec.tensors[name]["after_sha256"] for (rec, name), h in zip(checks, hashes)}
    out = []
    for i, rec in enumerate(state.applied):
        undo = undos[rec.id]
        changed, shadowed = [], {}
        for name in sorted(rec.tensors):
            if holds.get((rec.id, name)):
                continue
            rows = undo.get(name)
            later = next(
                (r.id for r in state.applied[i + 1 :] if rows is not None and name in undos[r.id]
                 and np.intersect1d(rows, undos[r.id][name]).size),
                None,
            )
            if later is not None:
                shadowed[name] = later  # a later patch rewrote some of these rows: expected
            else:
                changed.append(name)
        out.append({
            "id": rec.id, "source": rec.source, "rows": rec.rows, "forced": rec.forced, "parents": rec.parents,
            "intact": not changed, "changed_tensors": changed, "overwritten_by": shadowed, "undo_record": bool(undo),
        })
    return {"checkpoint": str(ck.path), "applied": out, "recovered": recovered}
