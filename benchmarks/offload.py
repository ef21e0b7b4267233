#!/usr/bin/env python
"""Benchmark: probe features of a 7B model in 4 GiB of memory (accelerate's big-model inference).

    python benchmarks/offload.py [--workdir DIR] [--max-memory 4GiB] [--texts 32] [--keep] [--json]

1. Writes a random checkpoint with the LLaMA-2-7B layout (32 layers, hidden 4096, intermediate
   11008, 32 heads, vocab 32000, untied embeddings, bf16: 13.5 GB) to DIR (default
   /work/bench-tmp/offload7b), in safetensors shards of at most 5 GB, streamed tensor by tensor
   (the writer holds one 32 MB block of random bf16 values, normal x 0.02, taken at random offsets;
   norms are ones), with config.json, model.safetensors.index.json and a word-level tokenizer (its
   vocabulary fits in 32000). No torch model is built. Free disk is checked first.
2. In a fresh process: `patchkit.method.pipeline.load_model(DIR, bfloat16, device_map="auto",
   max_memory=4GiB)` (what `probe --device-map auto --max-memory 4GiB` does), then
   `extract_features` of 32 short texts (final normed hidden state, mean pool, one batch), with one
   thread. Wall time of the process and of each step; peak RSS from wait4 (the child's ru_maxrss);
   where accelerate put the weights.
   With --cli, a second fresh process runs the command itself, `patchkit probe DIR --data TEXTS
   --max-memory 4GiB --batch-size 32 --no-cache` (32 labelled texts; placed by accelerate, the
   model keeps the checkpoint's bf16), and is measured the same way.
3. Prints the table and the target (peak RSS < 6 GB), then deletes DIR (unless --keep).

The measured step needs more than 3 GB of memory: it runs under an exclusive flock on
/work/bench-tmp/bigmem.lock (--lock), so it never overlaps another large benchmark on this machine.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LAYOUT = dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
SHARD_BYTES = 5 * 10**9
BLOCK = 1 << 24  # random bf16 values in the writer's block (32 MB)
WORDS = ("the a of to and in is was for on that with as by at from it this be are or they we you good bad kind "
         "cruel people group love hate help hurt friend enemy nice awful calm angry happy sad city river music food "
         "book dog cat day night water fire stone tree house road car red blue green").split()


def tensors(lay: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = lay["hidden"], lay["intermediate"], lay["vocab"]
    kv = h * lay["kv_heads"] // lay["heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(lay["layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_shard(path: Path, items: list[tuple[str, tuple[int, ...]]], block: np.ndarray, rng) -> None:
    """One safetensors file, streamed: the header, then each tensor's bytes block by block."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        ones = np.full(LAYOUT["hidden"], 0x3F80, dtype=np.uint16)  # bf16 1.0
        for name, shape in items:
            n = int(np.prod(shape))
            if len(shape) == 1:
                f.write(ones[:n].tobytes())
                continue
            while n:
                k = min(n, BLOCK)
                start = int(rng.integers(0, BLOCK))
                f.write(memoryview(block[start : start + k]))
                n -= k
    os.replace(tmp, path)


def build(folder: Path, seed: int = 0) -> float:
    """The checkpoint, tokenizer and config in `folder`; returns its size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(BLOCK, dtype=np.float32) * 0.02).view(np.uint32)
    half = ((values + 0x7FFF + ((values >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    block = np.concatenate([half, half])
    shards, current, size = [], [], 0
    for name, shape in tensors(LAYOUT):
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, items in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / fname, items, block, rng)
        for name, shape in items:
            weight_map[name] = fname
            total += int(np.prod(shape)) * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": LAYOUT["hidden"],
              "intermediate_size": LAYOUT["intermediate"], "num_hidden_layers": LAYOUT["layers"],
              "num_attention_heads": LAYOUT["heads"], "num_key_value_heads": LAYOUT["kv_heads"], "vocab_size": LAYOUT["vocab"],
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder)
    return total


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def texts(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))) for _ in range(n)]


def worker(folder: str, max_memory: str, n: int, out: str) -> None:
    """The measured process: load with accelerate's big-model inference, then features."""
    import torch

    torch.set_num_threads(1)
    from patchkit.method.activations import extract_features
    from patchkit.method.pipeline import load_model

    t0 = time.perf_counter()
    model, tok = load_model(Path(folder), torch.bfloat16, device_map="auto", max_memory=max_memory)
    t1 = time.perf_counter()
    feats = extract_features(model, tok, texts(n), batch_size=n, progress=False)
    t2 = time.perf_counter()
    placed: dict[str, int] = {}
    for name, p in model.named_parameters():
        where = "disk" if p.device.type == "meta" else str(p.device)
        placed[where] = placed.get(where, 0) + p.numel() * p.element_size()
    Path(out).write_text(json.dumps({"load_s": t1 - t0, "features_s": t2 - t1, "shape": list(feats.shape),
                                     "finite": bool(torch.isfinite(feats).all()), "placed_bytes": placed}))


