"""The rows a plan changes, kept as the steps that make them rather than as bytes, and made again a
tensor at a time when they are written.

A plan records, per tensor, the steps that produce its new rows, in order (a patch's edit, the bytes
of an undo record, the subtraction of a revert without one), each with the sha256 of the rows it
starts from and, where the plan computed it, of the rows it makes. No row bytes are kept. When a
writer needs them (an undo record, the journal, the rows to write), `Overlay` reads the tensor's
rows again, checks them against those hashes (`ChangedOnDisk` if they differ) and runs its steps:
one tensor's rows are in memory at a time (per thread), however many tensors the plan touches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .checkpoint import Checkpoint
from .patchfile import rows_hash
from .records import ChangedOnDisk, Deferred
from .stfile import open_regular


@dataclass
class Step:
    """One change of one tensor's rows: `make(rows before) -> rows after`, both raw uint8 [n, row_bytes]."""

    rows: np.ndarray  # sorted, unique
    before: str  # sha256 of the rows this step starts from
    make: Callable[[np.ndarray], np.ndarray]
    after: str | None = None  # sha256 of the rows it makes, where the plan computed it


class Overlay:
    """The steps a plan has taken so far, per tensor, over the checkpoint's bytes on disk."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.rows: dict[str, np.ndarray] = {}  # every row some step writes, per tensor
        self.steps: dict[str, list[Step]] = {}
        self.disk_sha256: dict[str, str | None] = {}  # of the bytes on disk of self.rows, where known

    def add(self, name: str, step: Step) -> int:
        """Add a step after the tensor's others; returns its index among them."""
        if name not in self.steps:
            self.rows[name], self.steps[name], self.disk_sha256[name] = step.rows, [step], step.before
            return 0
        self.rows[name] = np.union1d(self.rows[name], step.rows)
        self.disk_sha256[name] = None  # the first step's rows no longer cover them all
        self.steps[name].append(step)
        return len(self.steps[name]) - 1

    def read_disk(self, name: str, rows: np.ndarray, files: dict[Path, object] | None = None) -> np.ndarray:
        """The rows' bytes on disk, all runs of rows read through one handle (from `files`, by shard,
        when given: the handles a writer holds open)."""
        info = self.ckpt.info(name)
        f = (files or {}).get(info.file)
        if f is not None:
            return self.ckpt.read_rows(name, rows, f)
        with open_regular(info.file) as fh:
            return self.ckpt.read_rows(name, rows, fh)

    def replay(self, name: str, upto: int | None = None, rows: np.ndarray | None = None,
               files: dict[Path, object] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Read the tensor's rows (those its steps write, and `rows`) and run its steps before `upto`
        (all by default), checking each step's rows before it and, where known, after it.
        Returns (the rows read, their bytes after those steps, the checked bytes step `upto` starts
        from, or None when there is no such step)."""
        steps = self.steps.get(name, [])
        upto = len(steps) if upto is None else upto
        union = self.rows.get(name)
        union = rows if union is None else union if rows is None else np.union1d(union, rows)
        cur = self.read_disk(name, union, files)
        owned = True  # whether `cur` may be written into (not a step's own array, nor read-only)
        for i, step in enumerate(steps[: upto + 1]):
            whole = len(step.rows) == len(union)  # then the step's rows are all the rows read
            pos = None if whole else np.searchsorted(union, step.rows)
            before = cur if whole else cur[pos]
            if rows_hash(before) != step.before:
                raise self.changed(name)
            if i == upto:
                return union, cur, before
            new = np.ascontiguousarray(step.make(before), dtype=np.uint8).reshape(before.shape)
            if step.after is not None and rows_hash(new) != step.after:
                raise ChangedOnDisk(f"the new rows of tensor {name} do not hash to what patchkit planned "
                                    "(their arithmetic gave other bytes this time)", tensor=name)
            if whole:
                cur, owned = new, False
            else:
                if not owned:
                    cur, owned = cur.copy(), True
                cur[pos] = new
        return union, cur, None

    def changed(self, name: str) -> ChangedOnDisk:
        path = self.ckpt.info(name).file
        return ChangedOnDisk(f"{path} changed on disk since patchkit read it: the rows of tensor {name} are "
                             "not the bytes it planned from (another program wrote them?)", path=path, tensor=name)

    def read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The rows as the plan has left them so far (for planning the next step)."""
        union, cur, _ = self.replay(name, rows=rows)
        return cur if len(union) == len(rows) else cur[np.searchsorted(union, rows)]

    # ---- what the writers take ---------------------------------------------------------------------
    def chunks(self, names, files: dict[Path, object] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(name, rows, their new bytes) for each tensor of `names`, one at a time, each checked."""
        for name in names:
            union, new, _ = self.replay(name, files=files)
            yield name, union, new
            del union, new

    def originals(self, steps: dict[str, int], files=None) -> dict[str, tuple[np.ndarray, Deferred]]:
        """name -> (rows, their bytes before step `steps[name]`, made when an undo record is written)."""
        out = {}
        for name, k in steps.items():
            step = self.steps[name][k]
            shape = (len(step.rows), self.ckpt.info(name).row_bytes)
            out[name] = (step.rows, Deferred(shape, step.before, partial(self._before, name, k, files)))
        return out

    def _before(self, name: str, k: int, files) -> np.ndarray:
        return self.replay(name, upto=k, files=files)[2]

    def disk_rows(self, files=None) -> dict[str, tuple[np.ndarray, Deferred]]:
        """name -> (every row the plan writes, their bytes on disk, made when the journal is written)."""
        return {name: (rows, Deferred((len(rows), self.ckpt.info(name).row_bytes), self.disk_sha256[name],
                                      partial(self._disk, name, files)))
                for name, rows in sorted(self.rows.items())}

    def _disk(self, name: str, files) -> np.ndarray:
        return self.replay(name, upto=0, files=files)[1]  # checks the first step's rows
