"""The scale curve (--sizes 135m,1.1b,7b): the run, its targets and its tables.

``curve_main`` checks the sizes asked for and the free disk, measures each size in turn
(applylib/steps.py), then the start-up of a few commands on a tiny patched checkpoint; it checks the
targets (``curve_targets``: the 7B speedup and patched() time, peak RSS, (c)/(b), byte-identical
reverts, start-up), prints one table per size and the curve (``print_curve``) and writes --svg and
--json. See "The scale curve" in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from applylib.layouts import LAYOUTS, curve_patch, curve_specs, llama_config, nbytes, write_layout
from applylib.measure import Runner, compile_bytecode, patchkit_command, rmtree
from applylib.plot import curve_svg
from applylib.steps import curve_size, startup_times

CURVE_TARGET_SPEEDUP_7B = 100.0
CURVE_TARGET_RSS_MB = 200.0
CURVE_TARGET_COPY_RATIO = 1.1
CURVE_TARGET_PATCHED_S = 1.0
CURVE_TARGET_START_S = 0.150


CURVE_ROWS = [  # (key in results, label, time field)
    ("a", "(a) naive: load, edit rows, save_pretrained", "wall_s"),
    ("b", "(b) cp -r", "wall_s"),
    ("c", "(c) patchkit apply -o", "wall_s"),
    ("d", "(d) patchkit apply --in-place", "wall_s"),
    ("e", "(e) patchkit revert --in-place", "wall_s"),
    ("floor", "floor of (d): read, hash, keep, write the rows", "wall_s"),
    ("f-naive", "(f) naive compute: load, score all rows, save", "wall_s"),
    ("f", "(f) patchkit compute", "wall_s"),
    ("g-live", "(g) patched(model, patch): enter + leave", "total_s"),
    ("g-load", "(g) from_pretrained of the patched copy", "load_s"),
    ("b-cold", "(b) cp -r, caches dropped", "wall_s"),
    ("c-cold", "(c) apply -o, caches dropped", "wall_s"),
    ("d-cold", "(d) apply --in-place, caches dropped", "wall_s"),
    ("e-cold", "(e) revert --in-place, caches dropped", "wall_s"),
]


def curve_targets(sizes: list[dict], start: dict) -> list[dict]:
    t = []
    for s in sizes:
        r, name = s["results"], s["layout"]
        if s["size"] == "7b":
            v = r["a"]["wall_s"] / r["d"]["wall_s"]
            t.append({"name": f"{name}: (a)/(d) speedup", "value": f"{v:.1f}x", "target": f">= {CURVE_TARGET_SPEEDUP_7B:g}x",
                      "pass": v >= CURVE_TARGET_SPEEDUP_7B})
            if "floor" in r:  # not a target: what the target asks of this machine
                f = r["floor"]["wall_s"]
                t.append({"name": f"{name}: (a)/floor, the most any apply could", "value": f"{r['a']['wall_s'] / f:.1f}x",
                          "target": f">= {CURVE_TARGET_SPEEDUP_7B:g}x", "pass": r["a"]["wall_s"] / f >= CURVE_TARGET_SPEEDUP_7B,
                          "info": True})
                t.append({"name": f"{name}: (d)/floor", "value": f"{r['d']['wall_s'] / f:.2f}", "target": "1 is the floor",
                          "pass": True, "info": True})
            v = r["g-live"]["total_s"]
            t.append({"name": f"{name}: (g) patched() enter + leave", "value": f"{v:.2f} s",
                      "target": f"< {CURVE_TARGET_PATCHED_S:g} s", "pass": v < CURVE_TARGET_PATCHED_S})
        for k in ("c", "d", "e", "f"):
            v = r[k]["rss_mb"]
            t.append({"name": f"{name}: peak RSS ({k})", "value": f"{v:.0f} MB", "target": f"<= {CURVE_TARGET_RSS_MB:g} MB",
                      "pass": v <= CURVE_TARGET_RSS_MB})
        v = r["c"]["wall_s"] / r["b"]["wall_s"]
        t.append({"name": f"{name}: (c)/(b) time", "value": f"{v:.2f}", "target": f"<= {CURVE_TARGET_COPY_RATIO:g}",
                  "pass": v <= CURVE_TARGET_COPY_RATIO})
        if "floor" in r:  # a Python program's start-up alone, against cp -r: the (c)/(b) no Python tool can beat
            v = (r["floor"]["wall_s"] - r["floor"]["work_s"] + r["b"]["wall_s"]) / r["b"]["wall_s"]
            t.append({"name": f"{name}: (python + numpy start-up + cp)/cp", "value": f"{v:.2f}",
                      "target": f"<= {CURVE_TARGET_COPY_RATIO:g}", "pass": v <= CURVE_TARGET_COPY_RATIO, "info": True})
        t.append({"name": f"{name}: (e) restores the bytes", "value": "yes" if s["identical"] else "no",
                  "target": "byte-identical", "pass": s["identical"]})
    for cmd, m in start.items():
        t.append({"name": f"start-up: patchkit {cmd}", "value": f"{m['wall_s'] * 1000:.0f} ms",
                  "target": f"< {CURVE_TARGET_START_S * 1000:.0f} ms", "pass": m["wall_s"] < CURVE_TARGET_START_S})
    return t


def print_curve(report: dict, log) -> None:
    for s in report["sizes"]:
        r = s["results"]
        log(f"\n{s['layout']}: {s['bytes'] / 1e9:.2f} GB in {s['shards']} file(s), {s['patch']['rows']:,} of "
            f"{s['patch']['of_rows']:,} gate_proj rows, patch {s['patch']['bytes'] / 1e6:.2f} MB; "
            f"warm page cache unless marked; (a) and naive (f): {s['naive_reps']} run(s), the others {s['reps']}; "
            f"1-min load average {s['load_average'][0]} before, {s['load_average'][1]} after (2 cores)")
        log(f"  {'operation':<48} {'time s':>8} {'peak RSS MB':>12}   runs (s)")
        for key, label, field in CURVE_ROWS:
            if key in r:
                m = r[key]
                log(f"  {label:<48} {m[field]:>8.3f} {m['rss_mb']:>12.0f}   {', '.join(f'{w:.2f}' for w in m['wall_s_all'])}")
        g = r["g-live"]
        log(f"  (g) in-process times: patched() enter {g['enter_s']:.3f} s, leave {g['leave_s']:.3f} s; "
            f"whole processes (load included): live {g['wall_s']:.1f} s, load patched {r['g-load']['wall_s']:.1f} s")
        if "floor" in r:
            f = r["floor"]
            log(f"  floor of (d), medians: python + numpy start-up {f['start_s']:.3f} s; read {f['read_s']:.3f}, sha256 "
                f"{f['sha256_s']:.3f}, undo written {f['undo_s']:.3f}, arithmetic {f['arithmetic_s']:.3f}, "
                f"rows written {f['write_s']:.3f} (work {f['work_s']:.3f} s); (d)/floor {r['d']['wall_s'] / f['wall_s']:.2f}, "
                f"(a)/floor {r['a']['wall_s'] / f['wall_s']:.1f}x")
        log(f"  ratios: (a)/(d) {r['a']['wall_s'] / r['d']['wall_s']:.1f}x, (a)/(c) {r['a']['wall_s'] / r['c']['wall_s']:.1f}x, "
            f"(c)/(b) {r['c']['wall_s'] / r['b']['wall_s']:.2f}, naive (f)/(f) {r['f-naive']['wall_s'] / r['f']['wall_s']:.1f}x, "
            f"(g) load/patched() {r['g-load']['load_s'] / g['total_s']:.1f}x; status {s['status_s'] * 1000:.0f} ms")
        for n in s["notes"]:
            log(f"  note: {n}")
        if s["profile"]:
            p = s["profile"]
            log(f"  profile of (d) on one thread (cProfile, {p['profiled_s']:.3f} s profiled, {p['wall_s']:.3f} s wall):")
            for label, v in p["split_s"].items():
                log(f"    {label:<48} {v:>7.3f} s  {100 * v / p['profiled_s']:>5.1f} %")
    log("\nthe curve (medians; seconds, peak RSS MB in brackets):")
    keys = [k for k in ("a", "b", "c", "d", "floor", "e", "f-naive", "f", "g-live") if all(k in s["results"] for s in report["sizes"])]
    log(f"  {'layout':<16}" + "".join(f"{k:>15}" for k in keys))
    for s in report["sizes"]:
        r = s["results"]
        cells = [f"{r[k]['total_s' if k == 'g-live' else 'wall_s']:.2f} ({r[k]['rss_mb']:.0f})" for k in keys]
        log(f"  {s['layout']:<16}" + "".join(f"{c:>15}" for c in cells))
    log("\nstart-up (median wall time; import time from python -X importtime, top-level imports summed):")
    for cmd, m in report["startup"].items():
        log(f"  patchkit {cmd:<8} {m['wall_s'] * 1000:>6.0f} ms (best {m['best_s'] * 1000:.0f})   imports {m['import_s'] * 1000:>5.0f} ms   "
            f"largest: {', '.join(m['top_imports'][:3])}")
    log(f"\npage cache: {report['cache']}")
    log("targets:")
    for t in report["targets"]:
        mark = "info" if t.get("info") else ("PASS" if t["pass"] else "FAIL")
        log(f"  {mark:<4}  {t['name']:<44} {t['value']:>10}   ({'for' if t.get('info') else 'target'} {t['target']})")


def curve_main(args) -> int:
    out_stream = sys.stderr if args.json == "-" else sys.stdout

    def log(msg=""):
        print(msg, file=out_stream, flush=True)

    keys = [k.strip().lower() for k in args.sizes.split(",") if k.strip()]
    unknown = [k for k in keys if k not in LAYOUTS]
    if unknown:
        log(f"error: unknown size {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
        return 2
    work = (args.workdir or Path("/work/bench-tmp/apply-curve")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    patchkit_bin = patchkit_command(log)
    if patchkit_bin is None:
        return 2
    need = max(2 * sum(nbytes(s) for _, s, _ in curve_specs(LAYOUTS[k][1])) + (2 << 30) for k in keys)
    free = shutil.disk_usage(work).free
    log(subprocess.run(["df", "-h", str(work)], capture_output=True, text=True).stdout.rstrip())
    if free < need:
        log(f"error: the largest size needs about {need / 1e9:.1f} GB free in {work}; there are {free / 1e9:.1f} GB "
            f"({(need - free) / 1e9:.1f} GB missing)")
        return 2
    runner = Runner(work, log)
    log(f"bytecode: {compile_bytecode()}; peak RSS via {runner.method}; each step in a fresh process")
    dropped = "7b" in keys and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    cache = ("warm: sync, then every file the step reads is read once before it" +
             ("; 7B also once each with caches dropped (echo 3 > /proc/sys/vm/drop_caches)" if dropped else
              "; dropping caches is not permitted here, so no cold runs"))
    sizes = [curve_size(k, args, runner, log, work, patchkit_bin, dropped) for k in keys]
    # start-up, on a tiny patched checkpoint (the 135M layout's first tensors are not needed: any folder)
    tiny = work / "startup"
    rmtree(tiny)
    cfg = llama_config(64, 128, 2, 4, 2, 256, False, 128, 10000.0)
    write_layout(tiny, cfg, lambda m: None)
    patch = work / "startup.safetensors"
    curve_patch(tiny, patch, cfg, 16)
    subprocess.run([patchkit_bin, "apply", str(patch), str(tiny), "--in-place"], check=True, capture_output=True)
    start = startup_times(runner, patchkit_bin, patch, tiny, reps=7)
    report = {"machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
              "cache": cache, "sizes": sizes, "startup": start}
    report["targets"] = curve_targets(sizes, start)
    report["all_pass"] = all(t["pass"] for t in report["targets"] if not t.get("info"))
    print_curve(report, log)
    rmtree(work)
    if args.svg:
        curve_svg(report, args.svg)
        log(f"plot written to {args.svg}")
    if args.json == "-":
        print(json.dumps(report, indent=2, default=str))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"JSON written to {args.json}")
    return 0
