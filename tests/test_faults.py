"""Fault injection: `patchkit apply` / `revert`, in place and with -o (new output, --overwrite),
SIGKILLed by strace at write-related system calls; the checkpoint must then hold the bytes from
before or after, the output must be absent/old or complete, and no hidden temporary entry may stay.

For each case, one traced run counts how often each system call happens (per thread: strace counts
`when=N` per syscall and per tracee, so the kill points are 1..the busiest thread's count); then the
command is killed at each occurrence N (at most MAX_POINTS of them, spread evenly, per syscall). The
kill comes on entry to the call, so the call itself never happens. The kill runs of one case go two
at a time (two cores), each on its own copy of the checkpoint.

What is checked after each kill:
- in place: the next command (`patchkit status`) exits 0; then the weight files (every .safetensors
  and .json, .patchkit/ records included) are byte-identical to the before or the after state; no
  journal and no stray hidden file is left; and the command then runs through to the after state.
- -o: right after the kill, the output is absent (a new output) or the old folder (--overwrite) or
  the complete new one, byte for byte (the portable scheme may also leave none while the old one is
  aside); the checkpoint is unchanged, and stays so through `patchkit status`; the next run's cleanup
  (`fsutil.remove_leftovers`, as the next `apply -o` begins) leaves the old or new output and no
  hidden entry; and the command run again gives the complete new output.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import build_patch, run_cli_subprocess
from helpers import snapshot, weight_files
from patchkit.core import fsutil, ops

MAX_POINTS = 12 # kill points per (case, syscall); more are sampled evenly from 1..count
WORKERS = 2
SYSCALLS = ["rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir", "mkdir", "link", "linkat", "write",
            "pwrite64", "pwritev", "pwritev2", "sendfile", "copy_file_range", "fsync", "fdatasync"]
STRAY = re.compile(r"^\..*\.(tmp|patchkit-tmp|patchkit-old)$")

# (command, target, extra CLI args, environment); the checkpoint is the sharded bf16 tiny model
# with patch p0 applied in place, and p1 touches both shards ("revert" cases apply p1 first).
CASES = {
    "apply-in-place": ("apply", "in-place", [], {}),
    "apply-in-place-fsync": ("apply", "in-place", ["--fsync"], {}),
    "revert-in-place": ("revert", "in-place", [], {}),
    "apply-output": ("apply", "output", [], {}),
    "revert-output": ("revert", "output", [], {}),
    "apply-output-overwrite": ("apply", "overwrite", [], {}),
    "apply-output-overwrite-portable": ("apply", "overwrite", [], {"PATCHKIT_PORTABLE_RENAME": "1"}),
}

# (case, syscall) -> reason: kill points where the checkpoint code (ops.py/state.py), not fsutil,
# leaves a state outside the contract: such failures make the case xfail (not strict) until fixed.
KNOWN: dict[tuple[str, str], str] = {}


@functools.lru_cache(maxsize=1)
def strace_unusable() -> str | None:
    """Why the fault tests cannot run here, or None."""
    exe = shutil.which("strace")
    if exe is None:
        return "strace is not installed"
    try:
        r = subprocess.run([exe, "-f", "-o", "/dev/null", "true"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"strace does not run: {e}"
    if r.returncode != 0:
        return f"strace cannot trace here (ptrace not permitted?): {r.stderr.strip()[:200]}"
    return None


def env_for(case: str) -> dict:
    # no .pyc written by the traced runs, so that every run makes the same calls
    return {"PYTHONDONTWRITEBYTECODE": "1", "PATCHKIT_PORTABLE_RENAME": "", **CASES[case][3]}


def strays(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        if root.exists():
            for dirpath, dirs, files in os.walk(root):
                found += [os.path.join(dirpath, n) for n in dirs + files if STRAY.match(n)]
    return sorted(found)


class Case:
    """Everything a kill run of one case starts from, and what it may end in."""

    def __init__(self, name: str, root: Path, base: Path):
        self.name = name
        self.cmd, self.target, self.extra, _ = CASES[name]
        self.root = root
        root.mkdir()
        self.ck = root / "ck"
        shutil.copytree(base, self.ck)
        self.p0 = build_patch(self.ck, seed=20, tensors=("model.layers.0.mlp.gate_proj.weight", "lm_head.weight")).save(root / "p0.safetensors")
        ops.apply(self.p0, self.ck, in_place=True)
        self.p1 = build_patch(self.ck, seed=21, rows_per=9).save(root / "p1.safetensors")
        if self.cmd == "revert":
            ops.apply(self.p1, self.ck, in_place=True)
        self.old_out = None
        if self.target == "overwrite":
            self.old_out = root / "old-out"
            shutil.copytree(base, self.old_out)
        # the uninterrupted command, once
        work = self.fresh("reference")
        r = self.run(work)
        assert r.returncode == 0, r.stderr
        self.before_ck = weight_files(self.ck)
        self.after_ck = weight_files(work["ck"])
        self.after_out = snapshot(work["out"]) if self.target != "in-place" else None
        self.old_snap = snapshot(self.old_out) if self.old_out is not None else None
        assert self.before_ck != self.after_ck or self.target != "in-place"

    def fresh(self, tag: str) -> dict:
        w = self.root / f"run-{tag}"
        shutil.copytree(self.ck, w / "ck")
        (w / "outs").mkdir()
        if self.old_out is not None:
            shutil.copytree(self.old_out, w / "outs" / "out")
        return {"dir": w, "ck": w / "ck", "outs": w / "outs", "out": w / "outs" / "out"}

    def args(self, work: dict, overwrite: bool = False) -> list[str]:
        target = ["--in-place"] if self.target == "in-place" else ["-o", str(work["out"])]
        if self.target == "overwrite" or overwrite:
            target.append("--overwrite")
        return [self.cmd, str(self.p1), str(work["ck"]), *target, *self.extra]

    def run(self, work: dict, strace: list[str] | None = None, overwrite: bool = False):
        cmd = (strace or []) + [sys.executable, "-m", "patchkit", *self.args(work, overwrite)]
        env = dict(os.environ)
        env.pop("PATCHKIT_CRASH_AT", None)
        env.update(env_for(self.name))
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    def count(self) -> dict[str, int]:
        """syscall -> calls made by the busiest thread in one uninterrupted run."""
        work = self.fresh("count")
        trace = work["dir"] / "trace"
        r = self.run(work, ["strace", "-f", "-o", str(trace), "-e", "trace=" + ",".join("?" + s for s in SYSCALLS)])
        assert r.returncode == 0, r.stderr
        per_thread = Counter()
        for line in trace.read_text().splitlines():
            m = re.match(r"^(\d+)\s+(\w+)\(", line)
            if m and m.group(2) in SYSCALLS:
                per_thread[(m.group(2), m.group(1))] += 1
        counts: dict[str, int] = {}
        for (name, _tid), n in per_thread.items():
            counts[name] = max(counts.get(name, 0), n)
        shutil.rmtree(work["dir"])
        return counts

    def kill_and_check(self, syscall: str, n: int) -> str | None:
        """Kill at the n-th `syscall`; None when every check holds, else what was found."""
        work = self.fresh(f"{syscall}-{n}")
        try:
            return self._check(work, syscall, n)
        finally:
            shutil.rmtree(work["dir"], ignore_errors=True)

    def _check(self, work: dict, syscall: str, n: int) -> str | None:
        where = f"{self.name}: kill at {syscall} #{n}"
        strace = ["strace", "-f", "-o", "/dev/null", "-e", f"trace={syscall}", "-e", f"inject={syscall}:signal=KILL:when={n}"]
        r = self.run(work, strace)
        if r.returncode not in (-9, 137, 0):  # 0: another thread's count was the larger one
            return f"{where}: exit {r.returncode} ({r.stderr.strip()[-300:]})"
        ck, outs, out = work["ck"], work["outs"], work["out"]
        if self.target == "in-place":
            s = run_cli_subprocess(["status", ck])
            if s.returncode != 0:
                return f"{where}: `patchkit status` then failed: {s.stderr.strip()[-300:]}"
            now = weight_files(ck)
            if now not in (self.before_ck, self.after_ck):
                diff = sorted(k for k in set(now) | set(self.before_ck) | set(self.after_ck)
                              if not (now.get(k) == self.before_ck.get(k) or now.get(k) == self.after_ck.get(k)))
                return f"{where}: checkpoint neither before nor after (differing: {diff}; extra files: {sorted(set(now) - set(self.before_ck) - set(self.after_ck))})"
            left = strays(ck) + ([str(ck / ".patchkit" / "journal.safetensors")] if (ck / ".patchkit" / "journal.safetensors").exists() else [])
            if left:
                return f"{where}: left after `patchkit status` ({'after' if now == self.after_ck else 'before'}): {left}"
            if now == self.before_ck:
                r2 = self.run(work)
                if r2.returncode != 0:
                    return f"{where}: the command run again failed: {r2.stderr.strip()[-300:]}"
            if weight_files(ck) != self.after_ck:
                return f"{where}: the command run again did not reach the after state"
            return None
        # -o: the output right after the kill
        state = snapshot(out) if out.exists() else None
        allowed = [self.after_out] + ([None] if self.target == "output" else [self.old_snap])
        if self.target == "overwrite" and CASES[self.name][3].get("PATCHKIT_PORTABLE_RENAME"):
            allowed.append(None)  # the old one aside, put back by the next run (checked below)
        if state not in allowed:
            return f"{where}: output is neither {'absent' if self.target == 'output' else 'old'} nor complete: {sorted(state or [])}"
        if weight_files(ck) != self.before_ck:
            return f"{where}: the checkpoint changed"
        s = run_cli_subprocess(["status", ck])
        if s.returncode != 0 or weight_files(ck) != self.before_ck:
            return f"{where}: `patchkit status` failed or changed the checkpoint: {s.stderr.strip()[-300:]}"
        fsutil.remove_leftovers(out)  # what the next `apply -o` does first
        state = snapshot(out) if out.exists() else None
        if state not in allowed[:2]:
            return f"{where}: after the next run's cleanup the output is {'absent' if state is None else 'partial'}"
        left = strays(outs, ck)
        if left:
            return f"{where}: left after the next run's cleanup: {left}"
        r2 = self.run(work, overwrite=out.exists())
        if r2.returncode != 0:
            return f"{where}: the command run again failed: {r2.stderr.strip()[-300:]}"
        if snapshot(out) != self.after_out or strays(outs, ck) or weight_files(ck) != self.before_ck:
            return f"{where}: the command run again did not give the complete output, or left {strays(outs, ck)}"
        return None


def points(count: int) -> list[int]:
    if count <= MAX_POINTS:
        return list(range(1, count + 1))
    return sorted({round(1 + i * (count - 1) / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})


@pytest.fixture(scope="module")
def cases(ckpts, tmp_path_factory):
    reason = strace_unusable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("faults")
    made: dict[str, tuple[Case, dict[str, int]]] = {}

    def get(name: str) -> tuple[Case, dict[str, int]]:
        if name not in made:
            c = Case(name, root / name, ckpts[("bf16", True)])
            made[name] = (c, c.count())
        return made[name]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_kill_at_every_write_call(cases, case, record_property):
    """Every (syscall, N) kill point of the case; failures at KNOWN (case, syscall) pairs make the test
    xfail (with what was found) as long as no other pair fails."""
    c, counts = cases(case)
    jobs = [(sc, n) for sc in SYSCALLS for n in points(counts.get(sc, 0))]
    assert jobs, f"{case}: no write-related call traced"
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda job: (job, c.kill_and_check(*job)), jobs))
    record_property("kill_points", {sc: f"{len(points(counts[sc]))} of {counts[sc]}" for sc in sorted(counts)})
    known = [f for (sc, _n), f in results if f and (case, sc) in KNOWN]
    other = [f for (sc, _n), f in results if f and (case, sc) not in KNOWN]
    assert not other, f"{len(other)} of {len(jobs)} kill points failed:\n" + "\n".join(other)
    if known:
        pytest.xfail("; ".join(sorted({KNOWN[(case, sc)] for (sc, _n), f in results if f and (case, sc) in KNOWN}))
                     + f" ({len(known)} kill points):\n" + "\n".join(known))


def test_the_kill_points_are_reached(cases):
    """The injection does kill: at the first rename of an output run (publishing it), nothing is out yet."""
    c, counts = cases("apply-output")
    name = "renameat2" if counts.get("renameat2") else "rename"
    work = c.fresh("probe")
    r = c.run(work, ["strace", "-f", "-o", "/dev/null", "-e", f"trace={name}", "-e", f"inject={name}:signal=KILL:when={counts[name]}"])
    assert r.returncode in (-9, 137), r.returncode
    assert not work["out"].exists()
