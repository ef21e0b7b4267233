"""The floor of an in-place apply: the least work any tool must do to change the touched rows safely.

An in-place apply that can be reverted bit for bit and survives a killed process must, for every
touched row: read it, check it is the base the patch was made for (a hash), keep its old bytes before
changing it (an undo record written in full before the first row), compute the new bytes, and write
them. ``FLOOR`` does each of those once and nothing else, in numpy, on the layout's real rows, a
tensor at a time in reused buffers: it reads the rows (one preadv per run of consecutive rows), hashes
them (sha256), appends them to an undo file, computes the new rows (bf16 -> float32, + the edit,
rounded to bf16) and writes rows back in place. It even skips what makes a real apply safe: the undo
record complete before the first row is written (which costs either memory for every row or a second
read), the journal, the state. Like `patchkit apply` without --fsync it leaves flushing to the kernel (with ``fsync`` as the
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
offsets, counts, which, tensor = plan["offsets"], plan["counts"], plan["file_of_run"], plan["tensor_of_run"]
delta = plan["delta"]
most = max(int(counts[tensor == k].sum()) for k in np.unique(tensor))
buf = np.empty((most, rb), dtype=np.uint8)  # one tensor's rows at a time, buffers reused
wide = np.empty((most, rb // 2), dtype=np.uint32)
low = np.empty((most, rb // 2), dtype=np.uint32)
new = np.empty((most, rb // 2), dtype=np.uint16)
h = hashlib.sha256()
undo = os.open(undo_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
clock = dict.fromkeys(("read_s", "sha256_s", "undo_s", "arithmetic_s", "write_s"), 0.0)
changed = total_rows = 0
t0 = time.perf_counter()
for k in np.unique(tensor):
    runs = np.flatnonzero(tensor == k)
    n = int(counts[runs].sum())
    rows = buf[:n]
    a = time.perf_counter()
    pos = 0
    for i in runs:
        os.preadv(fds[which[i]], [rows[pos:pos + counts[i]]], int(offsets[i]))
        pos += int(counts[i])
    b = time.perf_counter()
    h.update(rows)
    c = time.perf_counter()
    os.write(undo, rows)
    d = time.perf_counter()
    w, lo = wide[:n], low[:n]
    np.left_shift(rows.view(np.uint16), 16, out=w, dtype=np.uint32)  # bf16 bits -> float32 bits
    f = w.view(np.float32)
    np.add(f, delta, out=f)
    np.right_shift(w, 16, out=lo)  # round to nearest even: + 0x7FFF + the lowest kept bit, then >> 16
    np.bitwise_and(lo, 1, out=lo)
    np.add(w, lo, out=w)
    np.add(w, 0x7FFF, out=w)
    np.right_shift(w, 16, out=w)
    np.copyto(new[:n], w, casting="unsafe")
    e = time.perf_counter()
    pos = 0
    for i in runs:
        os.pwritev(fds[which[i]], [rows[pos:pos + counts[i]]], int(offsets[i]))  # the old bytes: nothing changes
        pos += int(counts[i])
    g = time.perf_counter()
    changed += int((new[:n] != rows.view(np.uint16)).sum())
    total_rows += n
    for key, v in zip(clock, (b - a, c - b, d - c, e - d, g - e)):
        clock[key] += v
if sync:
    x = time.perf_counter()
    os.fsync(undo)
    for fd in fds:
        os.fsync(fd)
    clock["write_s"] += time.perf_counter() - x
os.close(undo)
for fd in fds:
    os.close(fd)
t.update(clock)
t.update({"work_s": sum(clock.values()), "rows": total_rows, "bytes": total_rows * rb, "changed_elements": changed,
          "sha256": h.hexdigest()})
print(json.dumps(t))  # the undo file is left for the caller to delete (an apply keeps its undo record)
"""


def floor_plan(ckpt: Path, patch_path: Path, out: Path) -> dict:
    """Write the child's plan for `patch_path` on `ckpt` (bf16 rows sharing one edit row) to `out`."""
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.patchfile import Patch
    from patchkit.core.tensorio import row_runs

    ck, patch = Checkpoint(ckpt), Patch.load(patch_path)
    files: list[str] = []
    offsets, counts, which, tensor, row_bytes, delta = [], [], [], [], None, None
    for k, (name, e) in enumerate(sorted(patch.edits.items())):
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
            tensor.append(k)
    np.savez(out, files=np.array(files), offsets=np.array(offsets, dtype=np.int64), counts=np.array(counts, dtype=np.int64),
             file_of_run=np.array(which, dtype=np.int64), tensor_of_run=np.array(tensor, dtype=np.int64), row_bytes=np.int64(row_bytes), delta=delta)
    return {"runs": len(offsets), "rows": int(sum(counts)), "bytes": int(sum(counts)) * int(row_bytes)}


