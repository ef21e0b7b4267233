#!/usr/bin/env python
"""Benchmark: baking a paper-sized patch into a TinyLlama-1.1B-sized checkpoint.

    python benchmarks/apply.py [--workdir DIR] [--keep] [--clean] [--json [PATH]] [--reps N] [--naive-reps N]
    python benchmarks/apply.py --sizes 135m,1.1b,7b [--profile] [--json PATH] [--svg PATH]

With --sizes: the scale curve, SmolLM2-135M, TinyLlama-1.1B and LLaMA-2-7B layouts one after the
other, (a)-(e) below plus compute and patched() for each ("The scale curve" in benchmarks/README.md).
Without it:

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
    out_stream = sys.stderr if args.json in (True, "-") else sys.stdout

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


# ==== the scale curve: --sizes 135m,1.1b,7b ===========================================================
# One run builds each layout in turn (its files deleted before the next), measures (a)-(g) on it and
# prints one table per size, then the curve. See benchmarks/README.md.
def _llama(hidden, inter, layers, heads, kv, vocab, tied, max_pos, rope):
    return {**CONFIG, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": max_pos, "rope_theta": rope}


LAYOUTS = {  # name -> (layout, config, K: rows edited; None = int(4.65% of the gate_proj rows))
    "135m": ("SmolLM2-135M", _llama(576, 1536, 30, 9, 3, 49152, True, 8192, 100000.0), None),
    "1.1b": ("TinyLlama-1.1B", CONFIG, None),
    "7b": ("LLaMA-2-7B", _llama(4096, 11008, 32, 32, 32, 32000, False, 4096, 10000.0), 16384),  # of 352,256
}
SAVE_SHARD_BYTES = 5 * 10**9  # save_pretrained's "5GB" shards
CURVE_TARGET_SPEEDUP_7B = 100.0
CURVE_TARGET_RSS_MB = 200.0
CURVE_TARGET_COPY_RATIO = 1.1
CURVE_TARGET_PATCHED_S = 1.0
CURVE_TARGET_START_S = 0.150
BIGMEM_LOCK = Path("/work/bench-tmp/bigmem.lock")  # steps over 3 GB of RSS never overlap another's


def curve_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    specs = tensor_specs(cfg)
    return [s for s in specs if not (cfg["tie_word_embeddings"] and s[0] == "lm_head.weight")]


def random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random finite bf16 values (as uint16 bits): random sign and mantissa, magnitudes 2^-11..2^-7.
    Fast (random bytes and two integer operations), and no two rows alike, so no top-K ties."""
    r = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16).copy()
    r &= np.uint16(0x81FF)
    r |= np.uint16(0x3A00)
    return r