def run_measured(args, cmd: list[str]) -> tuple[float, int, dict]:
    """(wall seconds, peak RSS bytes, peaks of /proc's RssAnon and RssFile in bytes) of `cmd` in a
    fresh process, under the big-memory lock. RssFile is pages of files mapped by the process (the
    checkpoint's, through safetensors): clean page cache the kernel can drop, but counted in RSS."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    Path(args.lock).parent.mkdir(parents=True, exist_ok=True)
    with open(args.lock, "a") as lock:
        print(f"waiting for {args.lock} ...", file=sys.stderr)
        fcntl.flock(lock, fcntl.LOCK_EX)  # the same lock as flock(1): never two large runs at once
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)  # one JSON object on stdout: ours
        peaks = {"RssAnon": 0, "RssFile": 0}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the measured run failed (exit {proc.returncode}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024, peaks


def measure(args, scratch: Path) -> dict:
    result = scratch / "offload-result.json"
    wall, rss, peaks = run_measured(args, [sys.executable, __file__, "--worker", str(args.workdir), args.max_memory, str(args.texts), str(result)])
    r = dict(json.loads(result.read_text()), wall_s=wall, peak_rss_bytes=rss, peak_rss_parts=peaks)
    if args.cli:
        data = scratch / "offload-texts.jsonl"
        data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts(args.texts))))
        wall, rss, peaks = run_measured(args, [sys.executable, "-m", "patchkit", "probe", str(args.workdir), "--data", str(data), "-o",
                                        str(scratch / "offload.probe.safetensors"), "--max-memory", args.max_memory,
                                        "--batch-size", str(args.texts), "--no-cache", "--overwrite", "--json"])
        r["cli"] = {"wall_s": wall, "peak_rss_bytes": rss, "peak_rss_parts": peaks}
    return r


def parts(r: dict) -> str:
    p = r["peak_rss_parts"]
    return f"peaks: anonymous {p['RssAnon'] / 1e9:.2f} GB, mapped files {p['RssFile'] / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-tmp/offload7b"))
    ap.add_argument("--max-memory", default="4GiB")
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--lock", default="/work/bench-tmp/bigmem.lock")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (reused by the next run)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cli", action="store_true", help="also measure the `patchkit probe` command")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        folder, mm, n, out = args.worker
        return worker(folder, mm, int(n), out)

    total = sum(int(np.prod(s)) * 2 for _n, s in tensors(LAYOUT))
    args.workdir.parent.mkdir(parents=True, exist_ok=True)
    built = (args.workdir / "model.safetensors.index.json").is_file()
    if built:
        total = json.loads((args.workdir / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    free = shutil.disk_usage(args.workdir.parent).free
    if not built and free < total + 2 * 10**9:
        raise SystemExit(f"{args.workdir.parent}: {free / 1e9:.1f} GB free, {total / 1e9 + 2:.1f} GB needed")
    try:
        t0 = time.perf_counter()
        if not built:
            build(args.workdir)
        build_s = time.perf_counter() - t0
        r = measure(args, args.workdir.parent)
    finally:
        for name in ("offload-result.json", "offload-texts.jsonl", "offload.probe.safetensors"):
            (args.workdir.parent / name).unlink(missing_ok=True)
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    r.update(checkpoint_bytes=total, build_s=build_s if not built else None, max_memory=args.max_memory, texts=args.texts)
    ok = r["peak_rss_bytes"] < 6 * 10**9 and r["finite"] and r.get("cli", {}).get("peak_rss_bytes", 0) < 6 * 10**9
    rows = [("checkpoint (LLaMA-2-7B layout, bf16)" if not built else "checkpoint (reused)", f"{total / 1e9:.2f} GB"),
            ("written in", f"{build_s:.0f} s" if not built else "reused"),
            ("--max-memory", args.max_memory),
            ("weights in memory / on disk", " / ".join(f"{v / 1e9:.2f} GB {k}" for k, v in sorted(r["placed_bytes"].items()))),
            ("load (from_pretrained, device_map=auto)", f"{r['load_s']:.1f} s"),
            (f"features of {args.texts} texts (one batch)", f"{r['features_s']:.1f} s"),
            ("wall time of the process", f"{r['wall_s']:.1f} s"),
            ("peak RSS", f"{r['peak_rss_bytes'] / 1e9:.2f} GB ({parts(r)})"),
            ("features", f"{r['shape']} {'finite' if r['finite'] else 'NOT FINITE'}")]
    if "cli" in r:
        rows += [("patchkit probe --max-memory: wall", f"{r['cli']['wall_s']:.1f} s"),
                 ("patchkit probe --max-memory: peak RSS", f"{r['cli']['peak_rss_bytes'] / 1e9:.2f} GB ({parts(r['cli'])})")]
    rows += [
            ("target: peak RSS < 6 GB", "PASS" if ok else "FAIL")]
    width = max(len(a) for a, _ in rows)
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
