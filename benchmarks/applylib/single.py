"""The single-size mode of the apply benchmark: a paper-sized patch on a TinyLlama-1.1B checkpoint.

``run`` generates the base checkpoint once (cached in the work folder), builds the patch
(``build_patch``: 4.65 % of the gate_proj rows, one shared direction scaled by alpha), then times in
fresh processes the naive load-edit-save (a), cp -r (b, and b2 with sync), patchkit apply -o (c),
apply --in-place (d) and revert --in-place (e) on a copy, and, once, patchkit diff of the base and
(c)'s output. It prints the table and the targets with PASS/FAIL and returns 0 even when a target
fails (it is a report), 2 when it cannot run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from applylib.layouts import (ALPHA, CONFIG, PATCH_FRACTION, SEED, base_is_cached, gate_names, generate_checkpoint,
                              nbytes, tensor_specs)
from applylib.measure import Runner, compile_bytecode, identical, rmtree, start, warm, weight_files
from applylib.scripts import NAIVE

TARGET_SPEEDUP = 50.0
TARGET_COPY_RATIO = 1.2
TARGET_RSS_MB = 400.0


def build_patch(ckpt: Path, out: Path) -> dict:
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.patchfile import Patch, make_edit

    ck = Checkpoint(ckpt)
    names = gate_names(CONFIG)
    per = CONFIG["intermediate_size"]
    total_rows = per * len(names)
    n_rows = int(PATCH_FRACTION * total_rows)  # 5,761 for TinyLlama
    rng = np.random.default_rng(SEED)
    chosen = np.sort(rng.choice(total_rows, size=n_rows, replace=False))
    row_norm = 0.02 * np.sqrt(CONFIG["hidden_size"])  # expected norm of a base row
    direction = rng.standard_normal(CONFIG["hidden_size"]).astype(np.float32)
    direction *= np.float32(row_norm / np.linalg.norm(direction))
    delta_row = (np.float32(ALPHA) * direction).astype(np.float32)
    edits = {}
    for layer, name in enumerate(names):
        rows = chosen[(chosen >= layer * per) & (chosen < (layer + 1) * per)] - layer * per
        if len(rows) == 0:
            continue
        rows = rows.astype(np.int64)
        info = ck.info(name)
        base_raw = ck.read_rows(name, rows)
        delta = np.broadcast_to(delta_row, (len(rows), CONFIG["hidden_size"]))
        edits[name] = make_edit(name, info.shape, info.dtype, rows, base_raw, delta=delta)
    patch = Patch(edits=edits, provenance={"method": "benchmark"})
    patch.save(out)
    encodings = sorted({e.encoding for e in edits.values()})
    return {
        "path": str(out), "bytes": out.stat().st_size, "rows": int(n_rows), "of_rows": int(total_rows),
        "tensors": len(edits), "encodings": encodings, "id": patch.id,
    }


def compare_gate_tensors(naive_out: Path, pk_out: Path) -> bool:
    """Do the naive result and patchkit's result hold the same gate_proj bytes? (a sanity check)"""
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.tensorio import read_tensor

    try:
        a, b = Checkpoint(naive_out), Checkpoint(pk_out)
        for name in gate_names(CONFIG):
            if not np.array_equal(read_tensor(a.info(name)), read_tensor(b.info(name))):
                return False
        return True
    except Exception:
        return False


