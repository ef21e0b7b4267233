"""The commands that measure a patch on a live model: eval, tune (search K and alpha within a
capability budget) and the demo.
"""

from __future__ import annotations

import json

import click

from ..evaluation.choices import ControlKind, ControlMatch, Goal, Metric
from ..method.choices import EditMethod, Modules
from ..evaluation.settings import COMMAND_DEFAULTS, RunSettings
from ._common import CommandFailed, choice, emit, json_option, options_from, short

@click.command("eval")
@click.argument("model")
@click.option("--patch", "patches", multiple=True, type=click.Path(), help="A patch to evaluate (repeat for several).")
@click.option("--judge", "judges", multiple=True, help="lexical, refusal, jigsaw, probe:PATH or classifier:PATH_OR_HUB_ID (repeat; default lexical).")
@click.option("--judge-label", help="The classifier label that counts (name or index).")
@options_from(RunSettings, COMMAND_DEFAULTS["eval"])
@click.option("--greedy/--no-greedy", default=True, show_default=True, help="Also one greedy continuation per prompt.")
@click.option("--controls", is_flag=True, help="Also run controls of each patch, chosen by its method: random rows and "
              "directions (model surgery), random and label-shuffled directions (projection), random neurons (damping).")
@click.option("--control-data", help="The labelled data a projection patch was made from (FILE or builtin:NAME), for its "
              "label-shuffled control when the file its provenance names is not here.")
@click.option("--control-seeds", type=click.IntRange(1), default=3, show_default=True, help="Seeds of each control kind.")
@click.option("--control-match", type=choice(ControlMatch), default="kl", show_default=True,
              help="kl: search each control's strength until its next-token KL on the benign text is the patch's "
              "(matched damage); strength: build it at the patch's strength.")
@click.option("--control-kind", "control_kinds", multiple=True, type=choice(ControlKind),
              help="Only controls of this kind (repeat; default: every kind that fits each patch's method).")
@click.option("--control-samples", is_flag=True, help="Sample the controls too (default: their greedy continuations only).")
@click.option("--qa", type=click.Path(exists=True, dir_okay=False), help="JSONL of question/answer pairs: exact-match accuracy.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write an HTML report (and result.json) here.")
@click.option("--attach", is_flag=True, help="Write PATCH.eval.safetensors beside each patch, with the numbers stored in it.")
@click.option("--overwrite", is_flag=True, help="With --attach: replace an existing PATCH.eval.safetensors.")
@json_option
def eval_(model, patches, judges, judge_label, greedy, controls, control_data, control_seeds, control_match, control_kinds,
          control_samples, qa, report_dir, attach,
          overwrite, as_json, **settings):
    """Measure what PATCHes do to MODEL: judged continuations of prompts, perplexity and KL on benign text.

    The base is loaded once; each patch is applied in memory and reverted (checked bit for bit).
    MODEL is a checkpoint folder, a Hub id, or `embedded`; a PATCH a file or hf://. See docs/eval.md.
    """
    from pathlib import Path

    from ..errors import OutputExistsError
    from ..evaluation.evaluate import attach_evaluation, eval_output, evaluate
    from ..evaluation.report import render_table, write_report
    from ..share.sources import resolve_patch

    paths = [resolve_patch(p) for p in patches]
    # beside a local patch; in the current folder for a patch fetched from the Hub
    outs = [eval_output(p if Path(ref).exists() else p.name) for ref, p in zip(patches, paths)]
    for o in outs if attach else []:
        OutputExistsError.check(o, overwrite)
    if control_data and not controls:
        raise CommandFailed("--control-data is for --controls", 2)
    if control_kinds and not controls:
        raise CommandFailed("--control-kind is for --controls", 2)
    r = evaluate(model, paths, judges=list(judges) or ["lexical"], controls=controls, control_data=control_data, qa=qa,
                 greedy=greedy, control_seeds=control_seeds, control_match=control_match,
                 control_kinds=list(control_kinds) or None, control_samples=control_samples,
                 judge_label=judge_label,
                 log=None if as_json else (lambda m: click.echo(m, err=True)), **RunSettings(**settings).kwargs())
    out = r.to_dict()
    if report_dir:
        out["report"] = str(write_report(r, report_dir))
    if attach:
        out["attached"] = [str(attach_evaluation(p, r, output=o, overwrite=overwrite).path) for p, o in zip(paths, outs)]

    def human(d):
        click.echo(render_table(r))
        for p in d.get("attached", []):
            click.echo(f"wrote {p} (the evaluation is part of its content id)")
        if d.get("report"):
            click.echo(f"report: {d['report']}")

    emit(as_json, out, human)
    if not r.reverted_bit_identical:
        raise CommandFailed("the model's weights differ from the base after evaluation", 1)


@click.command()
@click.argument("model")
@click.option("--method", "edit_method", type=choice(EditMethod), default="probe", show_default=True,
              help="probe: K and alpha of the paper's gate-neuron edit; projection: its lam; damping: its fraction (docs/tune.md).")
@click.option("--probe", "probe_path", type=click.Path(), help="With --method probe: a probe made by `patchkit probe`.")
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the chosen patch.")
@click.option("--max-ppl-increase", help="Budget: perplexity on the benign text at most this much above the base (5% or 0.05).")
@click.option("--max-kl", type=click.FloatRange(0), help="Budget: mean next-token KL(base||patched) on the benign text, nats.")
@click.option("--top-k", "top_ks", help="Comma-separated K values (rows edited across all layers).")
@click.option("--fraction", "--fractions", "fractions", help="Or: comma-separated fractions of all target rows (default "
              "0.01,0.0465,0.1). With --method damping: fractions of all MLP neurons (default 0.01,0.03,0.1,0.3,1).")
