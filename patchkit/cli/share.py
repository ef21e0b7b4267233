"""The commands that leave the machine: export (to another library's adapter format) and push
(to the Hub). `apply --push` is in patchkit.cli.core.
"""

from __future__ import annotations

import click

from ..share.choices import AdapterFormat
from ._common import choice, emit, json_option, short

@click.command()
@click.argument("patch")
@click.option("--to", "fmt", type=choice(AdapterFormat), required=True, help="Adapter format to write.")
@click.option("-o", "--output", type=click.Path(), required=True, help="The adapter folder to create.")
@click.option("--rank", type=click.IntRange(1), help="Truncate dense deltas to this rank (the error is reported).")
@click.option("--skip-unsupported", is_flag=True, help="Leave out tensors LoRA cannot express, and list them.")
@click.option("--base-model", help="Base model name for the adapter config (default: the patch's).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@json_option
def export(patch, fmt, output, rank, skip_unsupported, base_model, overwrite, as_json):
    """Write PATCH as an adapter another library loads: --to peft makes a LoRA adapter folder."""
    from ..errors import OutputExistsError
    from ..share.export import export_peft

    OutputExistsError.check(output, overwrite)
    r = export_peft(patch, output, rank=rank, skip_unsupported=skip_unsupported, base_model=base_model, overwrite=overwrite)

    def human(r):
        click.echo(f"wrote {r['output']}: LoRA for {len(r['modules'])} module(s) of {r['base_model'] or '(unnamed base)'}, "
                   f"patch {short(r['patch'])}, " + ("exact" if r["exact"] else f"max abs error {r['max_abs_error']:.3g}"))
        for m in r["modules"]:
            err = "exact" if m["exact"] else f"max abs error {m['max_abs_error']:.3g}, relative {m['rel_error']:.3g}"
            click.echo(f"  {m['module']:<44} rank {m['rank']:<4} {m['encoding']:<9} {err}")
        for s in r["skipped"]:
            click.echo(f"skipped {s['tensor']}: {s['reason']}", err=True)

    emit(as_json, r, human)


@click.command()
@click.argument("patch")
@click.argument("repo_id")
@click.option("--revision", help="Branch to commit to (created from main when missing).")
@click.option("--private", is_flag=True, help="Create the repo as private (when it does not exist yet).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--path-in-repo", help="File name in the repo (default: the patch's file name).")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the saved login).")
@json_option
def push(patch, repo_id, revision, private, create_pr, path_in_repo, token, as_json):
    """Upload PATCH and its model card to the Hub model repo REPO_ID, in one commit."""
    from ..share.push import push_patch
    from ..share.sources import resolve_patch

    r = push_patch(resolve_patch(patch), repo_id, revision=revision, private=private, create_pr=create_pr,
                   token=token, path_in_repo=path_in_repo)

    def human(r):
        click.echo(f"pushed {short(r['id'])} to {r['repo']}@{r['revision']} ({r['path']}, commit {r['commit'][:12]})")
        click.echo(f"apply with: patchkit apply {r['ref']} MODEL_DIR -o OUT")
        if r["pr_url"]:
            click.echo(f"pull request: {r['pr_url']}")

    emit(as_json, r, human)


COMMANDS = [export, push]
