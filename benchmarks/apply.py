#!/usr/bin/env python
"""Benchmark: baking a paper-sized patch into a TinyLlama-1.1B-sized checkpoint.

    python benchmarks/apply.py [--workdir DIR] [--keep] [--clean] [--json] [--reps N] [--naive-reps N]

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
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# ---- the model ----------------------------------------------------------------------------------
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
SHARD_BYTES = 1 << 30  # ~1 GB shards -> 3 shards for 2.2 GB
SEED = 0
PATCH_FRACTION = 0.0465
ALPHA = 1.08
TARGET_SPEEDUP = 50.0
TARGET_COPY_RATIO = 1.2
TARGET_RSS_MB = 400.0
GEN_VERSION = 2  # bump to invalidate cached checkpoints


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) in the order LlamaForCausalLM's state dict lists them."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    specs = [("model.embed_tokens.weight", (v, h), "normal")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h), "normal"),
            (p + "self_attn.k_proj.weight", (kv, h), "normal"),
            (p + "self_attn.v_proj.weight", (kv, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, h), "normal"),
            (p + "mlp.gate_proj.weight", (inter, h), "normal"),
            (p + "mlp.up_proj.weight", (inter, h), "normal"),
            (p + "mlp.down_proj.weight", (h, inter), "normal"),
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
        ]
    specs += [("model.norm.weight", (h,), "ones"), ("lm_head.weight", (v, h), "normal")]
    return specs


def gate_names(cfg: dict) -> list[str]:
    return [f"model.layers.{i}.mlp.gate_proj.weight" for i in range(cfg["num_hidden_layers"])]


def _nbytes(shape) -> int:
    return int(np.prod(shape)) * 2  # bf16


def generate_checkpoint(path: Path, log) -> None:
    """Write the random bf16 checkpoint shard by shard: at most one shard's tensors in memory."""
    import torch
    from safetensors.torch import save_file

    specs = tensor_specs(CONFIG)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for spec in specs:
        nb = _nbytes(spec[1])
        if shards[-1] and size + nb > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nb
    n = len(shards)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    gen = torch.Generator().manual_seed(SEED)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape, init in shard:
            if init == "ones":
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        log(f"  wrote {fname} ({(tmp / fname).stat().st_size / 1e9:.2f} GB)")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (tmp / "BENCHMARK_BASE.json").write_text(json.dumps({"gen_version": GEN_VERSION, "seed": SEED, "bytes": total}) + "\n")
    # look like a downloaded checkpoint: mkdtemp makes 0700 and safetensors writes 0600
    os.chmod(tmp, 0o755)
    for p in tmp.iterdir():
        os.chmod(p, 0o644)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def base_is_cached(path: Path) -> bool:
    marker = path / "BENCHMARK_BASE.json"
    try:
        return json.loads(marker.read_text()).get("gen_version") == GEN_VERSION
    except (OSError, ValueError):
        return False


# ---- the patch ------------------------------------------------------------------------------------
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


# ---- measuring ---------------------------------------------------------------------------------------
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
    diffs = []
    for rel in [*weight_files(a), "model.safetensors.index.json", "config.json"]:
        r = subprocess.run(["cmp", "-s", str(a / rel), str(b / rel)])
        if r.returncode != 0:
            diffs.append(rel)
    if (b / ".patchkit").exists():
        diffs.append(".patchkit/ left behind")
    return not diffs, diffs


def compare_gate_tensors(naive_out: Path, pk_out: Path) -> bool:
    """Do the naive result and patchkit's result hold the same gate_proj bytes? (a sanity check)"""
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.stfile import read_tensor

    try:
        a, b = Checkpoint(naive_out), Checkpoint(pk_out)
        for name in gate_names(CONFIG):
            if not np.array_equal(read_tensor(a.info(name)), read_tensor(b.info(name))):
                return False
        return True
    except Exception:
        return False


def rmtree(p: Path) -> None:
    if p.exists():
        shutil.rmtree(p)


def start(args, runs_name: str):
    """What every benchmark starts with: a log (stderr when --json owns stdout), the work folder, an
    empty folder for this run's outputs, and the `patchkit` command (None, after saying so, if absent)."""
    out_stream = sys.stderr if args.json else sys.stdout

    def log(msg=""):
        print(msg, file=out_stream, flush=True)

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs = work / runs_name
    rmtree(runs)
    runs.mkdir()
    bindir = Path(sys.executable).parent
    patchkit_bin = str(bindir / "patchkit") if (bindir / "patchkit").exists() else shutil.which("patchkit")
    if patchkit_bin is None:
        log("error: the `patchkit` command is not on PATH (install patchkit first)")
    return log, work, runs, patchkit_bin


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "patchkit-bench")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (patched copies, patch) after the run")
    ap.add_argument("--clean", action="store_true", help="also delete the cached base checkpoint at the end")
    ap.add_argument("--json", action="store_true", help="print one JSON object with all numbers on stdout")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of (b)-(e); the median is reported")
    ap.add_argument("--naive-reps", type=int, default=3, help="repetitions of (a), about 10 s each; the median is reported")
    ap.add_argument("--skip-naive", action="store_true", help="skip (a) (slow); the speedup target is then not checked")
    args = ap.parse_args(argv)

    log, work, runs, patchkit_bin = start(args, "runs")
    base = work / "base"
    if patchkit_bin is None:
        return 2

    # ---- 1. base checkpoint ---------------------------------------------------------------------
    need = sum(_nbytes(s) for _, s, _ in tensor_specs(CONFIG))
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
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
