"""Small filesystem helpers shared by every writer: folders published whole, file hashes."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TMP_SUFFIX, OLD_SUFFIX = ".patchkit-tmp", ".patchkit-old"


@contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A new hidden folder beside `output` to fill; when the block ends normally it becomes `output`
    (replacing an existing one whole), when it raises it is removed.

    The folder is locked (flock) while this process builds it, and the kernel drops the lock when
    the process ends, however it ends. So folders that a killed run left beside `output` (gigabytes,
    for a checkpoint) are found by their unlocked state and removed first, and the folder of a run
    still going on is left alone."""
    output = Path(output)
    remove_leftovers(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=TMP_SUFFIX, dir=output.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield tmp
        publish_folder(tmp, output)
        tmp = None
    finally:
        os.close(fd)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(output: Path) -> list[Path]:
    """Remove the hidden folders that killed runs left beside `output`; returns what was removed."""
    removed = []
    try:
        candidates = [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")
                      and p.name.endswith((TMP_SUFFIX, OLD_SUFFIX)) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for p in candidates:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # another run is building it
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


def publish_folder(tmp: Path, output: Path) -> None:
    """Move the finished folder `tmp` to `output` by renames, replacing an existing `output` whole."""
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; an output is an ordinary folder
    if output.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=OLD_SUFFIX, dir=output.parent))
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
