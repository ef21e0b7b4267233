"""Carrying out a plan: rows rewritten in place under a journal, or a new output folder.

In place, every shard is first checked to be the file the plan was read from and opened for
writing, the undo records and the journal are written, then the rows; a failed write is rolled
back at once from the journal (`patchkit.core.journal`). An output is built in a hidden folder beside
it and renamed into place whole (`patchkit.core.fsutil.staged_folder`). Errors name the file and step.

Rows go through memory a tensor at a time: each record (undo record, journal) is streamed to its
file tensor by tensor, and each tensor's new rows are made just before they are written
(`Plan.chunks`), every time from the bytes on disk checked against the plan's hashes
(`records.ChangedOnDisk` when they differ, which fails the write like an OSError does).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import CheckpointError, OutputExistsError, PatchkitError
from . import journal as jn
from . import state as st
from .checkpoint import Checkpoint
from .fsutil import is_own_temp, staged_folder, temp_file
from .parallel import map_ordered
from .plan import Plan
from .records import ChangedOnDisk
from .tensorio import write_rows


def check_output(ckpt_path: Path, output: Path, overwrite: bool) -> None:
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


class _Step:
    """Turns an OSError of one step of a write into an error that names the file and the operation."""

    def __init__(self, what: str, path: Path):
        self.what, self.path = what, path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, OSError) and not isinstance(e, PatchkitError):
            e.patchkit_step = f"{self.what} {e.filename or self.path}: {e.strerror or e}"
        return False


def _own_files(paths) -> None:
    """Give each weight file about to be rewritten in place an inode of its own. A hard link (from
    `apply -o --link`) or a symlink (a Hub cache snapshot) would otherwise carry the write into
    another checkpoint or into the cache. The copy (a name `fsutil.is_own_temp` knows, removed by the next
    command that takes the lock if this one is killed) has the same bytes, so a crash changes nothing."""
    for path in paths:
        if not (path.is_symlink() or path.stat().st_nlink > 1):
            continue
        with temp_file(path) as tmp, _Step("copying", path):
            shutil.copyfile(path, tmp)  # follows a symlink to the bytes it points at (checked regular)
            shutil.copymode(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            st.crashpoint("own-copy")
            os.replace(tmp, path)


def _check_unchanged(ck: Checkpoint, files: list[Path]) -> None:
    """Each shard about to be written must still be the file whose header the plan's offsets come from."""
    for path in files:
        if not ck.unchanged(path):
            raise CheckpointError(
                f"{path} changed on disk since patchkit read it (another program rewrote it?); nothing was "
                "written: run the command again", path=path)


def _preflight(ck: Checkpoint, files: list[Path], record_bytes: int) -> dict[Path, object]:
    """Open every touched shard for writing (read-only files, file systems and immutable files fail
    here, before any write) and check there is room for the undo record and the journal."""
    handles = {}
    try:
        for path in files:
            with _Step("opening for writing", path):
                handles[path] = open(path, "r+b")
        with _Step("checking free space in", ck.path):
            vfs = os.statvfs(ck.path)
        free = vfs.f_bavail * vfs.f_frsize
        need = record_bytes + (64 << 10)  # + headers, the state file and a margin
        if free < need:
            raise CheckpointError(f"not enough free space in {ck.path} for the undo record and journal "
                                  f"({need} bytes needed, {free} free); nothing was written", path=ck.path)
    except BaseException:
        for f in handles.values():
            f.close()
        raise
    return handles


def _failed(e: OSError | ChangedOnDisk, rolled_back: bool, ck: Checkpoint) -> CheckpointError:
    tail = "the write was rolled back: the checkpoint is as it was" if rolled_back else "nothing was written"
    if isinstance(e, ChangedOnDisk):  # rows (or a record) read again to be written were not as planned
        return CheckpointError(f"{e.message}; {tail}: run the command again", **{"path": ck.path, **e.fields})
    what = getattr(e, "patchkit_step", None) or f"writing {e.filename or ck.path}: {e.strerror or e}"
    return CheckpointError(f"{what}; {tail}", path=e.filename or ck.path)


def write_in_place(plan: Plan, fsync: bool = False) -> None:
    """Rewrite the touched rows inside the checkpoint's own files, under a journal.

    Every shard is checked to be the file the plan was made from and opened for writing first; a
    write that fails is rolled back at once from the journal; a process killed at any point leaves
    a journal that the next command rolls back. With `fsync` every step is also forced to disk in
    order, so that a power cut cannot reorder them.
    """
    ck = plan.overlay.ckpt
    files = sorted({ck.info(n).file for n in plan.overlay.rows})
    _check_unchanged(ck, files)
    try:
        _own_files(files)
    except OSError as e:
        raise _failed(e, False, ck) from None
    # apply keeps the touched rows' bytes in undo records, revert keeps them in the journal: same size
    record_bytes = plan.nbytes + 8 * plan.rows
    try:
        handles = _preflight(ck, files, record_bytes)
    except OSError as e:
        raise _failed(e, False, ck) from None
    committed = False
    try:
        for pid in plan.undo:  # streamed: the rows are read (from the handles) and checked as written
            with _Step("writing the undo record in", ck.state_dir):
                st.write_undo(ck.path, pid, plan.originals(pid, handles), fsync=fsync)
        st.crashpoint("after-undo")
        before = st.load_state(ck.path)
        with _Step("writing the journal in", ck.state_dir):
            if plan.action == "apply":
                jn.write_journal(ck.path, before, undo_ids=list(plan.undo), fsync=fsync)
            else:
                jn.write_journal(ck.path, before, rows=plan.journal_rows(handles), fsync=fsync)
        committed = True
        st.crashpoint("after-journal")
        _write_tensors(plan, handles)
        if fsync:
            map_ordered(_fsync_file, sorted(handles.items()))
        st.crashpoint("after-write")
        with _Step("writing the state in", ck.state_dir):
            st.save_state(ck.path, plan.state_after, fsync=fsync)
        st.crashpoint("after-state")
        with _Step("removing the journal from", ck.state_dir):
            jn.clear_journal(ck.path, fsync=fsync)
    except (OSError, ChangedOnDisk) as e:
        for f in handles.values():
            f.close()
        if committed:
            try:
                jn.recover(ck.path)
            except PatchkitError as r:  # it could not write either: say what is left and how to finish
                raise CheckpointError(f"{_failed(e, False, ck).message.rsplit(';', 1)[0]}; {r}", path=ck.path) from None
        else:
            st.collect_garbage(ck.path)
        raise _failed(e, committed, ck) from None
    finally:
        for f in handles.values():
            f.close()
    st.collect_garbage(ck.path)


