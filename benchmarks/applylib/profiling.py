"""--profile: where the time of an in-place apply goes.

``profile_inplace`` runs ``patchkit apply --in-place`` once more under cProfile on one thread
(``PATCHKIT_THREADS=1``, so every step shows in the profile), reverts it, and splits the profiled time
into the buckets of ``PROFILE_BUCKETS``: planning, writing, reads, hashes, arithmetic, the undo
record, the journal, row writes, the state file and fsync (which the others also contain).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from applylib.measure import warm

PROFILE_BUCKETS = [  # (label, how its time is found in the profile: cumulative time of these functions)
    ("all of ops.apply (the rest: start-up, imports)", ["ops.py:apply"]),
    ("  planning (plan_apply)", ["plan_apply"]),
    ("  writing (write_in_place)", ["write_in_place"]),
    ("reads (preadv of the rows)", ["read_rows"]),
    ("hashes (sha256 of base rows, records)", ["rows_hash", "_sha256", "sha256_file"]),
    ("arithmetic (new rows, finiteness)", ["new_rows_checked"]),
    ("undo record (serialise, write, fsync)", ["write_undo"]),
    ("journal", ["write_journal", "clear_journal"]),
    ("row writes (pwrite)", ["write_rows"]),
    ("state file", ["save_state"]),
    ("fsync (all, also inside the above)", ["<built-in method posix.fsync>"]),
]


def profile_inplace(patchkit_bin: str, patch: Path, ckpt: Path, work: Path) -> dict:
    """cProfile of `patchkit apply --in-place` on one thread (PATCHKIT_THREADS=1, so every step shows
    in the profile), its time split into the buckets above; then reverted again."""
    import pstats

    prof, script = work / "apply.prof", work / "profile_run.py"
    script.write_text("import sys\nfrom patchkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n")
    env = {**os.environ, "PATCHKIT_THREADS": "1"}
    warm(ckpt)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), str(script), "apply", str(patch), str(ckpt),
                    "--in-place"], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    subprocess.run([patchkit_bin, "revert", str(patch), str(ckpt), "--in-place"], check=True, capture_output=True)
    stats = pstats.Stats(str(prof)).stats
    total = max(v[3] for v in stats.values())
    split = {}
    for label, funcs in PROFILE_BUCKETS:
        split[label] = sum(v[3] for (f, _, fn), v in stats.items()
                           if fn in funcs or any(f.endswith("/" + x.split(":")[0]) and fn == x.split(":")[1]
                                                 for x in funcs if ":" in x))
    return {"wall_s": wall, "profiled_s": total, "split_s": split, "threads": 1}
