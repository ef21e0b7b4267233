"""apply, revert and status on checkpoint folders: plan first (every check, no write), then do.

Only the touched rows are ever in memory, one tensor's at a time (per thread). With an output
folder, untouched shards are copied (or hard-linked) and touched shards are copied and then have
their rows rewritten; in place, only the touched rows' bytes are rewritten, under a journal (see
`patchkit.core.journal`). Planning lives in
`patchkit.core.plan`, writing in `patchkit.core.writes`; this module holds the locks and the order of steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import PatchkitError
from . import journal as jn
from . import state as st
from .checkpoint import Checkpoint
from .parallel import map_ordered
from .patchfile import Patch, rows_hash
from .plan import load_patch, plan_apply, plan_revert  # noqa: F401 (load_patch is re-exported)
from .writes import check_output, shard_temps, write_in_place, write_output


def _untidy(ck: Checkpoint) -> bool:
    """Whether a killed run left anything: a journal, records nothing refers to, temporary files."""
    return jn.has_journal(ck.path) or st.has_leftovers(ck.path) or bool(shard_temps(ck))


def _tidy(ck: Checkpoint) -> bool:
    """Under the exclusive lock: roll back an interrupted write, remove what killed runs left. True
    when anything on disk changed."""
    changed = jn.recover(ck.path)
    for p in shard_temps(ck):
        os.unlink(p)
        changed = True
    return changed


def _run(plan_fn, target, checkpoint, output, in_place, force, link, overwrite, dry_run, fsync=False) -> dict:
    checkpoint = Path(checkpoint)
    if (output is None) == (not in_place):
        raise PatchkitError("give exactly one of an output folder (-o) or --in-place")
    output = Path(output) if output is not None else None
    ck = Checkpoint(checkpoint)
    if output is not None:
        check_output(ck.path, output, overwrite)
    if in_place:
        with jn.locked(ck.path):
            if not dry_run and _tidy(ck):
                ck = Checkpoint(checkpoint)  # a roll-back wrote rows: read the files anew
            return _plan_and_do(plan_fn, target, ck, output, in_place, force, link, overwrite, dry_run, fsync)
    if not dry_run and _untidy(ck):
        with jn.locked(ck.path):
            if _tidy(ck):
                ck = Checkpoint(checkpoint)
    # An output only reads the checkpoint: other readers (status, another -o) may go on meanwhile.
    with jn.locked(ck.path, exclusive=False):
        return _plan_and_do(plan_fn, target, ck, output, in_place, force, link, overwrite, dry_run, fsync)


def _plan_and_do(plan_fn, target, ck, output, in_place, force, link, overwrite, dry_run, fsync) -> dict:
    plan = plan_fn(target, ck.path, force=force, _ckpt=ck)
    result = plan.summary()
    result["dry_run"] = dry_run
    result["output"] = str(output if output is not None else ck.path)
    if dry_run:
        return result
    if in_place:
        write_in_place(plan, fsync)
    else:
        write_output(plan, output, link, overwrite)
    return result


def apply(patches, checkpoint, output=None, *, in_place=False, force=False, link=False, overwrite=False, dry_run=False,
          fsync=False, on_overlap: str | None = None, weights=None) -> dict:
    """Apply one or more patches, in order, in one pass. Returns the plan's summary plus `applied`.

    `fsync` forces every in-place step to disk in order (safe against power loss, slower); without
    it an in-place write is still safe against the process being killed at any moment.
    With `on_overlap` (sum, error or last) several patches are first merged into one patch against
    this checkpoint by `patchkit.core.merge.merge_patches`, under the same rules as `patchkit merge`; the
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


def status(checkpoint, wait: float = 5.0) -> dict:
    """The patches applied to a checkpoint, in order, and whether their rows still hold what apply wrote.

    Reads under a shared lock, waiting up to `wait` seconds for a write in progress to finish (a
    read in the middle of one would report rows as changed); rolls back an interrupted write first."""
    ck = Checkpoint(checkpoint)
    recovered = False
    if _untidy(ck):
        with jn.locked(ck.path, wait=wait):
            recovered = _tidy(ck)
        if recovered:
            ck = Checkpoint(checkpoint)
    with jn.locked(ck.path, exclusive=False, wait=wait):
        return _status(ck, recovered)


def _status(ck: Checkpoint, recovered: bool) -> dict:
    state = st.load_state(ck.path)
    undos = {rec.id: st.undo_rows(ck.path, rec.id, ck) or {} for rec in state.applied}
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
