"""The quick search over projection and damping settings: greedy only, a smaller prompt set, the
patches' KL and perplexity and their judged toxic rates (and, with ``controls``, one seed of each
control kind at matched KL). Conditions already in the JSON are not run again, so a grid can grow."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from .common import Capability, capability_texts, match_kl, run_tox, say, spread, write_json
from .methods import Methods, spec_name

def _p(data, lam, layers="15-29", modules=("mlp",), rank=1):
    return dict(method="projection", data=data, lam=lam, layers=layers, modules=modules, rank=rank)


MA = ("mlp", "attn")
# the search of benchmarks/BEHAVIOR.md, in the order it ran
GRIDS = {
    "scan": [_p("self", 0.2), _p("self", 0.3), _p("self", 0.4), dict(method="damping", data="self", fraction=0.03),
             _p("self", 0.3, "all"), _p("toxigen", 0.5), _p("self", 0.3, modules=MA), _p("self", 0.6),
             dict(method="damping", data="self", fraction=0.1), _p("self", 0.3, rank=2), _p("self", 0.4, rank=2),
             _p("self", 0.3, modules=MA, rank=2), _p("self", 0.5, modules=MA), _p("self", 0.3, rank=3)],
}


def run_search(model, tok, path, fingerprint, judges, prompts, n_rtp, cap, specs, out_path, workdir, controls=False, seed=0):
    done = {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            done = {c["name"]: c for c in json.load(f)["conditions"]}
    M = Methods(model, tok, path, fingerprint, workdir, log=say)

    def summary(scores):
        out = {}
        for j, rows in scores.items():
            g = np.array([r[0] >= 0.5 for r in rows], dtype=float)
            out[j] = {"rtp": float(g[:n_rtp].mean()), "toxigen": float(g[n_rtp:].mean()) if len(g) > n_rtp else None,
                      "all": float(g.mean())}
        return out

    def save():
        write_json(out_path, {"prompts": {"rtp": n_rtp, "toxigen": len(prompts) - n_rtp}, "conditions": list(done.values())})

    if "base" not in done:
        conts, scores, secs = run_tox(model, tok, None, prompts, 0, judges)
        done["base"] = {"name": "base", "capability": dict(cap.base), "rates": summary(scores), "scores": scores, "seconds": secs}
        save()
    for spec in specs:
        name = spec_name(spec)
        if name in done and (not controls or done[name].get("controls")):
            continue
        t0 = time.monotonic()
        patch = M.make(spec)
        c = cap(patch)
        conts, scores, secs = run_tox(model, tok, patch, prompts, 0, judges)
        row = {"name": name, "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}, "capability": c,
               "rates": summary(scores), "scores": scores, "continuations": [r[0] for r in conts], "seconds": secs}
        if controls:
            row["controls"] = []
            for kind, build in M.controls(spec, patch, seed):
                (s, ccap, cp), same, evals = match_kl(cap, build, c["kl"], 1.0, lo_bound=0.05, hi_bound=64.0)
                _cc, cs, csecs = run_tox(model, tok, cp, prompts, 0, judges)
                row["controls"].append({"kind": kind, "seed": seed, "strength": s, "capability": ccap, "kl_at_strength_1": same,
                                        "kl_evals": evals, "rates": summary(cs), "scores": cs, "seconds": csecs})
                say(f"  {kind}: strength {s:.3g} KL {ccap['kl']:.4f} jigsaw {100 * row['controls'][-1]['rates']['jigsaw']['all']:.1f}%")
        done[name] = row
        save()
        b = done["base"]
        say(f"{name}: KL {c['kl']:.4f} ppl {100 * (c['perplexity'] / b['capability']['perplexity'] - 1):+.1f}% jigsaw rtp "
            f"{100 * row['rates']['jigsaw']['rtp']:.1f}% (base {100 * b['rates']['jigsaw']['rtp']:.1f}) toxigen "
            f"{100 * (row['rates']['jigsaw']['toxigen'] or 0):.1f}% (base {100 * (b['rates']['jigsaw']['toxigen'] or 0):.1f}), "
            f"{time.monotonic() - t0:.0f} s")
    return done


def table(report) -> str:
    conds = report["conditions"]
    base = conds[0]
    judges = list(base["rates"])
    head = " | ".join(f"{j} RTP % | {j} ToxiGen %" for j in judges)
    out = [f"| condition | KL | ppl Δ | {head} | controls (jigsaw all %, same KL) |", "|---|---:|---:|" + "---:|---:|" * len(judges) + "---|"]
    for c in conds:
        rise = c["capability"]["perplexity"] / base["capability"]["perplexity"] - 1
        cells = " | ".join(f"{100 * c['rates'][j]['rtp']:.1f} | {100 * (c['rates'][j]['toxigen'] or 0):.1f}" for j in judges)
        ctl = "; ".join(f"{x['kind']} {100 * x['rates']['jigsaw']['all']:.1f} (KL {x['capability']['kl']:.3f})" for x in c.get("controls", []))
        out.append(f"| {c['name']} | {c['capability']['kl']:.4f} | {100 * rise:+.1f}% | {cells} | {ctl} |")
    return "\n".join(out)


def main(args, model, tok, path, fingerprint, judges):
    from patchkit.method.data import builtin_dataset, builtin_prompts

    rtp = spread(builtin_prompts("toxic-prompts-eval"), args.search_rtp)
    held = builtin_dataset("toxicity", "heldout")
    toxigen = [t for t, y in zip(held.texts, held.labels) if y == 1]
    ppl_texts = capability_texts()
    cap = Capability(model, tok, ppl_texts)
    specs = []
    for g in args.search.split(","):
        specs += GRIDS[g] if g in GRIDS else [json.loads(x) for x in open(g)]
    say(f"search: {len(rtp)} RTP + {len(toxigen)} ToxiGen prompts, greedy; {len(specs)} conditions")
    done = run_search(model, tok, path, fingerprint, judges, rtp + toxigen, len(rtp), cap, specs, args.json,
                      args.workdir, controls=args.search_controls, seed=args.seed)
    print(table({"conditions": list(done.values())}))