def run(args) -> int:
    """The single-size run (no --sizes): measure, print the report, write --json."""
    args.workdir = args.workdir or Path(tempfile.gettempdir()) / "patchkit-bench"

    log, work, runs, patchkit_bin = start(args, "runs")
    base = work / "base"
    if patchkit_bin is None:
        return 2

    # ---- 1. base checkpoint ---------------------------------------------------------------------
    need = sum(nbytes(s) for _, s, _ in tensor_specs(CONFIG))
    du = shutil.disk_usage(work)
    log(f"workdir {work}: {du.free / 1e9:.1f} GB free (df -h:)")
    log(subprocess.run(["df", "-h", str(work)], capture_output=True, text=True).stdout.rstrip())
    # base + (a) output + (c) output + the in-place copy + (b) copy, with some room to spare
    room = (0 if base_is_cached(base) else need) + 4 * need + (1 << 30)
    if du.free < room:
        log(f"error: need about {room / 1e9:.1f} GB free in {work}, have {du.free / 1e9:.1f} GB")
        return 2
    if base_is_cached(base):
        log(f"base checkpoint: cached at {base}")
        gen_s = None
    else:
        log(f"base checkpoint: generating {need / 1e9:.2f} GB of random bf16 weights at {base} ...")
        t0 = time.perf_counter()
        generate_checkpoint(base, log)
        gen_s = time.perf_counter() - t0
        log(f"  generated in {gen_s:.1f} s")
    files = weight_files(base)
    ckpt_bytes = sum((base / f).stat().st_size for f in files)

    # ---- 2. patch ----------------------------------------------------------------------------------
    patch_path = runs / "benchmark.patch.safetensors"
    t0 = time.perf_counter()
    pinfo = build_patch(base, patch_path)
    pinfo["build_s"] = time.perf_counter() - t0
    log(f"patch: {pinfo['rows']} of {pinfo['of_rows']} gate_proj rows ({100 * pinfo['rows'] / pinfo['of_rows']:.2f}%) "
        f"in {pinfo['tensors']} tensors, encoding {'/'.join(pinfo['encodings'])}, alpha {ALPHA}: "
        f"{pinfo['bytes']:,} bytes ({pinfo['bytes'] / 1024:.1f} KB) = {pinfo['bytes'] / ckpt_bytes * 100:.4f}% "
        f"of the {ckpt_bytes / 1e9:.2f} GB checkpoint (built in {pinfo['build_s']:.1f} s)")

    # ---- 3. measurements ------------------------------------------------------------------------------
    runner = Runner(runs, log)
    compiled = compile_bytecode()
    log(f"bytecode: {compiled}")
    log(f"measuring: each operation in a fresh process; peak RSS via {runner.method}; "
        f"all runs warm (sync, then the checkpoint read once with cat-equivalent before each run); "
        f"{args.reps} reps of (b)-(e), {args.naive_reps} of (a), medians reported")
    results: dict[str, list[dict]] = {k: [] for k in ["a", "b", "b2", "c", "d", "e", "f"]}
    notes: list[str] = []

    naive_out = runs / "naive-out"
    if not args.skip_naive:
        log("(a) naive: transformers from_pretrained + edit rows + save_pretrained ...")
        for _ in range(args.naive_reps):  # it varies by 30% from run to run here: a median, like (b)-(e)
            rmtree(naive_out)
            warm(base)
            r = runner.measure([sys.executable, "-c", NAIVE, str(base), str(patch_path), str(naive_out)], "(a)")
            results["a"].append(r)
            log(f"    {r['wall_s']:.2f} s, {r['rss_mb']:.0f} MB")

    inplace = runs / "inplace"
    log("    copying the checkpoint for (d)/(e) (not timed) ...")
    shutil.copytree(base, inplace)
    # One untimed round first: the first big write after large deletions is much slower on some
    # filesystems / VMs (seen: cp -r 2.2 s, then 0.8 s), which would skew whichever op runs first.
    dst = runs / "cp-out"
    warm(base)
    subprocess.run(["cp", "-r", str(base), str(dst)], check=True)
    rmtree(dst)
    for rep in range(args.reps):
        # (b) cp -r
        warm(base)
        r = runner.measure(["cp", "-r", str(base), str(dst)], "(b)")
        results["b"].append(r)
        rmtree(dst)
        # (b2) cp -r then sync: for information, a copy made as durable as patchkit's output (it fsyncs)
        warm(base)
        r = runner.measure(["sh", "-c", 'cp -r "$0" "$1" && sync', str(base), str(dst)], "(b2)")
        results["b2"].append(r)
        rmtree(dst)
        # (c) patchkit apply -o
        out = runs / "apply-out"
        warm(base)
        r = runner.measure([patchkit_bin, "apply", str(patch_path), str(base), "-o", str(out)], "(c)")
        results["c"].append(r)
        if rep == 0 and naive_out.exists():
            same = compare_gate_tensors(naive_out, out)
            notes.append(f"(a) and (c) wrote {'the same' if same else 'DIFFERENT'} gate_proj bytes")
            log(f"    check: {notes[-1]}")
            if not args.keep:
                rmtree(naive_out)
        if rep == 0:
            changed = [f for f in files if subprocess.run(["cmp", "-s", str(base / f), str(out / f)]).returncode != 0]
            notes.append(f"(c) output differs from the base in {len(changed)} of {len(files)} shards (the ones holding gate_proj)")
            # (info) diff the base against (c)'s output: the patch should come back, as small as it went in
            diffed = runs / "diffed.patch.safetensors"
            warm(base, out)
            r = runner.measure([patchkit_bin, "diff", str(base), str(out), "-o", str(diffed)], "(f)")
            results["f"].append(r)
            from patchkit.core.patchfile import Patch

            back = Patch.load(diffed)
            encodings = sorted({e.encoding for e in back.edits.values()})
            notes.append(f"(f) diff of base and (c)'s output: {back.rows} rows, {'/'.join(encodings)}, "
                         f"{diffed.stat().st_size:,} bytes (the patch applied: {pinfo['bytes']:,} bytes)")
            log(f"    {notes[-1]}")
        if rep < args.reps - 1 or not args.keep:
            rmtree(out)
        # (d) patchkit apply --in-place, on the copy
        warm(inplace)
        r = runner.measure([patchkit_bin, "apply", str(patch_path), str(inplace), "--in-place"], "(d)")
        results["d"].append(r)
        # (e) patchkit revert --in-place, then byte-compare with the base
        warm(inplace)
        r = runner.measure([patchkit_bin, "revert", str(patch_path), str(inplace), "--in-place"], "(e)")
        results["e"].append(r)
        same, diffs = identical(base, inplace)
        r["identical"] = same
        log(f"  rep {rep + 1}/{args.reps}: (b) {results['b'][-1]['wall_s']:.2f} s  (b2) {results['b2'][-1]['wall_s']:.2f} s  (c) {results['c'][-1]['wall_s']:.2f} s  "
            f"(d) {results['d'][-1]['wall_s']:.2f} s  (e) {results['e'][-1]['wall_s']:.2f} s  "
            f"revert byte-identical: {'yes' if same else 'NO: ' + ', '.join(diffs)}")
        if not same:
            shutil.rmtree(inplace)  # start the next rep from a clean copy
            shutil.copytree(base, inplace)
    if not args.keep:
        rmtree(inplace)
    all_identical = all(r["identical"] for r in results["e"])
    notes.append(
        "after every (e) revert the copy is byte-identical to the original (cmp of all weight files, no .patchkit/ left)"
        if all_identical else "REVERT DID NOT RESTORE THE ORIGINAL BYTES in at least one rep"
    )

    # ---- 4. report -----------------------------------------------------------------------------------
    labels = {
        "a": "(a) naive: transformers load + edit + save_pretrained",
        "b": "(b) cp -r checkpoint",
        "b2": "    (info) cp -r checkpoint && sync",
        "c": "(c) patchkit apply -o OUT",
        "d": "(d) patchkit apply --in-place",
        "e": "(e) patchkit revert --in-place",
        "f": "    (info) patchkit diff BASE (c)-OUTPUT",
    }
    summary = {}
    for k, rs in results.items():
        if not rs:
            continue
        summary[k] = {
            "operation": labels[k],
            "runs": len(rs),
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "rss_mb": statistics.median(r["rss_mb"] for r in rs),
            "wall_s_all": [round(r["wall_s"], 4) for r in rs],
            "rss_mb_all": [round(r["rss_mb"], 1) for r in rs],
        }
    targets = []
    if "a" in summary:
        speed = summary["a"]["wall_s"] / summary["d"]["wall_s"]
        targets.append({"name": "(a)/(d) speedup", "value": speed, "target": f">= {TARGET_SPEEDUP:g}x",
                        "pass": speed >= TARGET_SPEEDUP})
    ratio = summary["c"]["wall_s"] / summary["b"]["wall_s"]
    targets.append({"name": "(c)/(b) time ratio", "value": ratio, "target": f"<= {TARGET_COPY_RATIO:g}",
                    "pass": ratio <= TARGET_COPY_RATIO})
    for k in "cde":
        v = summary[k]["rss_mb"]
        targets.append({"name": f"peak RSS ({k})", "value": v, "target": f"<= {TARGET_RSS_MB:g} MB",
                        "pass": v <= TARGET_RSS_MB})
    targets.append({"name": "(e) restores the original bytes", "value": all_identical, "target": "byte-identical",
                    "pass": all_identical})

    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "checkpoint": {"path": str(base), "bytes": ckpt_bytes, "shards": len(files), "generated_s": gen_s,
                       "layout": "TinyLlama-1.1B, bf16, random weights"},
        "patch": pinfo,
        "method": {"rss": runner.method, "wall": "time.perf_counter around the subprocess",
                   "cache": "warm: sync, then every file of the checkpoint read once before each run",
                   "reps": args.reps, "bytecode": compiled},
        "results": summary,
        "targets": targets,
        "notes": notes,
        "all_pass": all(t["pass"] for t in targets),
    }

    log()
    log(f"{'operation':<56} {'wall s':>9} {'peak RSS MB':>12}   runs")
    log("-" * 90)
    for k in ["a", "b", "b2", "c", "d", "e", "f"]:
        if k not in summary:
            continue
        s = summary[k]
        runs_txt = ", ".join(f"{w:.2f}" for w in s["wall_s_all"]) if s["runs"] > 1 else ""
        log(f"{s['operation']:<56} {s['wall_s']:>9.2f} {s['rss_mb']:>12.0f}   {runs_txt}")
    log()
    log("targets (ratios from this run's own baselines, medians, warm page cache):")
    for t in targets:
        v = t["value"]
        vtxt = f"{v:.1f}x" if "speedup" in t["name"] else (f"{v:.2f}" if "ratio" in t["name"] else
                                                           (f"{v:.0f} MB" if "RSS" in t["name"] else ("yes" if v else "no")))
        log(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['name']:<34} {vtxt:>10}   (target {t['target']})")
    for n in notes:
        log(f"  note: {n}")
    log("  " + ("all targets met" if report["all_pass"] else "SOME TARGETS FAILED (see FAIL lines above)"))

    if not args.keep:
        rmtree(runs)
    else:
        log(f"outputs kept in {runs}")
    if args.clean:
        rmtree(base)
        log(f"removed the cached base {base}")
    if args.json == "-":
        print(json.dumps(report, indent=2, default=str))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0
