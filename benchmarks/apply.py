#!/usr/bin/env python
"""Benchmark: baking a paper-sized patch into a TinyLlama-1.1B-sized checkpoint.

    python benchmarks/apply.py [--workdir DIR] [--keep] [--clean] [--json [PATH]] [--reps N] [--naive-reps N]
    python benchmarks/apply.py --sizes 135m,1.1b,7b [--profile] [--json PATH] [--svg PATH]
    python benchmarks/apply.py --floor 7b [--reps N] [--json PATH]

With --sizes: the scale curve, SmolLM2-135M, TinyLlama-1.1B and LLaMA-2-7B layouts one after the
other, (a)-(e) below plus compute and patched() for each ("The scale curve" in benchmarks/README.md).
With --floor SIZE: (d), (e) and the floor of (d) (applylib/floor.py) in turn on one layout. Without either:

1. Generates (once, cached in the workdir) a bf16 checkpoint with the TinyLlama-1.1B layout and
   random weights, written shard by shard with safetensors (no torch model is built).
2. Builds a patch: 4.65% of all gate_proj rows (5,761 of 22 x 5,632), one shared direction
   scaled by alpha = 1.08, with patchkit.core.patchfile.make_edit / Patch.save.
3. Times, each in a fresh subprocess, wall time and peak RSS of
     (a) the naive way: transformers from_pretrained, edit rows in memory, save_pretrained (3 times);
     (b) cp -r of the checkpoint;
     (c) patchkit apply PATCH CKPT -o OUT;
     (d) patchkit apply PATCH CKPT --in-place   (on a copy made beforehand, not timed);
     (e) patchkit revert PATCH CKPT --in-place  (on that copy), then cmp against the original;
     (info, once) patchkit diff CKPT (c)-OUTPUT: the size and encoding of the patch that comes back.
   Every measurement runs warm: `sync`, then every file of the checkpoint it reads is read once
   (cat > /dev/null) right before it. The fast ones are repeated (--reps, default 5), median kept.
4. Prints the table and the targets: (a)/(d) >= 50x, (c)/(b) <= 1.2, peak RSS of (c), (d), (e)
   <= 400 MB, with PASS/FAIL. Exits 0 even when a target fails: it is a report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from applylib.curve import curve_main  # noqa: E402
from applylib.floor import floor_main  # noqa: E402
from applylib.layouts import (CONFIG, base_is_cached, gate_names, generate_checkpoint, nbytes,  # noqa: E402
                              tensor_specs)
from applylib.measure import Runner, rmtree, start, warm, weight_files  # noqa: E402
from applylib.plot import curve_svg  # noqa: E402
from applylib.single import run  # noqa: E402

# benchmarks/compute.py loads this file by path and uses these names from it
__all__ = ["CONFIG", "Runner", "base_is_cached", "gate_names", "generate_checkpoint", "main", "nbytes", "rmtree", "start",
           "tensor_specs", "warm", "weight_files"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="default: /tmp/patchkit-bench")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (patched copies, patch) after the run")
    ap.add_argument("--clean", action="store_true", help="also delete the cached base checkpoint at the end")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write one JSON object with all numbers to PATH (stdout without PATH)")
    ap.add_argument("--sizes", help="the scale curve: comma-separated sizes of 135m, 1.1b, 7b, one run each "
                    "(default workdir /work/bench-tmp/apply-curve, removed at the end)")
    ap.add_argument("--profile", action="store_true", help="with --sizes: profile (d) and split its time by step")
    ap.add_argument("--svg", type=Path, help="with --sizes: also draw the curve as an SVG file")
    ap.add_argument("--floor", metavar="SIZE", help="only (d), (e) and the floor of (d), in turn, on one layout (135m, 1.1b or 7b)")
    ap.add_argument("--plot", type=Path, metavar="JSON", help="only draw --svg from the JSON of an earlier --sizes run")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of (b)-(e); the median is reported")
    ap.add_argument("--naive-reps", type=int, default=3, help="repetitions of (a), about 10 s each; the median is reported")
    ap.add_argument("--skip-naive", action="store_true", help="skip (a) (slow); the speedup target is then not checked")
    args = ap.parse_args(argv)
    if args.plot:
        curve_svg(json.loads(args.plot.read_text()), args.svg or args.plot.with_suffix(".svg"))
        return 0
    if args.sizes:
        return curve_main(args)
    if args.floor:
        return floor_main(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
