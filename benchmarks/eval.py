#!/usr/bin/env python
"""Benchmark: generation throughput of `patchkit.evaluation.evaluate` against a plain `generate` loop.

    python benchmarks/eval.py [--prompts 32] [--batch-size 16] [--max-new-tokens 32] [--reps 3] [--json]

On the embedded SmolLM2-135M-Instruct (bf16, as `evaluate` loads it), greedy continuations of
N RealToxicityPrompts openings (the built-in `toxic-prompts`, evenly spread), each way timed
after one untimed warm-up run, median of --reps:

  (a) plain loop: batches in the given order, left padding, `model.generate` (KV cache), decode
      (what patchkit/evaluation/demo.py did);
  (b) patchkit.evaluation.evaluate.generate_batched at the same batch size (batches of similar length,
      left padding, KV cache);
  (c) for scale: one prompt at a time (`--skip-single` to leave it out).

Prints prompts per second and (b)/(a) against the target: (b) at least 90% of (a). Also reports how
many continuations (b) and (a) share word for word (bf16 greedy decoding can flip a token when
the padding around a prompt changes). Exits 0 either way: it is a report.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def plain_loop(model, tok, prompts, max_new_tokens, batch_size):
    import torch

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out += [t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    return out


def timed(fn, reps):
    fn()  # warm-up
    times = []
    result = None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--json", action="store_true", help="table on stderr, one JSON object on stdout")
    ap.add_argument("--report", type=Path, default=Path(tempfile.gettempdir()) / "patchkit-bench" / "eval-report",
                    help="where `patchkit eval` writes its HTML report of the shipped patch (with controls)")
    ap.add_argument("--skip-report", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from patchkit.evaluation.evaluate import generate_batched, load_prompts
    from patchkit.method.embedded import embedded_model_path

    hf_logging.set_verbosity_error()
    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts, _src = load_prompts("builtin:toxic-prompts", args.prompts)
    n, bs, mnt = len(prompts), args.batch_size, args.max_new_tokens

    rows = []
    t_a, out_a = timed(lambda: plain_loop(model, tok, prompts, mnt, bs), args.reps)
    rows.append(("(a) plain generate loop", bs, t_a))
    t_b, out_b = timed(lambda: [c[0] for c in generate_batched(model, tok, prompts, mnt, bs)], args.reps)
    rows.append(("(b) patchkit generate_batched", bs, t_b))
    if not args.skip_single:
        t_c, _ = timed(lambda: plain_loop(model, tok, prompts, mnt, 1), 1)
        rows.append(("(c) one prompt at a time", 1, t_c))
    same = sum(a == b for a, b in zip(out_a, out_b))
    ratio = t_a / t_b  # throughput of (b) relative to (a)

    err = sys.stderr if args.json else sys.stdout
    print(f"SmolLM2-135M-Instruct bf16, {n} prompts, {mnt} new tokens, greedy, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}", file=err)
    print(f"{'way':<32} {'batch':>5} {'seconds':>8} {'prompts/s':>10}", file=err)
    for name, b, t in rows:
        print(f"{name:<32} {b:>5} {t:>8.2f} {n / t:>10.2f}", file=err)
    verdict = "PASS" if ratio >= 0.9 else "FAIL"
    print(f"(b)/(a) throughput {ratio:.2f} (target >= 0.90): {verdict}; identical continuations {same}/{n}", file=err)
    report = None
    if not args.skip_report:
        # The same evaluation `patchkit eval embedded --patch ... --controls --report DIR` runs.
        from patchkit.evaluation.evaluate import evaluate
        from patchkit.evaluation.report import write_report

        patch = Path(__file__).resolve().parent.parent / "patches" / "smollm2-135m-instruct-detox.safetensors"
        result = evaluate(path, [patch], prompts="builtin:toxic-prompts", judges=["lexical"], controls=True,
                          limit=n, max_new_tokens=mnt, batch_size=bs)
        report = write_report(result, args.report)
        print(f"HTML report of the shipped patch with controls: {report}", file=err)
    if args.json:
        print(json.dumps({"prompts": n, "batch_size": bs, "max_new_tokens": mnt, "reps": args.reps,
                          "rows": [{"way": w, "batch": b, "seconds": t, "prompts_per_s": n / t} for w, b, t in rows],
                          "ratio": ratio, "pass": ratio >= 0.9, "identical": same,
                          "report": str(report) if report else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
