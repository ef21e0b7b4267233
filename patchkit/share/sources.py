"""Where patches and models come from: local paths, and Hub references when `patchkit.share.download` is present.

Everything that accepts a patch or a model goes through here, so that remote sources work the
same way everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError, PatchFormatError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:@.+)?$")


def resolve_patch(ref: str) -> Path:
    """A local patch path for `ref`: a file path, or `hf://OWNER/REPO[/PATH][@REVISION]`."""
    if ref.startswith("hf://"):
        from .download import download_patch

        return download_patch(ref)
    p = Path(ref)
    if not p.exists():
        raise PatchFormatError(f"patch file {ref} does not exist", path=p)
    return p


def resolve_model(ref: str, allow_patterns: list[str] | None = None) -> Path:
    """A local checkpoint folder for `ref`: a folder, or a Hub id `OWNER/NAME[@REVISION]`."""
    p = Path(ref).expanduser()
    if p.exists() or ref.startswith((".", "/", "~")) or not HUB_ID.match(ref):
        if not p.exists():
            raise CheckpointError(f"checkpoint folder {ref} does not exist")
        return p
    from .download import download_model

    return download_model(ref, allow_patterns=allow_patterns)
