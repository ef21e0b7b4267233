"""The Python programs the apply benchmark runs as measured steps, each in a fresh process.

``NAIVE`` is step (a), the way without patchkit: transformers loads the checkpoint, the patch's rows
are edited in torch and save_pretrained writes it all again. ``PATCHED_LIVE`` and ``LOAD_PATCHED``
are the two sides of step (g), and ``naive_compute_script`` returns the naive compute of step (f),
which lives in benchmarks/compute.py (the paper's code) and is read from there on first use.
"""

from __future__ import annotations

from pathlib import Path


NAIVE = r"""
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
from patchkit.core.patchfile import Patch
src, patch_path, out = sys.argv[1:4]
patch = Patch.load(patch_path)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
params = dict(model.named_parameters())
with torch.no_grad():
    for name, e in patch.edits.items():
        w = params[name]
        rows = torch.from_numpy(e.rows)
        delta = torch.from_numpy(np.ascontiguousarray(e.deltas()))
        w[rows] = (w[rows].float() + delta).bfloat16()
model.save_pretrained(out)
"""

NAIVE_COMPUTE = None  # benchmarks/compute.py's NAIVE (the paper's code), loaded on first use


def naive_compute_script() -> str:
    global NAIVE_COMPUTE
    if NAIVE_COMPUTE is None:
        import importlib.util

        path = Path(__file__).parent.parent / "compute.py"
        spec = importlib.util.spec_from_file_location("patchkit_bench_compute", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        NAIVE_COMPUTE = mod.NAIVE
    return NAIVE_COMPUTE


# (g) patchkit.patched on a model already in memory (apply on entering, revert on leaving), against
# loading a checkpoint that already holds the patch. Each prints one JSON line.
PATCHED_LIVE = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
import patchkit
src, patch_path, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
enter, leave = [], []
for _ in range(reps):
    t0 = time.perf_counter()
    with patchkit.patched(model, patch_path):
        t1 = time.perf_counter()
    enter.append(t1 - t0); leave.append(time.perf_counter() - t1)
print(json.dumps({"enter_s": statistics.median(enter), "leave_s": statistics.median(leave),
                  "total_s": statistics.median(a + b for a, b in zip(enter, leave)), "reps": reps}))
"""
LOAD_PATCHED = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
print(json.dumps({"load_s": time.perf_counter() - t0}))
"""
