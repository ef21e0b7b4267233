"""The commands that measure a patch on a live model: eval, tune (search K and alpha within a
capability budget) and the demo.
"""

from __future__ import annotations

import json

import click

from ._common import CommandFailed, emit, json_option, short

@click.command("eval")
@click.argument("model")
@click.option("--patch", "patches", multiple=True, type=click.Path(), help="A patch to evaluate (repeat for several).")
@click.option("--prompts", default="builtin:toxicity-eval", show_default=True,
              help="Prompts to continue: FILE (.jsonl/.txt) or builtin:NAME (toxicity-eval: 300 RealToxicityPrompts + held-out ToxiGen).")
@click.option("--benign", default="builtin:benign-requests", show_default=True, help="Text for perplexity and KL: FILE or builtin:NAME.")
@click.option("--judge", "judges", multiple=True, help="lexical, refusal, jigsaw, probe:PATH or classifier:PATH_OR_HUB_ID (repeat; default lexical).")
@click.option("--judge-label", help="The classifier label that counts (name or index).")
@click.option("--judge-check", help="Labelled FILE or builtin:NAME (its held-out split and all of it) to measure the judges' quality.")
@click.option("--force-judge", is_flag=True, help="Allow a probe judge that is the probe the patch was made with.")
@click.option("--greedy/--no-greedy", default=True, show_default=True, help="Also one greedy continuation per prompt.")
@click.option("--samples", type=click.IntRange(0), default=4, show_default=True, help="Sampled continuations per prompt (0: greedy only).")
@click.option("--temperature", type=click.FloatRange(0), default=0.9, show_default=True, help="Of the samples; 0: greedy only.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Use N prompts, evenly spread over the set.")
@click.option("--benign-limit", type=click.IntRange(1), default=32, show_default=True)
@click.option("--controls", is_flag=True, help="Also run random-rows and random-direction controls of each patch.")
@click.option("--control-seeds", type=click.IntRange(1), default=3, show_default=True, help="Seeds of each control kind.")
@click.option("--control-samples", is_flag=True, help="Sample the controls too (default: their greedy continuations only).")
@click.option("--qa", type=click.Path(exists=True, dir_okay=False), help="JSONL of question/answer pairs: exact-match accuracy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write an HTML report (and result.json) here.")
@click.option("--attach", is_flag=True, help="Write PATCH.eval.safetensors beside each patch, with the numbers stored in it.")
@click.option("--overwrite", is_flag=True, help="With --attach: replace an existing PATCH.eval.safetensors.")
@json_option
def eval_(model, patches, prompts, benign, judges, judge_label, judge_check, force_judge, greedy, samples, temperature,
          max_new_tokens, batch_size, limit, benign_limit, controls, control_seeds, control_samples, qa, seed, report_dir, attach, overwrite, as_json):
    """Measure what PATCHes do to MODEL: judged continuations of prompts, perplexity and KL on benign text.

    The base is loaded once; each patch is applied in memory and reverted (checked bit for bit).
    MODEL is a checkpoint folder, a Hub id, or `embedded`. See docs/eval.md.
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
        if o.exists() and not overwrite:
            raise OutputExistsError(f"output {o} already exists (use --overwrite to replace it)")
    r = evaluate(model, paths, prompts=prompts, benign=benign, judges=list(judges) or ["lexical"], samples=samples,
                 temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, controls=controls, qa=qa,
                 seed=seed, greedy=greedy, control_seeds=control_seeds, control_samples=control_samples, limit=limit, benign_limit=benign_limit,
                 judge_label=judge_label, judge_check=judge_check,
                 force_judge=force_judge, log=None if as_json else (lambda m: click.echo(m, err=True)))
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
@click.option("--probe", "probe_path", required=True, type=click.Path(), help="A probe made by `patchkit probe`.")
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the chosen patch.")
@click.option("--prompts", default="builtin:toxic-prompts", show_default=True, help="Prompts to continue: FILE (.jsonl/.txt) or builtin:NAME.")
@click.option("--benign", default="builtin:benign-requests", show_default=True, help="Text for perplexity and KL: FILE or builtin:NAME.")
@click.option("--max-ppl-increase", help="Budget: perplexity on the benign text at most this much above the base (5% or 0.05).")
@click.option("--max-kl", type=click.FloatRange(0), help="Budget: mean next-token KL(base||patched) on the benign text, nats.")
@click.option("--top-k", "top_ks", help="Comma-separated K values (rows edited across all layers).")
@click.option("--fraction", "fractions", help="Or: comma-separated fractions of all target rows (default 0.01,0.0465,0.1).")
@click.option("--alpha", "alphas", help="Comma-separated edit strengths (default 0.5,1,2,4).")
@click.option("--refine", type=click.IntRange(0), default=3, show_default=True, help="Bisection steps on alpha at each K.")
@click.option("--judge", default="lexical", show_default=True, help="lexical, refusal, jigsaw, probe:PATH or classifier:PATH_OR_HUB_ID.")
@click.option("--goal", type=click.Choice(["lower", "higher"]), help="Which judge scores are better (default: higher for refusal, else lower).")
@click.option("--metric", type=click.Choice(["mean", "rate", "expected_max", "p_any"]), default="mean", show_default=True)
@click.option("--judge-check", help="Labelled FILE or builtin:NAME (its held-out split) to measure the judge's accuracy.")
@click.option("--force-judge", is_flag=True, help="Allow a probe judge that is the probe the patches are made with.")
@click.option("--limit", type=click.IntRange(1), default=32, show_default=True, help="Use N prompts, evenly spread over the set.")
@click.option("--benign-limit", type=click.IntRange(1), default=32, show_default=True)
@click.option("--samples", type=click.IntRange(1), default=1, show_default=True, help="Continuations per prompt.")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--any-probe", is_flag=True, help="Use a probe trained on another model of the same size.")
@click.option("--description", help="A line of text stored in the patch.")
@click.option("--overwrite", is_flag=True, help="Replace the patch file if it exists.")
@json_option
def tune(model, probe_path, output, prompts, benign, max_ppl_increase, max_kl, top_ks, fractions, alphas, refine, judge, goal,
         metric, judge_check, force_judge, limit, benign_limit, samples, temperature, max_new_tokens, batch_size, seed,
         any_probe, description, overwrite, as_json):
    """Search K and alpha for the strongest judged change within a capability budget; write the chosen patch.

    Every point is measured on MODEL loaded once (perplexity and KL first, generation only within
    budget); the trade-off table is printed and stored in the patch (`patchkit inspect`). See docs/tune.md.
    """
    from pathlib import Path

    from ..errors import OutputExistsError
    from ..evaluation.tune import parse_floats, render_tune_table
    from ..evaluation.tune import tune as run_tune

    if top_ks and fractions:
        raise CommandFailed("give --top-k or --fraction, not both", 2)
    if max_ppl_increase is None and max_kl is None:
        raise CommandFailed("give a budget: --max-ppl-increase and/or --max-kl", 2)
    if Path(output).exists() and not overwrite:
        raise OutputExistsError(f"output {output} already exists (use --overwrite to replace it)")
    r = run_tune(model, probe_path, prompts, benign, ks=[int(k) for k in parse_floats(top_ks, "--top-k")] if top_ks else None,
                 fractions=parse_floats(fractions, "--fraction") if fractions else None,
                 alphas=parse_floats(alphas, "--alpha") if alphas else None, max_ppl_increase=max_ppl_increase, max_kl=max_kl,
                 judge=judge, goal=goal, metric=metric, refine=refine, seed=seed, limit=limit, benign_limit=benign_limit,
                 max_new_tokens=max_new_tokens, batch_size=batch_size, samples=samples, temperature=temperature,
                 judge_check=judge_check, force_judge=force_judge, check_model=not any_probe, description=description,
                 output=output, overwrite=overwrite, log=None if as_json else (lambda m: click.echo(m, err=True)))
    out = {**r.to_dict(), "output": output}

    def human(d):
        click.echo(render_tune_table(r))
        click.echo(f"wrote {output}: patch {short(d['patch_id'])}, K={r.best.k}, alpha {r.best.alpha:g} "
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
