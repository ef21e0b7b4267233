#!/usr/bin/env python
"""Benchmark: computing the paper's edit for a TinyLlama-1.1B-sized checkpoint, naive vs patchkit.

    python benchmarks/compute.py [--workdir DIR] [--keep] [--json] [--reps N] [--profile]

1. Reuses the cached random bf16 checkpoint with the TinyLlama-1.1B layout that benchmarks/apply.py
   generates (DIR/base; generated here with the same function when missing).
2. Builds a probe for it: a `patchkit.method.probe.Probe` with a seeded random float32 weight [2, 2048]
   (normal x 0.02, so the direction's norm is close to a base row's), zero bias, and
   model_fingerprint = Checkpoint(base).fingerprint(); written with `save_probe`.
3. Times, each in a fresh subprocess, wall time and peak RSS of
     (a) the naive way (the paper's official code): transformers from_pretrained, cosine of every
         gate_proj row with the direction in a Python loop over layers, global top-K, add
         alpha * direction to those rows, save_pretrained the whole model;
     (b) patchkit compute BASE --probe PROBE -o PATCH --top-k K;
     (c) patchkit apply PATCH BASE -o OUT (for information: what (b) needs to give (a)'s output).
   Every run is warm (sync, then every file of the checkpoint read once right before it).
   (b) is repeated (--reps, default 3) and the median kept; (a) and (c) run once.
4. Verifies that (a) and (b) selected the same set of rows and that (c)'s gate_proj tensors are
   bit-identical to (a)'s (safetensors safe_open, count of differing elements).
5. Times probe feature extraction on the embedded SmolLM2-135M: extract_features against a plain
   batched forward pass, same texts / batch size / truncation, best of 3 each.
6. Prints the tables and the targets: peak RSS (a)/(b) >= 10x, wall (a)/(b) > 1 (patchkit faster),
   extract_features within 10% of the plain forward pass, with PASS/FAIL. Exits 0 even when a
   target fails: it is a report.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# ---- shared with benchmarks/apply.py (the checkpoint layout, its generation, the measuring) ------------
_spec = importlib.util.spec_from_file_location("patchkit_bench_apply", Path(__file__).with_name("apply.py"))
bench_apply = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_apply)
CONFIG = bench_apply.CONFIG
Runner = bench_apply.Runner
warm = bench_apply.warm
rmtree = bench_apply.rmtree
gate_names = bench_apply.gate_names
weight_files = bench_apply.weight_files

SEED = 0
ALPHA = 1.08
FRACTION = 0.0465
TOTAL_ROWS = CONFIG["intermediate_size"] * CONFIG["num_hidden_layers"]  # 22 x 5,632 = 123,904
TOP_K = int(FRACTION * TOTAL_ROWS)  # 5,761 (the same K as benchmarks/apply.py's patch)
TARGET_RSS_RATIO = 10.0
TARGET_WALL_RATIO = 1.0
TARGET_FEATURE_OVERHEAD = 0.10
FEATURE_TEXTS = 128
FEATURE_BATCH = 16
FEATURE_REPS = 3


# ---- the probe ------------------------------------------------------------------------------------------
def build_probe(base: Path, out: Path) -> dict:
    import torch

    from patchkit.core.checkpoint import Checkpoint
    from patchkit.method.probe import Probe, save_probe

    gen = torch.Generator().manual_seed(SEED)
    weight = torch.randn((2, CONFIG["hidden_size"]), generator=gen, dtype=torch.float32) * 0.02
    probe = Probe(weight=weight, bias=torch.zeros(2), label_names=("benign", "behaviour"), train_accuracy=1.0,
                  model_fingerprint=Checkpoint(base).fingerprint())
    save_probe(probe, out)
    return {"path": str(out), "bytes": out.stat().st_size, "direction_norm": float(probe.direction.norm())}


# ---- (a) the naive way ------------------------------------------------------------------------------------
# The shape of the paper's official code: the whole model in memory, a Python loop over the layers.
# Sign convention as patchkit's (and the paper's): the K rows with the *lowest* cosine are edited.
NAIVE = r"""
import json, sys, torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from patchkit.method.probe import load_probe
src, probe_path, out, k, alpha, rows_out = sys.argv[1:7]
k = int(k)
direction = load_probe(probe_path).direction.float()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
layers = model.model.layers
with torch.no_grad():
    cos = []
    for layer in layers:
        w = layer.mlp.gate_proj.weight.float()
        cos.append(F.cosine_similarity(w, direction.unsqueeze(0), dim=1))
    cos = torch.cat(cos)
    top = torch.topk(-cos, k).indices.tolist()
    per = layers[0].mlp.gate_proj.weight.shape[0]
    delta = torch.tensor(float(alpha), dtype=torch.float32) * direction  # float32, rounded once below
    chosen = {}
    for i in top:
        chosen.setdefault(i // per, []).append(i % per)
    for li, rows in sorted(chosen.items()):
        w = layers[li].mlp.gate_proj.weight
        r = torch.tensor(sorted(rows), dtype=torch.long)
        w[r] = (w[r].float() + delta).bfloat16()
model.save_pretrained(out)
with open(rows_out, "w") as f:
    json.dump({f"model.layers.{li}.mlp.gate_proj.weight": sorted(rows) for li, rows in sorted(chosen.items())}, f)
"""


# ---- checks --------------------------------------------------------------------------------------------------
def folder_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def same_rows(naive_rows: Path, patch_path: Path) -> dict:
    """Compare the (tensor, row) sets chosen by (a) and written in (b)'s patch."""
    from patchkit.core.patchfile import Patch

    a = {(n, int(r)) for n, rows in json.loads(naive_rows.read_text()).items() for r in rows}
    patch = Patch.load(patch_path)
    b = {(n, int(r)) for n, e in patch.edits.items() for r in e.rows.tolist()}
    return {"naive_rows": len(a), "patch_rows": len(b), "only_naive": len(a - b), "only_patch": len(b - a),
            "same": a == b}


def _tensor_files(folder: Path) -> dict[str, Path]:
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        return {n: folder / f for n, f in json.loads(idx.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({n: f for n in fh.keys()})
    return out


def compare_gate_bits(naive_out: Path, pk_out: Path, base: Path) -> dict:
    """Element-wise bit comparison of every gate_proj tensor of (a)'s output and (c)'s output."""
    import torch
    from safetensors import safe_open

    fa, fb, f0 = _tensor_files(naive_out), _tensor_files(pk_out), _tensor_files(base)
    diff_elems, diff_tensors, changed_rows, missing = 0, [], 0, []
    for name in gate_names(CONFIG):
        if name not in fa or name not in fb:
            missing.append(name)
            continue
        with safe_open(str(fa[name]), framework="pt") as ha, safe_open(str(fb[name]), framework="pt") as hb:
            ta, tb = ha.get_tensor(name), hb.get_tensor(name)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            diff_tensors.append(name)
            diff_elems += ta.numel()
            continue
        n = int((ta.view(torch.int16) != tb.view(torch.int16)).sum())
        if n:
            diff_tensors.append(name)
            diff_elems += n
        with safe_open(str(f0[name]), framework="pt") as h0:
            t0 = h0.get_tensor(name)
        changed_rows += int((tb.view(torch.int16) != t0.view(torch.int16)).any(dim=1).sum())
    return {"tensors": len(gate_names(CONFIG)), "differing_elements": diff_elems, "differing_tensors": diff_tensors,
            "missing": missing, "rows_changed_vs_base": changed_rows,
            "identical": diff_elems == 0 and not missing and not diff_tensors}


# ---- profile of patchkit compute -------------------------------------------------------------------------------
def profile_compute(base: Path, probe: Path, out: Path, top: int = 18) -> str:
    """cProfile of `patchkit compute` (the console script's entry point), in a fresh process, warm."""
    prof = out.with_suffix(".prof")
    script = out.with_suffix(".run.py")
    script.write_text("import sys\nfrom patchkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n")
    warm(base)
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), str(script), "compute", str(base),
           "--probe", str(probe), "-o", str(out), "--top-k", str(TOP_K), "--overwrite"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if not prof.exists():
        return f"(profile failed: {r.stderr.strip()[-400:]})"
    s = io.StringIO()
    pstats.Stats(str(prof), stream=s).strip_dirs().sort_stats("cumulative").print_stats(top)
    s2 = io.StringIO()
    pstats.Stats(str(prof), stream=s2).strip_dirs().sort_stats("tottime").print_stats(12)
    return "by cumulative time:\n" + _trim(s.getvalue()) + "\nby own time:\n" + _trim(s2.getvalue())


def _trim(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(line for line in lines[start:] if line.strip())


# ---- feature extraction speed ---------------------------------------------------------------------------------
def feature_speed(log) -> dict:
    import torch

    from patchkit.method.activations import DEFAULT_MAX_LENGTH, extract_features
    from patchkit.method.data import builtin_dataset
    from patchkit.method.embedded import load_embedded

    try:  # keep transformers' "Loading weights" bar out of the report
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
    model, tok = load_embedded()
    texts = list(builtin_dataset("toxicity").texts[:FEATURE_TEXTS])
    max_length = DEFAULT_MAX_LENGTH  # extract_features' default; the plain pass truncates the same way
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def plain(order: list[int]) -> None:
        with torch.no_grad():
            for s in range(0, len(order), FEATURE_BATCH):
                batch = [texts[i] for i in order[s : s + FEATURE_BATCH]]
                model.model(**tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

    def patchkit_fx() -> None:
        extract_features(model, tok, texts, batch_size=FEATURE_BATCH, max_length=max_length, progress=False)

    lengths = [len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    given = list(range(len(texts)))
    by_length = sorted(given, key=lambda i: (-lengths[i], i))  # extract_features' own batching order
    runs = {
        "plain": lambda: plain(given),
        "extract": patchkit_fx,
        "plain_sorted": lambda: plain(by_length),
    }
    patchkit_fx()  # warm-up (first-call allocations, lazy imports)
    plain(given)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(FEATURE_REPS):  # interleaved, so background load hits every variant alike
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    tokens = sum(lengths)

    def padded(order: list[int]) -> int:
        chunks = [order[s : s + FEATURE_BATCH] for s in range(0, len(order), FEATURE_BATCH)]
        return sum(max(lengths[i] for i in ch) * len(ch) for ch in chunks)

    padded_given, padded_sorted = padded(given), padded(by_length)
    log(f"  features: {len(texts)} texts, {tokens} tokens (padded: {padded_given} in given order, "
        f"{padded_sorted} length-sorted), batch {FEATURE_BATCH}, max_length {max_length}, torch threads {torch.get_num_threads()}")
    return {"texts": len(texts), "tokens": tokens, "padded_tokens_given": padded_given,
            "padded_tokens_sorted": padded_sorted, "batch_size": FEATURE_BATCH, "max_length": max_length,
            "reps": FEATURE_REPS, "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()}, "best_s": best}


# ---- main ------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "patchkit-bench")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (probe, patch, both patched models)")
    ap.add_argument("--json", action="store_true", help="print one JSON object with all numbers on stdout")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of (b); the median is reported")
    ap.add_argument("--profile", action="store_true", help="always print a cProfile of patchkit compute "
                    "(it is printed anyway when a compute target fails)")
    ap.add_argument("--skip-features", action="store_true", help="skip the feature extraction table")
    args = ap.parse_args(argv)

    # "compute-runs", not apply.py's "runs", so that both benchmarks can share a workdir
    log, work, runs, patchkit_bin = bench_apply.start(args, "compute-runs")
    base = work / "base"
    if patchkit_bin is None:
        return 2

    # ---- 1. base checkpoint -----------------------------------------------------------------------------
    need = sum(bench_apply.nbytes(s) for _, s, _ in bench_apply.tensor_specs(CONFIG))
    du = shutil.disk_usage(work)
    cached = bench_apply.base_is_cached(base)
    room = (0 if cached else need) + 2 * need + (1 << 30)  # base + (a)'s model + (c)'s copy
    log(f"workdir {work}: {du.free / 1e9:.1f} GB free")
    if du.free < room:
        log(f"error: need about {room / 1e9:.1f} GB free in {work}, have {du.free / 1e9:.1f} GB")
        return 2
    gen_s = None
    if cached:
        log(f"base checkpoint: cached at {base}")
    else:
        log(f"base checkpoint: generating {need / 1e9:.2f} GB of random bf16 weights at {base} ...")
        t0 = time.perf_counter()
        bench_apply.generate_checkpoint(base, log)
        gen_s = time.perf_counter() - t0
        log(f"  generated in {gen_s:.1f} s")
    files = weight_files(base)
    ckpt_bytes = sum((base / f).stat().st_size for f in files)

    # ---- 2. probe -------------------------------------------------------------------------------------------
    probe_path = runs / "probe.safetensors"
    pinfo = build_probe(base, probe_path)
    log(f"probe: seeded random weight [2, {CONFIG['hidden_size']}] float32 (direction norm {pinfo['direction_norm']:.3f}), "
        f"bias 0, fingerprint of the base; {pinfo['bytes']:,} bytes")
    log(f"edit: K = {TOP_K:,} of {TOTAL_ROWS:,} gate_proj rows (int({FRACTION} x rows), as benchmarks/apply.py), "
        f"alpha {ALPHA}; patchkit gets --top-k {TOP_K} (its default fraction 16384/352256 would give 5,763)")

    # ---- 3. measurements ------------------------------------------------------------------------------------
    runner = Runner(runs, log)
    log(f"measuring: each operation in a fresh process; peak RSS via {runner.method}; warm page cache "
        f"(sync, then the checkpoint read once before each run); (b) x{args.reps}, median; (a), (c) once")
    naive_out, naive_rows = runs / "naive-out", runs / "naive-rows.json"
    patch_path = runs / "computed.patch.safetensors"
    apply_out = runs / "apply-out"
    results: dict[str, list[dict]] = {"a": [], "b": [], "c": []}

    log("(a) naive: transformers from_pretrained + cosine per layer + top-K + edit + save_pretrained ...")
    warm(base)
    r = runner.measure([sys.executable, "-c", NAIVE, str(base), str(probe_path), str(naive_out), str(TOP_K),
                        repr(ALPHA), str(naive_rows)], "(a)")
    r["out_bytes"] = folder_bytes(naive_out)
    results["a"].append(r)
    log(f"    {r['wall_s']:.2f} s, {r['rss_mb']:.0f} MB")

    for rep in range(args.reps):
        warm(base)
        r = runner.measure([patchkit_bin, "compute", str(base), "--probe", str(probe_path), "-o", str(patch_path),
                            "--top-k", str(TOP_K), "--overwrite"], "(b)")
        r["out_bytes"] = folder_bytes(patch_path)
        results["b"].append(r)
        log(f"(b) patchkit compute, rep {rep + 1}/{args.reps}: {r['wall_s']:.2f} s, {r['rss_mb']:.0f} MB")

    log("(c) patchkit apply PATCH BASE -o OUT (for the bit-identity check; timed for information) ...")
    warm(base)
    r = runner.measure([patchkit_bin, "apply", str(patch_path), str(base), "-o", str(apply_out)], "(c)")
    r["out_bytes"] = folder_bytes(apply_out)
    results["c"].append(r)
    log(f"    {r['wall_s']:.2f} s, {r['rss_mb']:.0f} MB")

    # ---- 4. checks ---------------------------------------------------------------------------------------------
    rows_check = same_rows(naive_rows, patch_path)
    log(f"check rows: (a) chose {rows_check['naive_rows']:,}, (b) {rows_check['patch_rows']:,}; "
        f"only in (a): {rows_check['only_naive']}, only in (b): {rows_check['only_patch']} -> "
        f"{'same set' if rows_check['same'] else 'DIFFERENT SETS'}")
    bits = compare_gate_bits(naive_out, apply_out, base)
    log(f"check bits: {bits['tensors']} gate_proj tensors of (a)'s model vs (c)'s: {bits['differing_elements']:,} "
        f"differing elements -> {'bit-identical' if bits['identical'] else 'DIFFERENT: ' + ', '.join(bits['differing_tensors'][:5])}"
        f"; rows changed vs the base: {bits['rows_changed_vs_base']:,}")
    if not args.keep:
        rmtree(naive_out)
        rmtree(apply_out)

    # ---- 5. feature extraction ---------------------------------------------------------------------------------
    feats = None
    if not args.skip_features:
        log("features: load_embedded() SmolLM2-135M; extract_features vs plain model.model(**tok(...)), "
            f"best of {FEATURE_REPS}, interleaved ...")
        try:
            feats = feature_speed(log)
        except Exception as e:  # a report: note it and go on
            log(f"  features: FAILED to run ({e.__class__.__name__}: {e})")

    # ---- 6. report ----------------------------------------------------------------------------------------------
    labels = {
        "a": "(a) naive: load + cosine loop + top-K + edit + save_pretrained",
        "b": "(b) patchkit compute (writes a patch)",
        "c": "    (info) patchkit apply PATCH BASE -o OUT",
    }
    summary = {}
    for k, rs in results.items():
        summary[k] = {
            "operation": labels[k], "runs": len(rs),
            "wall_s": statistics.median(x["wall_s"] for x in rs), "rss_mb": statistics.median(x["rss_mb"] for x in rs),
            "out_bytes": rs[-1]["out_bytes"],
            "wall_s_all": [round(x["wall_s"], 3) for x in rs], "rss_mb_all": [round(x["rss_mb"], 1) for x in rs],
        }
    a, b, c = summary["a"], summary["b"], summary["c"]
    rss_ratio = a["rss_mb"] / b["rss_mb"]
    wall_ratio = a["wall_s"] / b["wall_s"]
    targets = [
        {"name": "peak RSS (a)/(b)", "value": rss_ratio, "target": f">= {TARGET_RSS_RATIO:g}x", "pass": rss_ratio >= TARGET_RSS_RATIO},
        {"name": "wall time (a)/(b)", "value": wall_ratio, "target": f"> {TARGET_WALL_RATIO:g}x (patchkit faster)",
         "pass": wall_ratio > TARGET_WALL_RATIO},
        {"name": "same rows selected by (a) and (b)", "value": rows_check["same"], "target": "same set", "pass": rows_check["same"]},
        {"name": "(c) gate_proj bit-identical to (a)", "value": bits["identical"], "target": "0 differing elements",
         "pass": bits["identical"]},
    ]
    if feats is not None:
        overhead = feats["best_s"]["extract"] / feats["best_s"]["plain"] - 1
        targets.append({"name": "extract_features vs plain forward", "value": overhead,
                        "target": f"within {TARGET_FEATURE_OVERHEAD:.0%}", "pass": overhead <= TARGET_FEATURE_OVERHEAD})

    def size(n: int) -> str:
        return f"{n / 1e9:.2f} GB" if n >= 1e8 else (f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1024:.1f} KB")

    log()
    log(f"{'operation':<64} {'wall s':>8} {'peak RSS MB':>12} {'output':>10}   runs")
    log("-" * 110)
    for k in "abc":
        s = summary[k]
        runs_txt = ", ".join(f"{w:.2f}" for w in s["wall_s_all"]) if s["runs"] > 1 else ""
        log(f"{s['operation']:<64} {s['wall_s']:>8.2f} {s['rss_mb']:>12.0f} {size(s['out_bytes']):>10}   {runs_txt}")
    log(f"{'    (info) (b) + (c): patchkit to the same patched model':<64} {b['wall_s'] + c['wall_s']:>8.2f} "
        f"{max(b['rss_mb'], c['rss_mb']):>12.0f} {'':>10}   (max RSS)")
    log(f"  checkpoint: {ckpt_bytes / 1e9:.2f} GB in {len(files)} shards; (a)/(b) peak RSS {rss_ratio:.1f}x, "
        f"wall {wall_ratio:.1f}x; (a)/((b)+(c)) wall {a['wall_s'] / (b['wall_s'] + c['wall_s']):.1f}x")

    if feats is not None:
        bs = feats["best_s"]
        log()
        log(f"{'feature extraction (' + str(feats['texts']) + ' texts, batch ' + str(feats['batch_size']) + ')':<64} "
            f"{'best s':>8} {'texts/s':>9} {'vs plain':>9}   runs")
        log("-" * 110)
        flabels = {
            "plain": "plain: model.model(**tok(batch, padding=True, ...)), given order",
            "extract": "patchkit.method.activations.extract_features(...)",
            "plain_sorted": "    (info) plain, batches sorted by length as extract_features",
        }
        for k in ("plain", "extract", "plain_sorted"):
            runs_txt = ", ".join(f"{t:.2f}" for t in feats["times_s"][k])
            log(f"{flabels[k]:<64} {bs[k]:>8.2f} {feats['texts'] / bs[k]:>9.1f} {bs[k] / bs['plain']:>8.2f}x   {runs_txt}")

    log()
    log("targets (this run's own baselines; warm page cache; 2-core VM, other processes may run: timings are noisy):")
    for t in targets:
        v = t["value"]
        if isinstance(v, bool):
            vtxt = "yes" if v else "no"
        elif "features" in t["name"]:
            vtxt = f"{v:+.1%}"
        else:
            vtxt = f"{v:.1f}x"
        log(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['name']:<38} {vtxt:>10}   (target {t['target']})")
    all_pass = all(t["pass"] for t in targets)
    log("  " + ("all targets met" if all_pass else "SOME TARGETS FAILED (see FAIL lines above)"))

    compute_failed = not (targets[0]["pass"] and targets[1]["pass"])
    profile_txt = None
    if args.profile or compute_failed:
        log()
        log("where time goes in `patchkit compute` (cProfile, one warm run):")
        profile_txt = profile_compute(base, probe_path, runs / "profiled.patch.safetensors")
        log(profile_txt)

    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg()},
        "checkpoint": {"path": str(base), "bytes": ckpt_bytes, "shards": len(files), "generated_s": gen_s,
                       "layout": "TinyLlama-1.1B, bf16, random weights"},
        "probe": pinfo,
        "edit": {"k": TOP_K, "total_rows": TOTAL_ROWS, "alpha": ALPHA},
        "method": {"rss": runner.method, "wall": "time.perf_counter around the subprocess",
                   "cache": "warm: sync, then every file of the checkpoint read once before each run", "reps": args.reps},
        "results": summary,
        "rows_check": rows_check,
        "bits_check": bits,
        "features": feats,
        "targets": targets,
        "profile": profile_txt,
        "all_pass": all_pass,
    }
    if not args.keep:
        rmtree(runs)
    else:
        log(f"outputs kept in {runs}")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