@click.option("--alpha", "alphas", help="Comma-separated edit strengths (default 0.5,1,2,4).")
@click.option("--data", help="With --method projection or damping: labelled texts (a file, or builtin:toxicity and the like).")
@click.option("--lam", "--lams", "lams", help="With --method projection: comma-separated strengths (default 0.25,0.5,0.75,1).")
@click.option("--layers", help="With --method projection or damping: decoder layers to edit, 15-29 or 15,16,... (default: all).")
@click.option("--rank", type=click.IntRange(1, 64), help="With --method projection: directions per layer (default 1).")
@click.option("--modules", type=choice(Modules), help="With --method projection: which residual writers to edit (default both).")
@click.option("--refine", type=click.IntRange(0), default=3, show_default=True,
              help="Bisection steps on the strength (alpha at each K, lam, fraction).")
@click.option("--judge", default="lexical", show_default=True, help="lexical, refusal, jigsaw, probe:PATH or classifier:PATH_OR_HUB_ID.")
@click.option("--goal", type=choice(Goal), help="Which judge scores are better (default: higher for refusal, else lower).")
@click.option("--metric", type=choice(Metric), default="mean", show_default=True)
@options_from(RunSettings, COMMAND_DEFAULTS["tune"])
@click.option("--any-probe", is_flag=True, help="Use a probe trained on another model of the same size.")
@click.option("--description", help="A line of text stored in the patch.")
@click.option("--overwrite", is_flag=True, help="Replace the patch file if it exists.")
@json_option
def tune(model, edit_method, probe_path, output, max_ppl_increase, max_kl, top_ks, fractions, alphas, data, lams, layers, rank,
         modules, refine, judge, goal, metric, any_probe, description, overwrite, as_json, **settings):
    """Search an edit's strength within a capability budget for the strongest judged change.

    --method probe searches K and alpha of the probe's edit, projection its lam, damping its fraction of
    neurons; the chosen patch is written to OUTPUT. Every point is measured on MODEL loaded once (perplexity and KL first, generation only within
    budget); the trade-off table is printed and stored in the patch (`patchkit inspect`). See docs/tune.md.
    """
    from ..errors import OutputExistsError
    from ..evaluation.tune import parse_floats, render_tune_table
    from ..evaluation.tune import tune as run_tune

    flags = {"--probe": probe_path, "--top-k": top_ks, "--alpha": alphas, "--any-probe": any_probe or None, "--data": data,
             "--lam": lams, "--layers": layers, "--rank": rank, "--modules": modules}
    takes = {"probe": ("--probe", "--top-k", "--alpha", "--any-probe"), "projection": ("--data", "--lam", "--layers", "--rank", "--modules"),
             "damping": ("--data", "--layers")}[edit_method]
    stray = [f for f, v in flags.items() if v is not None and f not in takes] + (["--fraction"] if fractions and edit_method == "projection" else [])
    if stray:
        raise CommandFailed(f"{stray[0]} does not go with --method {edit_method} (it takes {', '.join(takes)})", 2)
    if (probe_path if edit_method == "probe" else data) is None:
        raise CommandFailed(f"--method {edit_method} needs {'--probe PATH' if edit_method == 'probe' else '--data (labelled texts)'}", 2)
    if top_ks and fractions:
        raise CommandFailed("give --top-k or --fraction, not both", 2)
    if max_ppl_increase is None and max_kl is None:
        raise CommandFailed("give a budget: --max-ppl-increase and/or --max-kl", 2)
    OutputExistsError.check(output, overwrite)
    r = run_tune(model, probe_path, method=edit_method, ks=[int(k) for k in parse_floats(top_ks, "--top-k")] if top_ks else None,
                 fractions=parse_floats(fractions, "--fraction") if fractions else None,
                 alphas=parse_floats(alphas, "--alpha") if alphas else None, data=data,
                 lams=parse_floats(lams, "--lam") if lams else None, layers=layers, rank=rank, modules=modules,
                 max_ppl_increase=max_ppl_increase, max_kl=max_kl,
                 judge=judge, goal=goal, metric=metric, refine=refine, check_model=not any_probe, description=description,
                 output=output, overwrite=overwrite, log=None if as_json else (lambda m: click.echo(m, err=True)),
                 **RunSettings(**settings).kwargs())
    out = {**r.to_dict(), "output": output}

    def human(d):
        click.echo(render_tune_table(r))
        click.echo(f"wrote {output}: patch {short(d['patch_id'])}, {r.best.label()} "
                   f"({r.timing['total_s']:.1f} s, {r.timing['points']} points, {r.timing['generated']} generated)")
        if not r.improves_on_base:
            click.echo("warning: no point within budget scored better than the base on this judge", err=True)

    emit(as_json, out, human)


@click.command()
@click.option("--workdir", type=click.Path(), default="patchkit-demo", show_default=True, help="Where the outputs go.")
@click.option("--prompts", "n_prompts", type=click.IntRange(1), default=32, show_default=True, help="RealToxicityPrompts openings to continue.")
@json_option
def demo(workdir, n_prompts, as_json):
    """The main job on the embedded SmolLM2-135M-Instruct: probe, compute, apply, compare, revert."""
    from ..evaluation.demo import run

    r = run(workdir, n_prompts=n_prompts, echo=(lambda *a: None) if as_json else click.echo, progress=not as_json)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
    if not r["revert_bit_identical"]:
        raise CommandFailed("revert did not restore the base checkpoint bit for bit", 1)


COMMANDS = [eval_, tune, demo]