def write_layout(path: Path, cfg: dict, log) -> int:
    """The random bf16 checkpoint, streamed tensor by tensor into shards of at most 5 GB (one file,
    model.safetensors, when it fits in one), as save_pretrained lays them out. One tensor in memory.
    gate_proj tensors are random throughout; the others repeat one random 8 MB block (faster)."""
    specs = curve_specs(cfg)
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nb = _nbytes(spec[1])
        if shards[-1] and size + nb > SAVE_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nb
    n = len(shards)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    rng = np.random.default_rng(SEED)
    block = random_bf16(np.random.default_rng(SEED + 1), 1 << 22)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + _nbytes(shape)]}
            off += _nbytes(shape)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(tmp / fname, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name, shape, init in shard:
                count = int(np.prod(shape))
                if init == "ones":
                    f.write(memoryview(np.full(count, 0x3F80, np.uint16)))
                elif ".mlp.gate_proj." in name:  # the rows scored and edited: all different
                    f.write(memoryview(random_bf16(rng, count)))
                else:  # the rest only has to be there: one random block, written over and over
                    for start in range(0, count, len(block)):
                        f.write(memoryview(block[: min(len(block), count - start)]))
                weight_map[name] = fname
                total += count * 2
        log(f"  wrote {fname} ({(tmp / fname).stat().st_size / 1e9:.2f} GB)")
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    os.chmod(tmp, 0o755)
    rmtree(path)
    os.replace(tmp, path)
    return total


def layout_files(ckpt: Path) -> list[str]:
    idx = ckpt / "model.safetensors.index.json"
    return weight_files(ckpt) if idx.exists() else ["model.safetensors"]


def curve_patch(ckpt: Path, out: Path, cfg: dict, k: int) -> dict:
    """K gate_proj rows (seeded), one shared direction scaled by ALPHA, norm that of a base row."""
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.dtypes import to_float
    from patchkit.core.patchfile import Patch, make_edit

    ck = Checkpoint(ckpt)
    names, per, h = gate_names(cfg), cfg["intermediate_size"], cfg["hidden_size"]
    total_rows = per * len(names)
    rng = np.random.default_rng(SEED)
    chosen = np.sort(rng.choice(total_rows, size=k, replace=False))
    sample = to_float(ck.read_rows(names[0], np.arange(16)), "BF16").reshape(16, h)
    direction = rng.standard_normal(h).astype(np.float32)
    direction *= np.float32(float(np.median(np.linalg.norm(sample, axis=1))) / np.linalg.norm(direction))
    delta_row = (np.float32(ALPHA) * direction).astype(np.float32)
    edits = {}
    for layer, name in enumerate(names):
        rows = (chosen[(chosen >= layer * per) & (chosen < (layer + 1) * per)] - layer * per).astype(np.int64)
        if len(rows):
            info = ck.info(name)
            edits[name] = make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows),
                                    delta=np.broadcast_to(delta_row, (len(rows), h)))
    patch = Patch(edits=edits, provenance={"method": "benchmark"})
    patch.save(out)
    return {"bytes": out.stat().st_size, "rows": int(k), "of_rows": int(total_rows), "tensors": len(edits),
            "encodings": sorted({e.encoding for e in edits.values()}), "id": patch.id}


def curve_probe(ckpt: Path, out: Path, cfg: dict) -> None:
    import torch

    from patchkit.core.checkpoint import Checkpoint
    from patchkit.method.probe import Probe, save_probe

    gen = torch.Generator().manual_seed(SEED)
    weight = torch.randn((2, cfg["hidden_size"]), generator=gen, dtype=torch.float32) * 0.02
    # train_accuracy given: its default, NaN, would end up in the patch's provenance, which Patch.load refuses
    save_probe(Probe(weight=weight, bias=torch.zeros(2), label_names=("benign", "behaviour"), train_accuracy=1.0,
                     model_fingerprint=Checkpoint(ckpt).fingerprint()), out)


NAIVE_COMPUTE = None  # benchmarks/compute.py's NAIVE (the paper's code), loaded on first use


def naive_compute_script() -> str:
    global NAIVE_COMPUTE
    if NAIVE_COMPUTE is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("patchkit_bench_compute", Path(__file__).with_name("compute.py"))
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


def gate_digest(ckpt: Path, cfg: dict) -> str:
    """sha256 over the bytes of every gate_proj tensor (to compare outputs without keeping both)."""
    import hashlib

    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.stfile import read_tensor

    ck, h = Checkpoint(ckpt), hashlib.sha256()
    for name in gate_names(cfg):
        h.update(memoryview(np.ascontiguousarray(read_tensor(ck.info(name)))).cast("B"))
    return h.hexdigest()


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


def startup_times(runner: Runner, patchkit_bin: str, patch: Path, ckpt: Path, reps: int) -> dict:
    """Wall time (median of `reps`) and import time (-X importtime, top-level imports summed) of
    `patchkit --help`, `patchkit inspect PATCH`, `patchkit status DIR`."""
    out = {}
    for label, args in [("--help", ["--help"]), ("inspect", ["inspect", str(patch)]), ("status", ["status", str(ckpt)])]:
        walls = [runner.measure([patchkit_bin, *args], label)["wall_s"] for _ in range(reps)]
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "patchkit", *args], capture_output=True, text=True)
        imp, heavy = 0, []
        for line in r.stderr.splitlines():
            parts = line.split("|")
            if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
                continue
            if not parts[2].startswith("  "):  # a top-level import (its name is not indented)
                imp += int(parts[1])
                heavy.append((int(parts[1]), parts[2].strip()))
        out[label] = {"wall_s": statistics.median(walls), "best_s": min(walls), "wall_s_all": [round(w, 4) for w in walls],
                      "import_s": imp / 1e6, "top_imports": [f"{n} {c / 1000:.1f} ms" for c, n in sorted(heavy)[-5:][::-1]]}
    return out


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