def _write_tensors(plan: Plan, handles: dict[Path, object], written: dict[Path, Path] | None = None) -> None:
    """Each tensor's new rows, made (read again from `handles`, by shard, checked, computed) and
    written into its shard's handle: tensors side by side on all cores, each thread holding one
    tensor's rows. `written`: the file each handle writes, where it is not the shard (errors name it)."""
    ck = plan.overlay.ckpt

    def write_tensor(name: str) -> None:
        info = ck.info(name)
        with _Step("writing rows to", (written or {}).get(info.file, info.file)):
            for _, rows, new in plan.chunks([name], handles):
                write_rows(info, rows, new, handles[info.file])
        st.crashpoint("mid-write")

    map_ordered(write_tensor, sorted(plan.overlay.rows, key=lambda n: (ck.info(n).file, n)))


def _fsync_file(item: tuple[Path, object]) -> None:
    path, f = item
    with _Step("writing rows to", path):
        f.flush()
        os.fsync(f.fileno())


def _copy_file(pair: tuple[Path, Path]) -> None:
    with _Step("copying to", pair[1]):
        shutil.copyfile(*pair)
        shutil.copymode(*pair)


def write_output(plan: Plan, output: Path, link: bool, overwrite: bool) -> None:
    try:
        _build_output(plan, output, link, overwrite)
    except ChangedOnDisk as e:
        raise CheckpointError(f"{e.message}; the output {output} was not written: run the command again",
                              **{"path": output, **e.fields}) from None
    except OSError as e:
        what = getattr(e, "patchkit_step", None) or f"writing {e.filename or output}: {e.strerror or e}"
        raise CheckpointError(f"{what}; the output {output} was not written", path=e.filename or output) from None


def _build_output(plan: Plan, output: Path, link: bool, overwrite: bool) -> None:
    ck = plan.overlay.ckpt
    touched = {ck.info(n).file for n in plan.overlay.rows}
    weight_files = {ck.path / f for f in ck.files}
    leftovers = set(shard_temps(ck))
    with staged_folder(output, overwrite=overwrite) as tmp:
        copies = []
        for root, dirs, files in os.walk(ck.path):
            rootp = Path(root)
            dirs[:] = sorted(d for d in dirs if not (rootp == ck.path and d == st.STATE_DIR))
            dest = tmp / rootp.relative_to(ck.path)
            dest.mkdir(exist_ok=True)
            for fname in sorted(files):
                src = rootp / fname
                if src in leftovers:
                    continue  # a killed run's copy of a shard, not part of the checkpoint
                if link and src in weight_files and src not in touched:
                    os.link(src, dest / fname)
                else:
                    copies.append((src, dest / fname))
        # The kernel copies (sendfile), so copies of different files go side by side on all cores;
        # biggest first, so that a small file does not end up alone at the end.
        copies.sort(key=lambda c: -c[0].stat().st_size)
        map_ordered(_copy_file, copies)
        st.crashpoint("output-copied")
        _check_unchanged(ck, sorted(touched))  # the copies are of the files the plan's offsets are for
        copied = {}  # the copies of the touched shards, by the shard they copy: rows are read from them
        try:
            for path in sorted(touched):
                with _Step("opening for writing", tmp / path.relative_to(ck.path)):
                    copied[path] = open(tmp / path.relative_to(ck.path), "r+b")
            # Like `cp`, the new folder is not fsynced, its records neither: it appears whole under its
            # name (a rename), and a killed process loses nothing; only a power cut before the kernel
            # writes it back could (a record cut short then fails its checksum). The undo records come
            # first: they keep the rows of the copies before these are rewritten.
            with _Step("writing the records in", tmp / st.STATE_DIR):
                st.copy_state(ck.path, tmp)
                for pid in plan.undo:
                    st.write_undo(tmp, pid, plan.originals(pid, copied), fsync=False)
            _write_tensors(plan, copied, {path: tmp / path.relative_to(ck.path) for path in copied})
        finally:
            for f in copied.values():
                f.close()
        with _Step("writing the records in", tmp / st.STATE_DIR):
            st.save_state(tmp, plan.state_after, fsync=False)
            st.collect_garbage(tmp)


def shard_temps(ck: Checkpoint) -> list[Path]:
    """Copies of shards that `_own_files` was making when its process was killed (exact names only)."""
    try:
        names = os.listdir(ck.path)
    except OSError:
        return []
    return [ck.path / n for n in names if n.startswith(".") and any(is_own_temp(n, f) for f in ck.files)]
