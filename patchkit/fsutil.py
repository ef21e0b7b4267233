"""Small filesystem helpers shared by every writer: folders published whole, file hashes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_folder_for(output: Path) -> Path:
    """A new hidden folder beside `output`, to be filled and then published with `publish_folder`."""
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".patchkit-tmp", dir=output.parent))


def publish_folder(tmp: Path, output: Path) -> None:
    """Move the finished folder `tmp` to `output` by renames, replacing an existing `output` whole."""
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; an output is an ordinary folder
    if output.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".patchkit-old", dir=output.parent))
        os.replace(output, trash / "old")
        os.replace(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, output)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