def parse_floor(stdout: str) -> dict:
    return json.loads(stdout.splitlines()[-1])


FLOOR_KEYS = ("start_s", "read_s", "sha256_s", "undo_s", "arithmetic_s", "write_s", "work_s")


def floor_main(args) -> int:
    """`apply.py --floor SIZE`: (d) apply --in-place, (e) revert --in-place and the floor, in turn
    (--reps times) on one copy of the layout, warm; prints the medians and (d)/floor, and deletes
    the layout. Only the checkpoint itself is on disk (no second copy): about 14 GB at 7B."""
    import shutil
    import statistics
    import sys

    from applylib.layouts import LAYOUTS, PATCH_FRACTION, curve_patch, curve_specs, nbytes, write_layout
    from applylib.measure import Runner, compile_bytecode, patchkit_command, rmtree, warm

    def log(msg=""):
        print(msg, file=sys.stderr, flush=True)

    key = args.floor.strip().lower()
    if key not in LAYOUTS:
        log(f"error: unknown size {args.floor!r}; choose one of {', '.join(LAYOUTS)}")
        return 2
    patchkit_bin = patchkit_command(log)
    if patchkit_bin is None:
        return 2
    work = (args.workdir or Path("/work/bench-tmp/apply-floor")).resolve()
    layout, cfg, k = LAYOUTS[key]
    k = k or int(PATCH_FRACTION * cfg["intermediate_size"] * cfg["num_hidden_layers"])
    need = sum(nbytes(s) for _, s, _ in curve_specs(cfg)) + (1 << 30)
    rmtree(work)
    work.mkdir(parents=True)
    free = shutil.disk_usage(work).free
    if free < need:
        log(f"error: {layout} needs about {need / 1e9:.1f} GB free in {work}, there are {free / 1e9:.1f} GB")
        rmtree(work)
        return 2
    log(compile_bytecode())
    try:
        ckpt, patch, plan = work / "ckpt", work / "p.safetensors", work / "plan.npz"
        write_layout(ckpt, cfg, log)
        curve_patch(ckpt, patch, cfg, k)
        floor_plan(ckpt, patch, plan)
        runner, res = Runner(work, log), {"d": [], "e": [], "floor": []}
        for rep in range(args.reps):
            for step, cmd in (("d", [patchkit_bin, "apply", str(patch), str(ckpt), "--in-place"]),
                              ("e", [patchkit_bin, "revert", str(patch), str(ckpt), "--in-place"]),
                              ("floor", [sys.executable, "-c", FLOOR, str(plan), str(work / "floor.undo")])):
                warm(ckpt)
                r = runner.measure(cmd, step)
                if step == "floor":
                    r.update(parse_floor(r["stdout"]))
                    (work / "floor.undo").unlink()
                res[step].append(r)
            log(f"  rep {rep + 1}: " + ", ".join(f"({s}) {v[-1]['wall_s']:.3f} s" if s != "floor" else f"floor {v[-1]['wall_s']:.3f} s"
                                               for s, v in res.items()))
    finally:
        rmtree(work)
    med = {s: statistics.median(r["wall_s"] for r in v) for s, v in res.items()}
    parts = {x: statistics.median(r[x] for r in res["floor"]) for x in FLOOR_KEYS}
    rss = {s: statistics.median(r["rss_mb"] for r in v) for s, v in res.items()}
    log(f"\n{layout}, {k:,} gate_proj rows, warm, medians of {args.reps} in turn:")
    log(f"  (d) apply --in-place    {med['d']:.3f} s  {rss['d']:.0f} MB")
    log(f"  (e) revert --in-place   {med['e']:.3f} s  {rss['e']:.0f} MB")
    log(f"  floor                   {med['floor']:.3f} s  {rss['floor']:.0f} MB   (" + ", ".join(
        f"{x[:-2]} {v:.3f}" for x, v in parts.items()) + ")")
    log(f"  (d)/floor {med['d'] / med['floor']:.2f}   (e)/floor {med['e'] / med['floor']:.2f}")
    if args.json:
        out = json.dumps({"layout": layout, "rows": k, "reps": args.reps, "median_s": med, "rss_mb": rss, "floor": parts,
                          "runs": {s: [round(r["wall_s"], 4) for r in v] for s, v in res.items()}}, indent=1)
        if args.json == "-":
            print(out)
        else:
            Path(args.json).write_text(out + "\n")
    return 0
