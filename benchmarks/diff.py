#!/usr/bin/env python
"""Benchmark: `diff` of a checkpoint edited by a rank-r projection, on the embedded SmolLM2-135M-Instruct.

    python benchmarks/diff.py [--ranks 1,2] [--workdir DIR] [--json PATH] [--keep]

For each rank r:
1. Edits a copy of the embedded model (bf16) with plain torch arithmetic, as an abliteration or a
   ProFS edit published as a whole checkpoint would be: W <- W - U U^T W on `mlp.down_proj` and
   `self_attn.o_proj` of every layer (U: r orthonormal random directions per tensor, seeded),
   computed in float32 from the bf16 weights and rounded once to bf16.
2. `diff BASE EDITED` (the lowrank search, format v1.1/v1.2) and `diff --max-rank 0 --full` (a dense
   patch of the same rows): file sizes, the ratio, the exceptions, the time.
3. `apply` of the lowrank patch to BASE into a new folder, and a byte comparison of every shard with
   EDITED (the target: identical).
Target (issue: rank 1 and 2, down_proj and o_proj of every layer): the lowrank patch at most 2% of
the dense patch. Exits 0 even when a target fails: it is a report.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from patchkit.core import ops
from patchkit.core.diff import diff
from patchkit.method.embedded import embedded_model_path

TARGET = 0.02


def edit(base: Path, dst: Path, rank: int) -> None:
    shutil.copytree(base, dst)
    gen = torch.Generator().manual_seed(rank)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        for name, w in tensors.items():
            if name.endswith(("mlp.down_proj.weight", "self_attn.o_proj.weight")):
                u = torch.linalg.qr(torch.randn(w.shape[0], rank, generator=gen))[0]
                wf = w.float()
                tensors[name] = (wf - u @ (u.T @ wf)).to(w.dtype)
        f.unlink()
        save_file(tensors, f, metadata={"format": "pt"})


def run(rank: int, base: Path, work: Path) -> dict:
    root = work / f"rank{rank}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    edited = root / "edited"
    edit(base, edited, rank)
    t0 = time.perf_counter()
    low = diff(base, edited, root / "low.safetensors")
    t_low = time.perf_counter() - t0
    t0 = time.perf_counter()
    diff(base, edited, root / "dense.safetensors", max_rank=0, full=True)
    t_dense = time.perf_counter() - t0
    ops.apply(str(root / "low.safetensors"), base, root / "applied")
    same = all(filecmp.cmp(f, root / "applied" / f.name, shallow=False) for f in sorted(edited.glob("*.safetensors")))
    low_b, dense_b = (root / "low.safetensors").stat().st_size, (root / "dense.safetensors").stat().st_size
    elements = sum(e.n_rows * e.n_cols for e in low.edits.values())
    exc = sum(e.n_exceptions for e in low.edits.values())
    return {"rank": rank, "tensors": len(low.edits), "encodings": sorted({e.encoding for e in low.edits.values()}),
            "ranks_found": sorted({e.rank for e in low.edits.values() if e.rank is not None}),
            "exceptions": exc, "exception_fraction": exc / elements, "lowrank_bytes": low_b, "dense_bytes": dense_b,
            "ratio": low_b / dense_b, "diff_s": t_low, "dense_diff_s": t_dense, "apply_identical": same,
            "format": low.summary()["format"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--workdir", default="/tmp/patchkit-bench-diff")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = embedded_model_path()
    work = Path(args.workdir)
    rows = [run(int(r), base, work) for r in args.ranks.split(",")]
    print(f"diff of a rank-r projection of down_proj and o_proj in every layer of {base.name} (bf16)\n")
    print("| rank | tensors | found | exceptions | lowrank patch | dense patch | ratio | diff s | apply identical | target <= 2% |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['rank']} | {r['tensors']} | {'/'.join(r['encodings'])} r{','.join(map(str, r['ranks_found']))} "
              f"| {r['exceptions']:,} ({100 * r['exception_fraction']:.2f}%) | {r['lowrank_bytes'] / 1e6:.2f} MB ({r['format']}) "
              f"| {r['dense_bytes'] / 1e6:.1f} MB | {100 * r['ratio']:.2f}% | {r['diff_s']:.0f} | {r['apply_identical']} "
              f"| {'PASS' if r['ratio'] <= TARGET and r['apply_identical'] else 'FAIL'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