def curve_size(key: str, args, runner: Runner, log, work: Path, patchkit_bin: str, dropped: bool) -> dict:
    layout, cfg, k = LAYOUTS[key]
    total_rows = cfg["intermediate_size"] * cfg["num_hidden_layers"]
    k = k or int(PATCH_FRACTION * total_rows)
    big = key == "7b"
    base, runs = work / f"base-{key}", work / f"runs-{key}"
    rmtree(runs)
    runs.mkdir()
    need = sum(_nbytes(s) for _, s, _ in curve_specs(cfg))
    free = shutil.disk_usage(work).free
    want = 2 * need + (2 << 30)  # the base and one copy of it at a time, and some room
    if free < want:
        raise SystemExit(f"error: {layout} needs about {want / 1e9:.1f} GB free in {work}, there are "
                         f"{free / 1e9:.1f} GB: {(want - free) / 1e9:.1f} GB missing")
    load_before = os.getloadavg()[0]
    log(f"\n==== {layout}: {need / 1e9:.2f} GB bf16, {k:,} of {total_rows:,} gate_proj rows; {free / 1e9:.1f} GB free")
    t0 = time.perf_counter()
    total = write_layout(base, cfg, log)
    gen_s = time.perf_counter() - t0
    files = layout_files(base)
    patch = runs / "p.safetensors"
    pinfo = curve_patch(base, patch, cfg, k)
    log(f"  generated in {gen_s:.1f} s; patch {pinfo['bytes']:,} bytes, {pinfo['tensors']} tensors, {'/'.join(pinfo['encodings'])}")
    reps, naive_reps = args.reps, (1 if big else args.naive_reps)
    res: dict[str, list[dict]] = {}
    notes: list[str] = []

    def run(step, cmd, heavy=False, cache=(base,), cold=False):
        if cold:
            drop_caches()
        else:
            warm(*cache)
        if heavy and big:  # the naive steps need over 3 GB at 7B only (2.5 GB at 1.1B)
            with BigMem():
                r = runner.measure(cmd, step)
        else:
            r = runner.measure(cmd, step)
        res.setdefault(step + ("-cold" if cold else ""), []).append(r)
        return r

    # (a) naive apply
    naive_out = runs / "naive-out"
    for _ in range(naive_reps):
        rmtree(naive_out)
        r = run("a", [sys.executable, "-c", NAIVE, str(base), str(patch), str(naive_out)], heavy=True)
        log(f"  (a) {r['wall_s']:.2f} s {r['rss_mb']:.0f} MB")
    naive_digest = gate_digest(naive_out, cfg)
    rmtree(naive_out)
    # (b) cp -r, (c) apply -o: one untimed copy first (the first big write after deletions is slow)
    dst, out = runs / "cp-out", runs / "apply-out"
    subprocess.run(["cp", "-r", str(base), str(dst)], check=True)
    rmtree(dst)
    for rep in range(reps):
        run("b", ["cp", "-r", str(base), str(dst)])
        rmtree(dst)
        run("c", [patchkit_bin, "apply", str(patch), str(base), "-o", str(out)])
        if rep == 0:
            same = gate_digest(out, cfg) == naive_digest
            notes.append(f"(a) and (c) wrote {'the same' if same else 'DIFFERENT'} gate_proj bytes")
        rmtree(out)
        log(f"  rep {rep + 1}: (b) {res['b'][-1]['wall_s']:.2f} s  (c) {res['c'][-1]['wall_s']:.2f} s {res['c'][-1]['rss_mb']:.0f} MB")
    if big and dropped:  # once each from a cold page cache (before the copy below: two copies at most)
        for step, cmd in [("b", ["cp", "-r", str(base), str(dst)]),
                          ("c", [patchkit_bin, "apply", str(patch), str(base), "-o", str(out)])]:
            run(step, cmd, cold=True)
            rmtree(dst)
            rmtree(out)
    # (d) apply --in-place and (e) revert --in-place, on a copy; byte-compared after every revert
    inplace = runs / "inplace"
    shutil.copytree(base, inplace)
    identical_all = True
    for rep in range(reps):
        run("d", [patchkit_bin, "apply", str(patch), str(inplace), "--in-place"], cache=(inplace,))
        run("e", [patchkit_bin, "revert", str(patch), str(inplace), "--in-place"], cache=(inplace,))
        same, diffs = identical_files(base, inplace, files)
        identical_all &= same
        log(f"  rep {rep + 1}: (d) {res['d'][-1]['wall_s']:.3f} s {res['d'][-1]['rss_mb']:.0f} MB  "
            f"(e) {res['e'][-1]['wall_s']:.3f} s {res['e'][-1]['rss_mb']:.0f} MB  identical after revert: {same}")
    notes.append("after every (e) the copy is byte-identical to the base (cmp, no .patchkit/ left)" if identical_all
                 else "REVERT DID NOT RESTORE THE ORIGINAL BYTES")
    profile = profile_inplace(patchkit_bin, patch, inplace, runs) if args.profile else None
    if big and dropped:  # once each from a cold page cache
        run("d", [patchkit_bin, "apply", str(patch), str(inplace), "--in-place"], cold=True)
        run("e", [patchkit_bin, "revert", str(patch), str(inplace), "--in-place"], cold=True)
    # (g) patched() on a loaded model, against loading the patched checkpoint (the copy, patched)
    subprocess.run([patchkit_bin, "apply", str(patch), str(inplace), "--in-place"], check=True, capture_output=True)
    for _ in range(1 if big else reps):
        r = run("g-live", [sys.executable, "-c", PATCHED_LIVE, str(base), str(patch), "3"], heavy=True)
        r.update(json.loads(r["stdout"].splitlines()[-1]))
        r = run("g-load", [sys.executable, "-c", LOAD_PATCHED, str(inplace)], heavy=True, cache=(inplace,))
        r.update(json.loads(r["stdout"].splitlines()[-1]))
    status_s = runner.measure([patchkit_bin, "status", str(inplace)], "status")["wall_s"]
    rmtree(inplace)
    # (f) compute: the naive way (compute.py's NAIVE) against `patchkit compute`
    probe, naive_rows, pk_patch = runs / "probe.safetensors", runs / "naive-rows.json", runs / "computed.safetensors"
    curve_probe(base, probe, cfg)
    for _ in range(naive_reps):
        rmtree(naive_out)
        run("f-naive", [sys.executable, "-c", naive_compute_script(), str(base), str(probe), str(naive_out), str(k),
                        str(ALPHA), str(naive_rows)], heavy=True)
        log(f"  (f) naive {res['f-naive'][-1]['wall_s']:.2f} s {res['f-naive'][-1]['rss_mb']:.0f} MB")
    rmtree(naive_out)
    for _ in range(reps):
        run("f", [patchkit_bin, "compute", str(base), "--probe", str(probe), "-o", str(pk_patch), "--top-k", str(k),
                  "--alpha", str(ALPHA), "--overwrite"])
    from patchkit.core.patchfile import Patch

    chosen = {(n, int(r)) for n, rows in json.loads(naive_rows.read_text()).items() for r in rows}
    got = {(n, int(r)) for n, e in Patch.load(pk_patch).edits.items() for r in e.rows.tolist()}
    notes.append(f"(f) naive and patchkit compute chose {'the same' if chosen == got else 'DIFFERENT'} {len(got):,} rows")
    rmtree(runs)
    rmtree(base)
    summary = {s: summarize(rs) for s, rs in res.items()}
    return {"size": key, "layout": layout, "bytes": total, "shards": len(files), "generated_s": gen_s, "patch": pinfo,
            "results": summary, "notes": notes, "identical": identical_all, "profile": profile,
            "status_s": status_s, "naive_reps": naive_reps, "reps": reps,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def identical_files(a: Path, b: Path, files: list[str]) -> tuple[bool, list[str]]:
    diffs = [rel for rel in [*files, "config.json"] if subprocess.run(["cmp", "-s", str(a / rel), str(b / rel)]).returncode]
    if (b / ".patchkit").exists():
        diffs.append(".patchkit/ left behind")
    return not diffs, diffs


def summarize(rs: list[dict]) -> dict:
    out = {"runs": len(rs), "wall_s": statistics.median(r["wall_s"] for r in rs),
           "rss_mb": statistics.median(r["rss_mb"] for r in rs),
           "wall_s_all": [round(r["wall_s"], 3) for r in rs], "rss_mb_all": [round(r["rss_mb"], 1) for r in rs]}
    for key in ("enter_s", "leave_s", "total_s", "load_s"):
        if key in rs[0]:
            out[key] = statistics.median(r[key] for r in rs)
    return out


CURVE_ROWS = [  # (key in results, label, time field)
    ("a", "(a) naive: load, edit rows, save_pretrained", "wall_s"),
    ("b", "(b) cp -r", "wall_s"),
    ("c", "(c) patchkit apply -o", "wall_s"),
    ("d", "(d) patchkit apply --in-place", "wall_s"),
    ("e", "(e) patchkit revert --in-place", "wall_s"),
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
    keys = ["a", "b", "c", "d", "e", "f-naive", "f", "g-live"]
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
        log(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['name']:<44} {t['value']:>10}   (target {t['target']})")


def curve_svg(report: dict, path: Path) -> None:
    """The curve as a small log-log SVG: median time of (a)-(e) and (f) against the checkpoint's size."""
    import math

    series = [("a", "naive apply", "#c0392b"), ("f-naive", "naive compute", "#e67e22"), ("b", "cp -r", "#7f8c8d"),
              ("c", "apply -o", "#2980b9"), ("f", "patchkit compute", "#8e44ad"), ("d", "apply --in-place", "#27ae60"),
              ("e", "revert --in-place", "#16a085")]
    sizes = report["sizes"]
    xs = [s["bytes"] / 1e9 for s in sizes]
    ys = [s["results"][k]["wall_s"] for s in sizes for k, _, _ in series if k in s["results"]]
    w, h, left, right, top, bottom = 640, 400, 60, 150, 20, 50
    x0, x1 = math.log10(min(xs) / 1.5), math.log10(max(xs) * 1.5)
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))

    def px(x):
        return left + (math.log10(x) - x0) / (x1 - x0) * (w - left - right)

    def py(y):
        return h - bottom - (math.log10(y) - y0) / (y1 - y0) * (h - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    for e in range(y0, y1 + 1):
        y = py(10.0 ** e)
        out += [f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="#ddd"/>',
                f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{10.0 ** e:g} s</text>']
    for s, x in zip(sizes, xs):
        out += [f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{h - bottom}" stroke="#eee"/>',
                f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{s["layout"]}</text>',
                f'<text x="{px(x):.1f}" y="{h - bottom + 30}" text-anchor="middle">{x:.2f} GB</text>']
    for i, (k, label, color) in enumerate(series):
        pts = [(px(x), py(s["results"][k]["wall_s"])) for s, x in zip(sizes, xs) if k in s["results"]]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts]
        out.append(f'<text x="{w - right + 10}" y="{top + 14 + 16 * i}" fill="{color}">{label}</text>')
    out.append(f'<text x="{left}" y="{h - 8}">median wall time, warm page cache; checkpoint size (log scales)</text></svg>')
    Path(path).write_text("\n".join(out) + "\n")


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
    bindir = Path(sys.executable).parent
    patchkit_bin = str(bindir / "patchkit") if (bindir / "patchkit").exists() else shutil.which("patchkit")
    if patchkit_bin is None:
        log("error: the `patchkit` command is not on PATH (install patchkit first)")
        return 2
    need = max(2 * sum(_nbytes(s) for _, s, _ in curve_specs(LAYOUTS[k][1])) + (2 << 30) for k in keys)
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
    cfg = _llama(64, 128, 2, 4, 2, 256, False, 128, 10000.0)
    write_layout(tiny, cfg, lambda m: None)
    patch = work / "startup.safetensors"
    curve_patch(tiny, patch, cfg, 16)
    subprocess.run([patchkit_bin, "apply", str(patch), str(tiny), "--in-place"], check=True, capture_output=True)
    start = startup_times(runner, patchkit_bin, patch, tiny, reps=7)
    report = {"machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
              "cache": cache, "sizes": sizes, "startup": start}
    report["targets"] = curve_targets(sizes, start)
    report["all_pass"] = all(t["pass"] for t in report["targets"])
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
    args.workdir = args.workdir or Path(tempfile.gettempdir()) / "patchkit-bench"

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
    if args.json == "-":
        print(json.dumps(report, indent=2, default=str))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
