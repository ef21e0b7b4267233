"""How the apply benchmark measures: each step in a fresh process, timed from outside.

``Runner.measure`` runs a command under ``/usr/bin/time -v`` (or a getrusage wrapper where GNU time
is missing) and returns its wall time and peak RSS; ``warm`` syncs and reads every file a step will
read, so that every run starts from a warm page cache, and ``drop_caches`` does the opposite where
it is allowed. Also here: the byte comparisons after a revert (``identical``, ``identical_files``),
the median of a step's runs (``summarize``), the flock that keeps steps over 3 GB of RSS apart
(``BigMem``), and ``start``, what every benchmark begins with (benchmarks/compute.py uses it too).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_BIN = "/usr/bin/time"


def _gnu_time_ok() -> bool:
    if not os.path.exists(TIME_BIN):
        return False
    try:
        r = subprocess.run([TIME_BIN, "-v", "true"], capture_output=True, text=True, timeout=10)
        return r.returncode == 0 and "Maximum resident set size" in r.stderr
    except (OSError, subprocess.SubprocessError):
        return False


RUSAGE_WRAPPER = r"""
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "maxrss_kb": ru.ru_maxrss}))
sys.exit(rc)
"""


class Runner:
    def __init__(self, workdir: Path, log):
        self.workdir = workdir
        self.log = log
        self.use_time = _gnu_time_ok()
        self.method = f"{TIME_BIN} -v" if self.use_time else "python wrapper, getrusage(RUSAGE_CHILDREN)"

    def measure(self, cmd: list[str], label: str) -> dict:
        """Run `cmd` in a fresh process; wall time (perf_counter around it) and its peak RSS."""
        fd, rfile = tempfile.mkstemp(prefix="rusage.", dir=self.workdir)
        os.close(fd)
        if self.use_time:
            full = [TIME_BIN, "-v", "-o", rfile, *cmd]
        else:
            full = [sys.executable, "-c", RUSAGE_WRAPPER, rfile, *cmd]
        t0 = time.perf_counter()
        r = subprocess.run(full, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        text = Path(rfile).read_text()
        os.unlink(rfile)
        if r.returncode != 0:
            raise RuntimeError(f"{label} failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}\n{text}")
        if self.use_time:
            kb = next(int(line.split(":")[1]) for line in text.splitlines() if "Maximum resident set size" in line)
        else:
            kb = json.loads(text)["maxrss_kb"]
        return {"wall_s": wall, "rss_mb": kb / 1024.0, "stdout": r.stdout.strip()}


def compile_bytecode() -> str:
    """Compile patchkit's modules to bytecode, as installing a wheel does. An editable install run
    with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module from source at every start,
    which is about 15 ms of each short command and not what users of an installed package pay."""
    import compileall

    import patchkit

    pkg = Path(patchkit.__file__).parent
    ok = compileall.compile_dir(str(pkg), quiet=1)
    return f"patchkit modules compiled in {pkg}" if ok else f"compiling {pkg} failed (timings include compiling)"


def warm(*folders: Path) -> None:
    """Flush dirty pages left by earlier steps, then read every file once so all runs start warm."""
    subprocess.run(["sync"], check=False)
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                with open(p, "rb") as f:
                    while f.read(16 << 20):
                        pass


def weight_files(ckpt: Path) -> list[str]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def identical(a: Path, b: Path) -> tuple[bool, list[str]]:
    """cmp every weight file (and the index/config) of a against b; also no .patchkit left in b."""
    return identical_files(a, b, [*weight_files(a), "model.safetensors.index.json"])


def rmtree(p: Path) -> None:
    if p.exists():
        shutil.rmtree(p)


def start(args, runs_name: str):
    """What every benchmark starts with: a log (stderr when --json owns stdout), the work folder, an
    empty folder for this run's outputs, and the `patchkit` command (None, after saying so, if absent)."""
    out_stream = sys.stderr if args.json in (True, "-") else sys.stdout

    def log(msg=""):
        print(msg, file=out_stream, flush=True)

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs = work / runs_name
    rmtree(runs)
    runs.mkdir()
    patchkit_bin = patchkit_command(log)
    return log, work, runs, patchkit_bin


def patchkit_command(log) -> str | None:
    """The `patchkit` command next to this Python, else on PATH; None, after saying so, if absent."""
    bindir = Path(sys.executable).parent
    patchkit_bin = str(bindir / "patchkit") if (bindir / "patchkit").exists() else shutil.which("patchkit")
    if patchkit_bin is None:
        log("error: the `patchkit` command is not on PATH (install patchkit first)")
    return patchkit_bin


BIGMEM_LOCK = Path("/work/bench-tmp/bigmem.lock")  # steps over 3 GB of RSS never overlap another's


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class BigMem:
    """flock on BIGMEM_LOCK around a step that needs more than 3 GB (other benchmarks take it too)."""

    def __enter__(self):
        import fcntl

        BIGMEM_LOCK.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(BIGMEM_LOCK, "a")
        fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False


def identical_files(a: Path, b: Path, files: list[str]) -> tuple[bool, list[str]]:
    """cmp `files` and config.json of a against b; also no .patchkit left in b."""
    diffs = [rel for rel in [*files, "config.json"] if subprocess.run(["cmp", "-s", str(a / rel), str(b / rel)]).returncode]
    if (b / ".patchkit").exists():
        diffs.append(".patchkit/ left behind")
    return not diffs, diffs


def summarize(rs: list[dict]) -> dict:
    out = {"runs": len(rs), "wall_s": statistics.median(r["wall_s"] for r in rs),
           "rss_mb": statistics.median(r["rss_mb"] for r in rs),
           "wall_s_all": [round(r["wall_s"], 3) for r in rs], "rss_mb_all": [round(r["rss_mb"], 1) for r in rs]}
    for key in ("enter_s", "leave_s", "total_s", "load_s", "start_s", "read_s", "sha256_s", "undo_s", "arithmetic_s",
                "write_s", "work_s"):
        if key in rs[0]:
            out[key] = statistics.median(r[key] for r in rs)
    return out
