"""The markdown of a finished run: the judges' checks, the editing probes, the conditions, the effects
under each judge (Holm-adjusted, simultaneous intervals, the minimum detectable effect), the aim check
and the verdict."""

from __future__ import annotations

from .common import FAMILY_ALPHA, MAX_NEW, TEMPERATURE, f3, pct
from .report import AIM_PPL, aim, conditions_table, tox_rates


def judges_section(report, n):
    t = report["toxicity"]
    out = [f"## Judges, checked before use ({report['data']['benign_for_fp']} base continuations of benign requests; "
           f"{t['base_texts']} base continuations of the {n} evaluated prompts)", "",
           "| judge | held-out ToxiGen groups: AUC | acc. at 0.5 | balanced | ToxiGen-200: AUC | acc. | false positives on benign "
           "continuations* | base scores q50 / q90 / q99 | evidence (held-out AUC ≥ 0.75) |", "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for j in t["judges"]:
        c, a, fp, q = j["check"], j["all"], j["benign_false_positive"], j["base_quantiles"]
        out.append(f"| {j['name']} | {f3(c['auc'])} | {f3(c['accuracy'])} | {f3(c['balanced_accuracy'])} | {f3(a['auc'])} | "
                   f"{f3(a['accuracy'])} | {fp['flagged']}/{fp['n']} = {pct(fp['rate'])}% | {f3(q['q50'])} / {f3(q['q90'])} / "
                   f"{f3(q['q99'])} | {'yes' if j['evidence'] else 'no'} |")
    return out + ["", "\\* every flag there counts as a false positive: this assumes the base model's continuations of "
                  "everyday questions are all non-toxic.", ""]


def probes_section(t):
    pq = t.get("probe_quality")
    out = ["## Editing data and probes", "", "| probe | examples | held-out accuracy | balanced | majority baseline | how held out |",
           "|---|---:|---:|---:|---:|---|"]
    for p in t["probes"]:
        out.append(f"| {p['name']} | {p['n']} | {f3(p['heldout'])} | {f3(p.get('balanced'))} | {f3(p.get('majority'))} | {p['method']} |")
    if not pq:
        return out
    cnt = pq["counts"]
    out += ["", f"Self-labelled data (builtin:toxicity-self): {cnt['generated']} continuations generated "
           f"({', '.join(f'{k} {v}' for k, v in cnt['generated_by_source'].items())}), kept {cnt['kept']}: {cnt['toxic']} toxic "
           f"(jigsaw > 0.5), {cnt['non_toxic']} non-toxic (< 0.1); dropped {cnt['dropped_middle']} in between and "
           f"{cnt['dropped_empty_or_repeated']} empty or repeated. Split by prompt: {pq['train_prompts']} prompts "
           f"({pq['train_rows']} rows) train, {pq['heldout_prompts']} prompts ({pq['heldout_rows']} rows) held out."]
    out += ["", "Learning curve of the self-labelled probe (final normed state; held out by prompt):", "",
            "| training examples | held-out accuracy | balanced accuracy | majority baseline |", "|---:|---:|---:|---:|"]
    for r in pq["learning_curve"]:
        out.append(f"| {r['n_train']} | {f3(r['accuracy'])} | {f3(r['balanced_accuracy'])} | {f3(r['majority_baseline'])} |")
    return out


def effects_section(t, j, n):
    from patchkit.evaluation import stats

    base = t["conditions"][0]
    eff = t["effects"][j]
    rate0, pany0 = tox_rates(base, j)[0], tox_rates(base, j)[2]
    m = eff[0]["family"] if eff else 1
    mde, mdec = stats.mde(rate0, n, FAMILY_ALPHA), stats.mde(rate0, n, FAMILY_ALPHA / m)
    extra = (f"; P(any) at base {pct(pany0)}%: MDE {100 * stats.mde(pany0, n, FAMILY_ALPHA):.1f} points "
             f"({100 * stats.mde(pany0, n, FAMILY_ALPHA / m):.1f} corrected)") if pany0 is not None else ""
    out = ["", f"### Effects under the {j} judge (n = {n} prompts; base greedy rate {pct(rate0)}%: minimum detectable effect "
           f"{100 * mde:.1f} points at two-sided α 0.05, power 0.8, {100 * mdec:.1f} points at the Holm worst case α/{m}{extra})", "",
           f"Greedy: the greedy continuation flagged (0/1), points. Max: the maximum {j} score over the samples (×100). "
           f"Paired bootstrap over prompts; intervals are simultaneous ({100 * (1 - FAMILY_ALPHA / m):.2f}%, Bonferroni over the "
           f"{m} comparisons of this judge) and p-values Holm-adjusted over them (negative = less toxic).", "",
           "| patch | metric | vs | difference | simultaneous interval | p | p (Holm) |", "|---|---|---|---:|---:|---:|---:|"]
    for e in eff:
        vs = e["vs"] if e["vs"] == "base" else f"{e['vs']} (seed mean, same KL)"
        out.append(f"| {e['patch']} | {e['metric']} | {vs} | {100 * e['diff']:+.1f} | [{100 * e['low_corrected']:+.1f}, "
                   f"{100 * e['high_corrected']:+.1f}] | {e['p']:.3g} | {e['p_holm']:.3g}{' **' if e['reject'] else ''} |")
    return out


def aim_section(t):
    j = t["judges"][0]["name"]
    rows = aim(t["conditions"], t["effects"][j], j)
    out = ["", f"### The aim: {j} greedy rate at most half of every control kind's (and of the base's), every comparison with a "
           f"control rejected (Holm), perplexity up at most {100 * AIM_PPL:.0f}%", "",
           "| patch | toxic % | base % | controls % (seed mean, same KL) | patch / lowest control | ppl Δ | KL | aim met |",
           "|---|---:|---:|---|---:|---:|---:|:---:|"]
    for r in rows:
        ctl = "; ".join(f"{k} {pct(v)}" for k, v in r["controls"].items())
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        out.append(f"| {r['patch']} | {pct(r['rate'])} | {pct(r['base'])} | {ctl} | {ratio} | {100 * r['ppl_rise']:+.1f}% | "
                   f"{r['kl']:.4f} | {'**yes**' if r['met'] else 'no'} |")
    return out


def render(report) -> str:
    t = report["toxicity"]
    conds, jn = t["conditions"], [j["name"] for j in t["judges"]]
    n = len(conds[0]["scores"][jn[0]])
    s = report["settings"]
    out = judges_section(report, n)
    if t.get("probes"):
        out += probes_section(t)
    out += ["", f"## Toxicity ({n} prompts: {report['data']['rtp']} RealToxicityPrompts + {report['data']['toxigen']} held-out ToxiGen; "
            f"greedy + {s['samples']} samples at T={TEMPERATURE} for base and patches, greedy for controls; {MAX_NEW} new tokens)", "",
            "Strength: α for the paper's method, λ for projection, and for damping the multiplier of 1 − γ (1 = AurA's factors). "
            "‖Δ‖/‖w‖: mean norm of the edited rows' change over their mean norm.", ""]
    out += conditions_table(report)
    for j in jn:
        out += effects_section(t, j, n)
    out += aim_section(t)
    out += ["", verdict(report), "", f"(total {report['seconds']:.0f} s)"]
    return "\n".join(out)


def verdict(report) -> str:
    t = report["toxicity"]
    j = t["judges"][0]["name"]
    eff = t["effects"][j]
    rej = [e for e in eff if e["reject"]]
    beyond = [e for e in rej if e["vs"] != "base" and e["diff"] < 0]
    lines = [f"**Verdict ({j} judge, family-wise α {FAMILY_ALPHA}).** "]
    if beyond:
        lines.append("Effects beyond the controls: " + "; ".join(
            f"{e['patch']} vs {e['vs']}: {100 * e['diff']:+.1f} points [{100 * e['low_corrected']:+.1f}, {100 * e['high_corrected']:+.1f}]"
            for e in beyond) + ".")
    else:
        ctl = [e for e in eff if e["vs"] != "base"]
        lo = min((e["low_corrected"] for e in ctl), default=float("nan"))
        lines.append(f"No patch lowers the greedy toxic rate beyond its controls ({len(rej)} of {len(eff)} comparisons reject). "
                     f"Against the controls at matched KL every simultaneous interval starts at or above {100 * lo:+.1f} points.")
    more = [e for e in rej if e["diff"] > 0]
    if more:
        lines.append(" MORE toxic than the comparison: " + "; ".join(f"{e['patch']} {e['metric']} vs {e['vs']} {100 * e['diff']:+.1f}"
                                                                   for e in more) + ".")
    met = [r["patch"] for r in aim(t["conditions"], eff, j) if r["met"]]
    lines.append(f" Aim met by: {', '.join(met)}." if met else " The aim is met by no patch.")
    return "".join(lines)
