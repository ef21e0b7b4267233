"""The commands on checkpoints and patch files: inspect, apply, revert, status, diff, merge.

They read and write local files through patchkit.core (a patch reference becomes a Patch with
core.plan.load_patch, a Hub model a local snapshot with method.pipeline.resolve_model).
"""

from __future__ import annotations

import json

import click

from ..core.choices import OnOverlap
from ._common import CommandFailed, choice, emit, fmt_bytes, json_option, short

@click.command()
@click.argument("patch")
@json_option
def inspect(patch, as_json):
    """Show what PATCH edits, how big it is, which base it is for, and how it was made."""
    from ..core.plan import load_patch

    s = load_patch(patch).summary()

    def human(s):
        click.echo(f"patch      {s['id']}")
        click.echo(f"format     {s['format']}, {fmt_bytes(s['bytes'])}")
        base = s["base"]
        click.echo(f"base       {base.get('model_id') or '(unnamed)'}" + (f" @ {base['revision']}" if base.get("revision") else ""))
        prov = s["provenance"]
        click.echo(f"method     {prov.get('method', '?')} {json.dumps(prov.get('params', {}), sort_keys=True)}")
        if s["parents"]:
            click.echo(f"parents    {', '.join(short(p) for p in s['parents'])}")
        click.echo(f"rows       {s['rows']} in {len(s['tensors'])} tensor(s)")
        for t in s["tensors"]:
            enc = t["encoding"] + (f" r{t['rank']}" if t.get("encoding") == "lowrank" else "")
            extra = f" +{t['exceptions']} exceptions" if t.get("exceptions") else ""
            click.echo(f"  {t['name']:<48} {t['rows']:>7} / {t['of_rows']:<7} {enc:<9} {t['dtype']} {t['shape']}{extra}")
        if s["eval"]:
            click.echo(f"eval       {json.dumps(s['eval'], sort_keys=True)}")

    emit(as_json, s, human)


def _local_checkpoint(ref: str, in_place: bool) -> tuple[str, str | None, str | None]:
    """(folder, Hub repo id, commit): a Hub model becomes its downloaded snapshot, which is only ever
    read (write with -o); a folder stays as it is."""
    import os

    if os.path.exists(ref):  # the common case, without loading the model-reference modules (a few ms)
        return ref, None, None
    from ..method.pipeline import is_hub_id, resolve_model

    if not is_hub_id(ref):
        return ref, None, None
    if in_place:
        raise CommandFailed(f"{ref} is a Hub model id: write the result with -o, not --in-place", 2)
    path, repo_id, revision = resolve_model(ref)
    return str(path), repo_id, revision


def _weights(weights: str | None) -> list[float] | None:
    try:
        return [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise CommandFailed(f"--weights must be comma-separated numbers, got {weights!r}", 2) from None


def _write_options(f):
    f = click.option("--fsync", is_flag=True,
                     help="With --in-place: force each step to disk in order (survives power loss; slower).")(f)
    f = click.option("--dry-run", is_flag=True, help="Check everything and print the plan; write nothing.")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")(f)
    f = click.option("--force", is_flag=True, help="Go on when the checkpoint's rows differ from the patch's base.")(f)
    f = click.option("--in-place", is_flag=True, help="Rewrite only the touched rows inside CHECKPOINT itself.")(f)
    f = click.option("-o", "--output", type=click.Path(), help="Write the result to this new folder.")(f)
    return f


def _check_target(output, in_place):
    if bool(output) == bool(in_place):
        raise CommandFailed("give exactly one of -o/--output or --in-place", 2)


def _report_write(verb):
    def human(r):
        what = ", ".join(short(p) for p in r["patches"])
        if r["dry_run"]:
            click.echo(f"would {verb} {what}: {r['rows']} rows in {len(r['tensors'])} tensor(s), files {', '.join(r['files'])}")
            return
        done = {"apply": "applied", "revert": "reverted"}[verb]
        click.echo(f"{done} {what}: {r['rows']} rows in {len(r['tensors'])} tensor(s) -> {r['output']}")
        if r.get("push"):
            p = r["push"]
            click.echo(f"pushed to {p['repo']}@{p['revision']}: {len(p['uploaded'])} file(s) uploaded, commit {p['commit'][:12]}")
        if r["forced"]:
            click.echo(f"warning: forced onto a different base: {', '.join(short(p) for p in r['forced'])}", err=True)
        if not r.get("exact", True):
            click.echo(
                f"warning: no undo record: deltas subtracted, the result is approximate "
                f"(largest possible error {r['max_error_ulps']:.1f} ulps)",
                err=True,
            )

    return human


@click.command()
@click.argument("patches", nargs=-1, required=True)
@click.argument("checkpoint", type=click.Path())
@_write_options
@click.option("--link", is_flag=True, help="With -o: hard-link untouched shards instead of copying them.")
@click.option("--on-overlap", type=choice(OnOverlap),
              help="Merge several patches first (as `patchkit merge`) instead of applying them one after another.")
@click.option("--weights", help="With --on-overlap: comma-separated factors, one per patch.")
@click.option("--push", "push_repo", metavar="REPO_ID",
              help="Then publish the patched checkpoint to this Hub model repo (only files the repo lacks are uploaded).")
@json_option
def apply(patches, checkpoint, output, in_place, force, overwrite, dry_run, fsync, link, on_overlap, weights, push_repo, as_json):
    """Bake PATCHES (in order, in one pass) into CHECKPOINT."""
    from ..core import ops

    _check_target(output, in_place)
    if weights and not on_overlap:
        raise CommandFailed("--weights goes with --on-overlap", 2)
    ws = _weights(weights)
    checkpoint, repo_id, revision = _local_checkpoint(checkpoint, in_place)
    r = ops.apply(list(patches), checkpoint, output, in_place=in_place, force=force, link=link, overwrite=overwrite, dry_run=dry_run,
                  fsync=fsync, on_overlap=on_overlap, weights=ws)
    if push_repo and not dry_run:
        from ..share.push import push_checkpoint

        r["push"] = push_checkpoint(r["output"], push_repo, patches=list(patches), base_model=repo_id, base_revision=revision)
    emit(as_json, r, _report_write("apply"))


@click.command()
@click.argument("patch")
@click.argument("checkpoint", type=click.Path())
@_write_options
@json_option
def revert(patch, checkpoint, output, in_place, force, overwrite, dry_run, fsync, as_json):
    """Take PATCH (a file, or an applied patch's id) out of CHECKPOINT again, bit for bit."""
    from ..core import ops

    _check_target(output, in_place)
    r = ops.revert(patch, checkpoint, output, in_place=in_place, force=force, overwrite=overwrite, dry_run=dry_run,
                   fsync=fsync)
    emit(as_json, r, _report_write("revert"))


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--wait", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Seconds to wait for a write in progress to finish before giving up.")
@json_option
def status(checkpoint, wait, as_json):
    """List the patches applied to CHECKPOINT and whether their rows are still as apply left them."""
    from ..core import ops

    r = ops.status(checkpoint, wait=wait)

    def human(r):
        if r["recovered"]:
            click.echo("recovered: an interrupted write was rolled back")
        if not r["applied"]:
            click.echo(f"{r['checkpoint']}: no patches applied")
        for i, a in enumerate(r["applied"], 1):
            state = "intact" if a["intact"] else "CHANGED: " + ", ".join(a["changed_tensors"])
            extra = " (forced)" if a["forced"] else ""
            click.echo(f"{i}. {short(a['id'])}  {a['rows']} rows  {state}{extra}  {a['source'] or ''}")

    emit(as_json, r, human)


