"""Small filesystem helpers shared by every writer: output folders published whole, temporary
names patchkit can tell apart from a user's own, file hashes.

An output folder OUT is built under a hidden name beside it and appears under its own name by one
rename, so that a process killed at any moment leaves OUT as it was (absent, or the old folder with
--overwrite) or complete. The hidden names are exactly

    .OUT.XXXXXXXX.patchkit-tmp   a folder being built, or garbage: never used again, only removed
    .OUT.XXXXXXXX.patchkit-old   a complete folder (a replaced OUT, or a finished one about to
                                 replace it): put back as OUT if OUT is missing, else removed

where XXXXXXXX is the random part `tempfile` makes (8 of a-z, 0-9, _). Temporary files follow the
same rule: `.NAME.XXXXXXXX.tmp` beside NAME (`temp_file`, `stfile.atomic_write_bytes`); see
`is_own_temp`. Nothing else is ever removed.

A run holds an flock on each hidden folder it is using (and on the OUT it is replacing); the kernel
drops it when the process ends, however it ends. `remove_leftovers`, run before each new build,
therefore touches only the folders of runs that are gone.

Renames: on Linux, renameat2 with RENAME_NOREPLACE (publish, fails if OUT exists) and
RENAME_EXCHANGE (--overwrite: the new folder and the old OUT swap names in one step). Elsewhere, or
on a filesystem that refuses those flags (EINVAL), or with PATCHKIT_PORTABLE_RENAME=1 in the
environment, a portable scheme is used: see `_rename_exclusive` and `publish_folder`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import CheckpointError, LockedError, OutputExistsError


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TMP_SUFFIX, OLD_SUFFIX, FILE_SUFFIX = ".patchkit-tmp", ".patchkit-old", ".tmp"
_RANDOM_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # what tempfile draws its 8 characters from
_RANDOM = r"[a-z0-9_]{8}"


# ---- names patchkit makes --------------------------------------------------------------------------
def is_own_temp(name: str, base: str | None = None, suffixes: tuple[str, ...] = (FILE_SUFFIX,)) -> bool:
    """True when `name` is exactly a temporary name patchkit makes for `base`: `.BASE.XXXXXXXX` then one
    of `suffixes` (XXXXXXXX as `tempfile` makes it). `base=None` accepts any base.

    Files: `is_own_temp(".state.json.ab12cd_9.tmp")` (the default suffix, from `temp_file` or
    `stfile.atomic_write_bytes`), or `is_own_temp(n, "model-00001-of-00002.safetensors")` for the
    temporary copies of one shard. Output folders: `suffixes=(TMP_SUFFIX, OLD_SUFFIX)`.
    A user's `.OUT.backup` or `notes.tmp` never matches."""
    b = re.escape(base) if base is not None else r".+"
    ends = "|".join(re.escape(s) for s in suffixes)
    return re.fullmatch(rf"\.{b}\.{_RANDOM}(?:{ends})", name, flags=re.DOTALL) is not None


@contextmanager
def temp_file(path: Path) -> Iterator[Path]:
    """A new empty file `.NAME.XXXXXXXX.tmp` beside `path` (mode 0600 until the caller sets one),
    removed when the block ends, however it ends, unless the block has renamed it (typically
    `os.replace(tmp, path)` once it is written and fsynced). A file a killed process left is
    recognised by `is_own_temp(name, NAME)`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=FILE_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _hidden_name(output: Path, suffix: str) -> Path:
    """An unused `.OUT.XXXXXXXX<suffix>` path beside `output` (the check and the later rename are not
    one step; the rename is exclusive where the platform allows, and 37**8 names make a clash moot)."""
    while True:
        p = output.parent / f".{output.name}.{''.join(secrets.choice(_RANDOM_CHARS) for _ in range(8))}{suffix}"
        if not os.path.lexists(p):
            return p


# ---- renames ---------------------------------------------------------------------------------------
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
# renameat2's number where the C library has no wrapper (glibc < 2.28, some musl builds)
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276, "loongarch64": 276,
                  "i386": 353, "i686": 353, "armv7l": 382, "armv6l": 382, "ppc64le": 357, "ppc64": 357, "s390x": 347}
_renameat2_fn: list = []  # [callable or None], loaded on first use


def _load_renameat2() -> Callable[[bytes, bytes, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here, not at the top: only an output folder's publishing needs it (start-up time)
    import platform

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b, flags: fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    nr = _SYS_RENAMEAT2.get(platform.machine().lower())
    if nr is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return lambda a, b, flags: syscall(ctypes.c_long(nr), ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(a),
                                       ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(b), ctypes.c_long(flags))


def _renameat2_available() -> Callable[[bytes, bytes, int], int] | None:
    if os.environ.get("PATCHKIT_PORTABLE_RENAME") == "1":
        return None
    if not _renameat2_fn:
        _renameat2_fn.append(_load_renameat2())
    return _renameat2_fn[0]


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when this platform or filesystem cannot
    (no renameat2, ENOSYS, EINVAL for the flags); any other failure raises OSError."""
    fn = _renameat2_available()
    if fn is None:
        return False
    if fn(os.fsencode(src), os.fsencode(dst), flags) == 0:
        return True
    import ctypes

    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), str(src), None, str(dst))


