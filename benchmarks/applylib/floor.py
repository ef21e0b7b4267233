"""The floor of an in-place apply: the least work any tool must do to change the touched rows safely.

An in-place apply that can be reverted bit for bit and survives a killed process must, for every
touched row: read it, check it is the base the patch was made for (a hash), keep its old bytes before
changing it (an undo record written in full before the first row), compute the new bytes, and write
them. ``FLOOR`` does exactly that and nothing else, in numpy, on the layout's real rows: it reads the
rows (one preadv per run of consecutive rows), hashes them (sha256, one pass), writes them to an undo
file, computes the new rows (bf16 -> float32, + the edit, rounded to bf16), and writes rows back in
place. Like `patchkit apply` without --fsync it leaves flushing to the kernel (with ``fsync`` as the
third argument it forces the undo file and the shards to disk as --fsync does). It writes the OLD
bytes back, so the checkpoint is unchanged
(the benchmark compares it with the base afterwards). No metadata, no journal, no patch parsing, no
checks: a lower bound, not a design.

``floor_plan`` writes what the child needs (shard paths, offsets, rows, the edit's row) to an .npz in
the parent, untimed; the child imports numpy only. ``(a) / floor`` is then the largest speedup over
the naive way that an apply with these guarantees could show on this machine, at this hour.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FLOOR = r"""
import hashlib, json, os, sys, time
t_start = time.perf_counter()
import numpy as np
plan = np.load(sys.argv[1], allow_pickle=False)
undo_path = sys.argv[2]
sync = len(sys.argv) > 3 and sys.argv[3] == "fsync"
files = [str(f) for f in plan["files"]]
t = {"start_s": time.perf_counter() - t_start}
fds = [os.open(f, os.O_RDWR) for f in files]
rb = int(plan["row_bytes"])
offsets, counts = plan["offsets"], plan["counts"]  # one entry per run of consecutive rows
which = plan["file_of_run"]
total_rows = int(counts.sum())
rows = np.empty((total_rows, rb), dtype=np.uint8)
t0 = time.perf_counter()
pos = 0
for fi, off, n in zip(which, offsets, counts):
    os.preadv(fds[fi], [rows[pos:pos + n]], int(off))
    pos += int(n)
t1 = time.perf_counter()
h = hashlib.sha256(rows).hexdigest()
t2 = time.perf_counter()
fd = os.open(undo_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, rows)
if sync:
    os.fsync(fd)
os.close(fd)
t3 = time.perf_counter()
bits = (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32) + plan["delta"]
u = bits.view(np.uint32)
new = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even (finite values)
t4 = time.perf_counter()
pos = 0
for fi, off, n in zip(which, offsets, counts):
    os.pwritev(fds[fi], [rows[pos:pos + n]], int(off))  # the old bytes: the checkpoint stays as it was
    pos += int(n)
for f in fds:
    if sync:
        os.fsync(f)
    os.close(f)
t5 = time.perf_counter()
os.unlink(undo_path)
t.update({"read_s": t1 - t0, "sha256_s": t2 - t1, "undo_s": t3 - t2, "arithmetic_s": t4 - t3,
          "write_s": t5 - t4, "work_s": t5 - t0, "rows": total_rows, "bytes": total_rows * rb,
          "changed_elements": int((new != rows.view(np.uint16)).sum())})
print(json.dumps(t))
"""


def floor_plan(ckpt: Path, patch_path: Path, out: Path) -> dict:
    """Write the child's plan for `patch_path` on `ckpt` (bf16 rows sharing one edit row) to `out`."""
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.patchfile import Patch
    from patchkit.core.stfile import row_runs

    ck, patch = Checkpoint(ckpt), Patch.load(patch_path)
    files: list[str] = []
    offsets, counts, which, row_bytes, delta = [], [], [], None, None
    for name, e in sorted(patch.edits.items()):
        info = ck.info(name)
        if info.dtype != "BF16":
            raise SystemExit(f"the floor step handles bf16 tensors only; {name} is {info.dtype}")
        if str(info.file) not in files:
            files.append(str(info.file))
        row_bytes = info.row_bytes if row_bytes is None else row_bytes
        if info.row_bytes != row_bytes:
            raise SystemExit("the floor step needs rows of one size")
        if delta is None:
            delta = np.ascontiguousarray(e.deltas()[0], dtype=np.float32)
        for first, count, _ in row_runs(np.asarray(e.rows)):
            offsets.append(info.offset + first * info.row_bytes)
            counts.append(count)
            which.append(files.index(str(info.file)))
    np.savez(out, files=np.array(files), offsets=np.array(offsets, dtype=np.int64), counts=np.array(counts, dtype=np.int64),
             file_of_run=np.array(which, dtype=np.int64), row_bytes=np.int64(row_bytes), delta=delta)
    return {"runs": len(offsets), "rows": int(sum(counts)), "bytes": int(sum(counts)) * int(row_bytes)}


def parse_floor(stdout: str) -> dict:
    return json.loads(stdout.splitlines()[-1])