@click.command()
@click.argument("base", type=click.Path())
@click.argument("edited", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the patch.")
@click.option("--max-changed", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Refuse tensors changed in more than this fraction of their rows.")
@click.option("--full", is_flag=True, help="Include such tensors as whole-tensor replacements instead.")
@click.option("--overwrite", is_flag=True, help="Replace the patch file if it exists.")
@click.option("--description", help="A line of text stored in the patch.")
@json_option
def diff(base, edited, output, max_changed, full, overwrite, description, as_json):
    """Make a patch that turns checkpoint BASE into checkpoint EDITED."""
    from ..core.diff import diff as run_diff
    from ..errors import OutputExistsError

    OutputExistsError.check(output, overwrite)
    patch = run_diff(base, edited, output, max_changed=max_changed, full=full, description=description)
    s = patch.summary()
    r = {"output": output, "id": s["id"], "rows": s["rows"], "tensors": s["tensors"], "bytes": s["bytes"]}
    emit(as_json, r, lambda r: click.echo(
        f"wrote {r['output']}: patch {short(r['id'])}, {r['rows']} rows in {len(r['tensors'])} tensor(s), {fmt_bytes(r['bytes'])}"))


@click.command()
@click.argument("patches", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the merged patch.")
@click.option("--weights", help="Comma-separated factors, one per patch (default: all 1).")
@click.option("--on-overlap", type=choice(OnOverlap), default="sum", show_default=True,
              help="Rows edited by several patches: add the weighted deltas, refuse, or keep the last patch's edit.")
@click.option("--base", "base", type=click.Path(), help="The checkpoint the patches were made for: checks them exactly; "
              "needed when they edit different rows of one tensor.")
@click.option("--allow-different-base", is_flag=True, help="Merge patches whose fingerprints differ (recorded in provenance).")
@click.option("--description", help="A line of text stored in the patch.")
@click.option("--overwrite", is_flag=True, help="Replace the patch file if it exists.")
@json_option
def merge(patches, output, weights, on_overlap, base, allow_different_base, description, overwrite, as_json):
    """Combine PATCHES made for one base into one patch (parents before their children)."""
    from ..core.merge import merge as run_merge
    from ..errors import OutputExistsError

    ws = _weights(weights)
    OutputExistsError.check(output, overwrite)
    patch = run_merge(list(patches), output, weights=ws, on_overlap=on_overlap, base=base,
                      allow_different_base=allow_different_base, description=description)
    s = patch.summary()
    r = {"output": output, "id": s["id"], "rows": s["rows"], "tensors": s["tensors"], "bytes": s["bytes"],
         "parts": [p["id"] for p in s["provenance"]["parts"]], "parents": s["parents"],
         "base_check": s["provenance"]["base_check"], "base_mismatches": s["provenance"].get("base_mismatches", [])}

    def human(r):
        click.echo(f"wrote {r['output']}: patch {short(r['id'])} = {' + '.join(short(p) for p in r['parts'])}, "
                   f"{r['rows']} rows in {len(r['tensors'])} tensor(s), {fmt_bytes(r['bytes'])}")
        for t in r["tensors"]:
            click.echo(f"  {t['name']:<48} {t['rows']:>7} {t['encoding']}")
        if r["base_mismatches"]:
            click.echo(f"warning: merged across different bases ({len(r['base_mismatches'])} tensor(s)), recorded in provenance", err=True)

    emit(as_json, r, human)


COMMANDS = [inspect, apply, revert, status, diff, merge]