def _rename_exclusive(src: Path, dst: Path) -> None:
    """Rename the folder `src` to `dst`; FileExistsError when anything is at `dst` (a dangling symlink too).

    Linux: renameat2(RENAME_NOREPLACE), one step. Portable: rename(2) of a folder already refuses a
    non-empty folder (ENOTEMPTY/EEXIST) and anything that is not a folder (ENOTDIR) at `dst`; it
    replaces only an empty folder, which the lexists() check turns away unless it appears in the
    microseconds between the two. Two patchkit runs can never both succeed (their folders are not
    empty), nothing is ever lost, and a process killed in between leaves no reservation behind (unlike
    an os.mkdir(dst) reservation, which would leave an empty `dst`)."""
    try:
        if _renameat2(src, dst, RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
        raise


# ---- locks and removal -----------------------------------------------------------------------------
def _lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (not followed if a symlink); None when another
    process holds it. A symlink cannot be locked: OSError (ELOOP), as for a path that is gone."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def _discard(path: Path, output: Path) -> None:
    """Remove a hidden entry beside `output`. A complete (OLD_SUFFIX) folder is first renamed to a
    TMP_SUFFIX name, so that a kill halfway through the removal never leaves a partial folder under a
    name that `remove_leftovers` would put back."""
    if path.name.endswith(OLD_SUFFIX) and not path.is_symlink():
        garbage = _hidden_name(output, TMP_SUFFIX)
        try:
            _rename_exclusive(path, garbage)
            path = garbage
        except OSError:
            pass
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows the symlinks inside
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_leftovers(output: Path) -> list[Path]:
    """Clean up after killed runs beside `output`; returns the hidden entries removed or put back.

    Only names `is_own_temp(name, output.name, (TMP_SUFFIX, OLD_SUFFIX))` are looked at; a symlink
    under such a name is never followed nor removed, and an entry another live run holds locked is
    left alone. If `output` is missing and there is an OLD_SUFFIX entry (a run replacing it with
    --overwrite was killed between moving it aside and moving the new folder in; portable scheme
    only), it is renamed back to `output` (the newest, if several): the interrupted run had not
    finished, so the old output comes back. Every other own entry is then removed."""
    output = Path(output)
    try:
        names = sorted(p for p in output.parent.iterdir() if is_own_temp(p.name, output.name, (TMP_SUFFIX, OLD_SUFFIX)))
    except OSError:
        return []
    held: dict[Path, int | None] = {}
    try:
        for p in names:
            try:
                fd = _lock(p)
            except OSError:
                if p.is_symlink() and p.name.endswith(OLD_SUFFIX):
                    held[p] = None  # a replaced OUT that was a symlink: may be put back, never removed
                continue
            if fd is not None:
                held[p] = fd
        done = []
        if not os.path.lexists(output):
            olds = sorted((p for p in held if p.name.endswith(OLD_SUFFIX)), key=lambda p: p.lstat().st_ctime, reverse=True)
            for p in olds[:1]:
                try:
                    _rename_exclusive(p, output)
                    done.append(p)
                except OSError:
                    pass
        for p in held:
            if p not in done and not p.is_symlink():
                _discard(p, output)
                done.append(p)
        return done
    finally:
        for fd in held.values():
            if fd is not None:
                os.close(fd)


# ---- publishing ------------------------------------------------------------------------------------
def publish_folder(tmp: Path, output: Path, overwrite: bool = False) -> None:
    """Move the finished folder `tmp` to `output` (on the same filesystem), by renames only.

    Without `overwrite` the rename is exclusive: if anything is at `output` (made by another run
    since the caller checked), OutputExistsError is raised and `tmp` is removed. Kill states:
    `output` absent (and `tmp` left for `remove_leftovers`), or `output` complete.

    With `overwrite`, an existing `output` is locked (LockedError if another patchkit process is
    using it, e.g. writing it in place) and replaced; a kill at any moment leaves the old or the new
    folder under the name `output`:

    Linux (renameat2)                       | portable
    1. tmp -> .OUT.r.patchkit-old           | 1. OUT -> .OUT.r.patchkit-old (OUT missing until 2)
       (complete, OUT still old)            |
    2. exchange it with OUT: OUT new,       | 2. tmp -> OUT: OUT new
       .OUT.r.patchkit-old holds the old    |
    3. the old one is renamed to a .patchkit-tmp name and removed (both schemes)

    A kill leaves: OUT old + hidden folders (removed by the next run); OUT new + hidden folders
    (removed); or, portable step 1 only, no OUT + the old one under .patchkit-old, which the next
    run's `remove_leftovers` renames back to OUT (the new folder of the killed run is removed)."""
    tmp, output = Path(tmp), Path(output)
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; an output is an ordinary folder
        try:
            _rename_exclusive(tmp, output)
            tmp = None
            return
        except FileExistsError:
            if not overwrite:
                raise OutputExistsError(f"output {output} already exists (use --overwrite to replace it)", path=output) from None
        _replace(tmp, output)
        tmp = None
    finally:
        if tmp is not None:
            _discard(tmp, output)


def _replace(tmp: Path, output: Path) -> None:
    """`publish_folder` with `overwrite`, once `output` is known to exist (see the table there)."""
    try:
        fd = _lock(output)
    except OSError:
        fd = None  # a symlink (replaced, never followed), or gone meanwhile
    else:
        if fd is None:
            raise LockedError(f"another patchkit process is using {output}; try again when it has finished", path=output)
    new = tmp
    try:
        swapped = False
        if _renameat2_available() is not None:
            new = _hidden_name(output, OLD_SUFFIX)
            _rename_exclusive(tmp, new)  # the finished folder, under a name that says it is complete
            try:
                swapped = _renameat2(new, output, RENAME_EXCHANGE)
            except FileNotFoundError:  # `output` went away meanwhile: an exclusive publish does
                try:
                    _rename_exclusive(new, output)
                except FileExistsError:
                    raise OutputExistsError(f"output {output} was replaced by another process meanwhile; try again",
                                            path=output) from None
                new = None
                return
            if not swapped:  # the filesystem refused: the new folder back to its .patchkit-tmp name
                os.rename(new, tmp)
                new = tmp
        if swapped:
            old, new = new, None
        else:
            old = _hidden_name(output, OLD_SUFFIX)
            _rename_exclusive(output, old)  # portable: from here until the next rename there is no `output`
            try:
                os.rename(new, output)
            except OSError:
                os.rename(old, output)  # put the old one back at once
                raise
            new = None
        _discard(old, output)
    finally:
        if new is not None:
            _discard(new, output)
        if fd is not None:
            os.close(fd)


def _new_locked_folder(output: Path) -> tuple[Path, int]:
    """mkdtemp beside `output`, then flock it. Another run's `remove_leftovers` may take the folder
    in the instant between the two (it is not locked yet): then it is gone or locked, and a new one
    is made."""
    for _ in range(100):
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=TMP_SUFFIX, dir=output.parent))
        try:
            fd = _lock(tmp)
        except OSError:
            continue
        if fd is not None:
            try:
                if os.path.samestat(os.fstat(fd), os.lstat(tmp)):
                    return tmp, fd
            except OSError:
                pass
            os.close(fd)
    raise CheckpointError(f"could not make a working folder beside {output}: other processes keep removing it")


@contextmanager
def staged_folder(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """A new hidden folder beside `output` to fill; when the block ends normally it becomes `output`
    (`publish_folder`: only if `output` does not exist, unless `overwrite`), when it raises it is removed.

    Leftovers of killed runs beside `output` (gigabytes, for a checkpoint) are cleaned up first
    (`remove_leftovers`); without `overwrite`, an existing `output` is refused before anything is built.
    The folder is locked (flock) while this process builds it, so another run leaves it alone."""
    output = Path(output)
    remove_leftovers(output)
    if not overwrite and os.path.lexists(output):
        raise OutputExistsError(f"output {output} already exists (use --overwrite to replace it)", path=output)
    tmp, fd = _new_locked_folder(output)
    try:
        yield tmp
        publish_folder(tmp, output, overwrite)
        tmp = None
    finally:
        os.close(fd)
        if tmp is not None:
            _discard(tmp, output)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
