"""Where patches and models come from: local paths, and Hub references fetched through `patchkit.share.download`.

Everything that accepts a patch or a model goes through here, so that remote sources work the
same way everywhere. `parse_model` is the one parser of model references (patchkit.method adds the
embedded models, which it knows, in `method.pipeline.resolve_model`):

- a local folder: a path that exists, or one that starts with `.`, `/` or `~`
- `OWNER/NAME[@REVISION]` or `hf://OWNER/NAME[@REVISION]`: a Hub model repository
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from ..errors import CheckpointError, HubError, PatchFormatError
from .hub import parse_model_ref, parse_patch_ref

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:@.+)?$")


class ModelRef(NamedTuple):
    """A parsed model reference: a local folder (`path`), or a Hub repository (`repo_id`, `revision`)."""

    path: Path | None
    repo_id: str | None
    revision: str | None


class ModelSource(NamedTuple):
    """A model made local: its folder, and for a Hub model its repository and the commit fetched."""

    path: Path
    repo_id: str | None
    revision: str | None


def resolve_patch(ref: str) -> Path:
    """A local patch path for `ref`: a file path, or `hf://OWNER/REPO[/PATH][@REVISION]`."""
    if ref.startswith("hf://"):
        from .download import download_patch

        return download_patch(ref)
    p = Path(ref)
    if not p.exists():
        raise PatchFormatError(f"patch file {ref} does not exist", path=p)
    return p


def parse_model(ref: str) -> ModelRef:
    """The one parser of model references (no I/O beyond looking for a local path; embedded models
    are patchkit.method's): a local folder, `OWNER/NAME[@REVISION]` or `hf://OWNER/NAME[@REVISION]`."""
    if ref.startswith("hf://"):
        repo_id, path, revision = parse_patch_ref(ref)
        if path is not None:
            raise HubError(f"{ref}: a model reference names a repository (hf://OWNER/NAME[@REVISION]), not a file in it")
        return ModelRef(None, repo_id, revision)
    p = Path(ref).expanduser()
    if p.exists() or ref.startswith((".", "/", "~")) or not HUB_ID.match(ref):
        return ModelRef(p, None, None)
    repo_id, revision = parse_model_ref(ref)
    return ModelRef(None, repo_id, revision)


def is_hub_model(ref: str) -> bool:
    """Whether `ref` names a Hub model (OWNER/NAME[@REVISION] or hf://...) rather than a local folder."""
    return parse_model(ref).repo_id is not None


def model_source(ref: str, allow_patterns: list[str] | None = None) -> ModelSource:
    """(folder, repo id or None, commit or None) for `ref`. A Hub model is fetched into the HF cache
    (only the files matching `allow_patterns` besides config and tokenizer, when given); its
    snapshot folder is named by the commit, which is returned as the revision."""
    parsed = parse_model(ref)
    if parsed.repo_id is None:
        if not parsed.path.exists():
            raise CheckpointError(f"checkpoint folder {ref} does not exist")
        if not parsed.path.is_dir():
            raise CheckpointError(f"model {ref} is neither a checkpoint folder nor a Hub id")
        return ModelSource(parsed.path, None, None)
    from .download import download_model

    folder = download_model(parsed.repo_id + (f"@{parsed.revision}" if parsed.revision else ""), allow_patterns=allow_patterns)
    return ModelSource(folder, parsed.repo_id, folder.name)
