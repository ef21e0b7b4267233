"""patchkit.core.fsutil: output folders published exclusively or swapped whole, leftovers of killed runs
recovered or removed by exact name, temporary names patchkit can tell apart from a user's.

Every publishing test runs twice: through renameat2 (Linux) and through the portable scheme
(PATCHKIT_PORTABLE_RENAME=1)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import multiprocessing
import os
import platform
import shutil
import signal
import sys
from pathlib import Path

import pytest

from patchkit.core import fsutil
from patchkit.core.fsutil import OLD_SUFFIX, TMP_SUFFIX, is_own_temp
from patchkit.errors import LockedError, OutputExistsError

SCHEMES = ["renameat2", "portable", "einval"]


def _einval(src: bytes, dst: bytes, flags: int) -> int:
    """renameat2 on a filesystem that does not support its flags."""
    ctypes.set_errno(errno.EINVAL)
    return -1


@pytest.fixture(params=SCHEMES)
def scheme(request, monkeypatch):
    """renameat2: Linux's exclusive rename and exchange. portable: PATCHKIT_PORTABLE_RENAME=1.
    einval: renameat2 exists but the filesystem refuses the flags (the portable scheme, found late)."""
    monkeypatch.delenv("PATCHKIT_PORTABLE_RENAME", raising=False)
    if request.param == "portable":
        monkeypatch.setenv("PATCHKIT_PORTABLE_RENAME", "1")
    elif fsutil._renameat2_available() is None:
        pytest.skip("renameat2 is not available on this platform")
    if request.param == "einval":
        monkeypatch.setattr(fsutil, "_renameat2_fn", [_einval])
    return request.param


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def content(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def staged(out: Path, **files: str) -> Path:
    """A finished hidden folder beside `out`, named as staged_folder names them."""
    import tempfile

    return folder(Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent)), **files)


# ---- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, base, suffixes, expected", [
    (".out.ab_d1234.patchkit-tmp", "out", (TMP_SUFFIX, OLD_SUFFIX), True),
    (".out.ab_d1234.patchkit-old", "out", (TMP_SUFFIX, OLD_SUFFIX), True),
    (".out.ab_d1234.patchkit-old", "out", (TMP_SUFFIX,), False),
    (".out.backup", "out", (TMP_SUFFIX, OLD_SUFFIX), False),
    (".out.busy.patchkit-tmp", "out", (TMP_SUFFIX, OLD_SUFFIX), False),  # not the 8 characters tempfile makes
    (".out.abcdefghi.patchkit-tmp", "out", (TMP_SUFFIX, OLD_SUFFIX), False),
    (".out.ABCDEFGH.patchkit-tmp", "out", (TMP_SUFFIX, OLD_SUFFIX), False),
    (".out.abcdefgh.patchkit-tmp.keep", "out", (TMP_SUFFIX, OLD_SUFFIX), False),
    ("out.abcdefgh.patchkit-tmp", "out", (TMP_SUFFIX, OLD_SUFFIX), False),
    (".outx.abcdefgh.patchkit-tmp", "out", (TMP_SUFFIX, OLD_SUFFIX), False),
    (".my.out.abcdefgh.patchkit-tmp", "out", (TMP_SUFFIX, OLD_SUFFIX), False),
    (".a+b.abcdefgh.patchkit-tmp", "a+b", (TMP_SUFFIX,), True),  # the base is matched literally
    (".aab.abcdefgh.patchkit-tmp", "a+b", (TMP_SUFFIX,), False),
    (".state.json.x1y2z3_4.tmp", None, (".tmp",), True),
    (".state.json.x1y2z3_4.tmp", "state.json", (".tmp",), True),
    (".state.json.x1y2z3_4.tmp", "journal.safetensors", (".tmp",), False),
    ("notes.tmp", None, (".tmp",), False),
    (".notes.tmp", None, (".tmp",), False),
    (".model-00001-of-00002.safetensors.k9_aaaaa.tmp", "model-00001-of-00002.safetensors", (".tmp",), True),
])
def test_is_own_temp(name, base, suffixes, expected):
    assert is_own_temp(name, base, suffixes) is expected


def test_temp_file_is_beside_and_removed(tmp_path):
    target = tmp_path / "state.json"
    with fsutil.temp_file(target) as t:
        assert t.parent == tmp_path and is_own_temp(t.name, "state.json") and t.exists()
    assert not t.exists()
    with pytest.raises(RuntimeError):
        with fsutil.temp_file(target) as t:
            t.write_text("half")
            raise RuntimeError("boom")
    assert not t.exists()
    with fsutil.temp_file(target) as t:  # the usual end: renamed over the target
        t.write_text("whole")
        os.replace(t, target)
    assert target.read_text() == "whole" and os.listdir(tmp_path) == ["state.json"]


# ---- exclusive publish ---------------------------------------------------------------------------
def test_publish_to_a_new_output(scheme, tmp_path):
    out = tmp_path / "out"
    t = staged(out, a="1")
    os.chmod(t, 0o700)
    fsutil.publish_folder(t, out)
    assert content(out) == {"a": "1"} and hidden(tmp_path) == []
    assert out.stat().st_mode & 0o777 == 0o777 & ~fsutil.umask()


@pytest.mark.parametrize("existing", ["folder", "empty-folder", "file", "dangling-symlink"])
def test_second_publish_is_refused_and_leaves_both_intact(scheme, existing, tmp_path):
    out = tmp_path / "out"
    if existing == "folder":
        fsutil.publish_folder(staged(out, a="first"), out)
    elif existing == "empty-folder":
        out.mkdir()
    elif existing == "file":
        out.write_text("a user's file")
    else:
        out.symlink_to(tmp_path / "nowhere")
    before = {p.name: (p.is_dir(), os.path.islink(p)) for p in tmp_path.iterdir()}
    t = staged(out, a="second")
    with pytest.raises(OutputExistsError, match="already exists .use --overwrite to replace it."):
        fsutil.publish_folder(t, out)
    assert not t.exists()  # the staged folder is removed
    assert {p.name: (p.is_dir(), os.path.islink(p)) for p in tmp_path.iterdir()} == before
    if existing == "folder":
        assert content(out) == {"a": "first"}


def test_staged_folder_refuses_an_existing_output_before_building(scheme, tmp_path):
    out = folder(tmp_path / "out", a="mine")
    with pytest.raises(OutputExistsError):
        with fsutil.staged_folder(out):
            pytest.fail("the block must not run")
    assert content(out) == {"a": "mine"} and hidden(tmp_path) == []
    with pytest.raises(ZeroDivisionError):  # a failed build leaves nothing
        with fsutil.staged_folder(tmp_path / "new") as t:
            (t / "a").write_text("x")
            1 / 0
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _race_publisher(out: str, tag: str, barrier, results) -> None:
    out = Path(out)
    try:
        with fsutil.staged_folder(out) as t:
            (t / "who").write_text(tag)
            barrier.wait(timeout=30)  # both have built and checked: now publish at once
        results.put((tag, "won"))
    except OutputExistsError:
        results.put((tag, "refused"))
    except BaseException as e:  # pragma: no cover - reported by the parent
        results.put((tag, repr(e)))


def test_race_two_processes_one_new_output(scheme, tmp_path):
    """Two runs to one new output, each past its existence check: exactly one wins, 20 times out of 20."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(20):
        out = tmp_path / f"out{round_}"
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race_publisher, args=(str(out), tag, barrier, results)) for tag in ("A", "B")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = dict(results.get(timeout=10) for _ in procs)
        assert sorted(got.values()) == ["refused", "won"], got
        winner = next(t for t, r in got.items() if r == "won")
        assert content(out) == {"who": winner}
        assert hidden(tmp_path) == []


# ---- overwrite -----------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", ["folder", "file", "symlink"])
def test_overwrite_replaces_whole(scheme, existing, tmp_path):
    out = tmp_path / "out"
    target = folder(tmp_path / "elsewhere", keep="me")
    if existing == "folder":
        folder(out, a="old", b="old")
    elif existing == "file":
        out.write_text("old file")
    else:
        out.symlink_to(target)
    with fsutil.staged_folder(out, overwrite=True) as t:
        (t / "a").write_text("new")
    assert not out.is_symlink() and content(out) == {"a": "new"}
    assert content(target) == {"keep": "me"}  # a replaced symlink is not followed
    assert hidden(tmp_path) == []


def test_overwrite_of_an_output_another_run_is_using_is_refused(scheme, tmp_path):
    out = folder(tmp_path / "out", a="old")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `patchkit apply --in-place out` holds it
        with pytest.raises(LockedError, match="another patchkit process is using"):
            with fsutil.staged_folder(out, overwrite=True) as t:
                (t / "a").write_text("new")
    finally:
        os.close(fd)
    assert content(out) == {"a": "old"} and hidden(tmp_path) == []


def _killed_publish(out: str, overwrite: bool, kill_at: int, counter) -> None:
    """Build and publish `out`, SIGKILLed just before the step number `kill_at` (a rename, an exchange
    or a removal); kill_at=0 only counts the steps."""
    import patchkit.core.fsutil as f

    steps = [0]

    def step(fn):
        def wrapped(*a, **kw):
            steps[0] += 1
            counter.value = steps[0]
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return wrapped

    os.rename = step(os.rename)
    f._renameat2 = step(f._renameat2)
    shutil.rmtree = step(shutil.rmtree)
    with f.staged_folder(Path(out), overwrite=overwrite) as t:
        (t / "a").write_text("new")
        (t / "b").write_text("new")


@pytest.mark.parametrize("start", ["old-output", "no-output"])
def test_overwrite_killed_at_every_step(scheme, start, tmp_path):
    """A kill before any rename or removal of publish: the name holds the old or the new folder (or,
    portable only, nothing until the next run puts the old one back), and the next run's cleanup
    leaves exactly the old or the new folder and no hidden entry."""
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("i", 0)
    out = tmp_path / "out"
    old = {"a": "old", "b": "old", "c": "old"} if start == "old-output" else None

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        if old:
            folder(out, **old)

    def run(kill_at):
        p = ctx.Process(target=_killed_publish, args=(str(out), True, kill_at, counter))
        p.start()
        p.join(60)
        return p.exitcode

    reset()
    assert run(0) == 0
    n_steps = counter.value
    assert content(out) == {"a": "new", "b": "new"} and hidden(tmp_path) == []
    assert n_steps >= (1 if start == "no-output" else 3)
    seen = set()
    for k in range(1, n_steps + 1):
        reset()
        assert run(k) == -signal.SIGKILL, k
        now = content(out) if out.exists() else None
        new = {"a": "new", "b": "new"}
        if scheme == "renameat2" or now is not None:  # portable: none while the old one is aside
            assert now in (old, new), (k, now)
        fsutil.remove_leftovers(out)
        after = content(out) if out.exists() else None
        assert after in (old, new), (k, after)
        assert hidden(tmp_path) == [], (k, hidden(tmp_path))
        seen.add("old" if after == old else "new")
    # the kills did land on both sides of the swap (a new output is published by its last step)
    assert seen == ({"old", "new"} if old else {"old"})


# ---- remove_leftovers ----------------------------------------------------------------------------
def test_remove_leftovers_removes_exactly_its_own_names(tmp_path):
    out = folder(tmp_path / "out", a="current")
    own = [folder(tmp_path / f".out.{r}{s}", x="junk") for r, s in
           (("abcd1234", TMP_SUFFIX), ("zz_9yy8x", OLD_SUFFIX), ("q0q0q0q0", TMP_SUFFIX))]
    (tmp_path / f".out.file0000{TMP_SUFFIX}").write_text("a file left under an own name")
    target = folder(tmp_path / "precious", keep="me")
    user = {
        ".out.backup": folder(tmp_path / ".out.backup", keep="me"),
        ".out.busy.patchkit-tmp": folder(tmp_path / ".out.busy.patchkit-tmp", keep="me"),
        ".out.abcdefgh.patchkit-tmp.keep": folder(tmp_path / ".out.abcdefgh.patchkit-tmp.keep", keep="me"),
        ".outx.abcdefgh.patchkit-tmp": folder(tmp_path / ".outx.abcdefgh.patchkit-tmp", keep="me"),
        ".out.abcdefgh.tmp": folder(tmp_path / ".out.abcdefgh.tmp", keep="me"),
    }
    link = tmp_path / f".out.link0000{TMP_SUFFIX}"
    link.symlink_to(target)
    old_link = tmp_path / f".out.link1111{OLD_SUFFIX}"
    old_link.symlink_to(target)
    busy = folder(tmp_path / f".out.busy0000{TMP_SUFFIX}", x="being built")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the live run building it holds it
        removed = fsutil.remove_leftovers(out)
    finally:
        os.close(fd)
    assert sorted(p.name for p in removed) == sorted([p.name for p in own] + [f".out.file0000{TMP_SUFFIX}"])
    assert not any(p.exists() for p in own)
    assert all(content(p) == {"keep": "me"} for p in user.values())
    assert link.is_symlink() and old_link.is_symlink() and content(target) == {"keep": "me"}
    assert content(busy) == {"x": "being built"} and content(out) == {"a": "current"}
    # once its builder has gone, the busy folder is a leftover like the others
    assert [p.name for p in fsutil.remove_leftovers(out)] == [busy.name]


def test_remove_leftovers_puts_a_replaced_output_back(tmp_path):
    """Portable --overwrite killed between its two renames: no output, the old one aside, the new one
    (complete or not: nothing says) under its .patchkit-tmp name. The old one comes back."""
    out = tmp_path / "out"
    folder(tmp_path / f".out.old00000{OLD_SUFFIX}", a="old")
    folder(tmp_path / f".out.new00000{TMP_SUFFIX}", a="new")
    fsutil.remove_leftovers(out)
    assert content(out) == {"a": "old"} and hidden(tmp_path) == []


def test_remove_leftovers_leaves_a_live_replacement_alone(tmp_path):
    out = tmp_path / "out"
    aside = folder(tmp_path / f".out.old00000{OLD_SUFFIX}", a="old")
    fd = os.open(aside, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the run replacing `out` is between its renames
        assert fsutil.remove_leftovers(out) == []
        assert not out.exists() and content(aside) == {"a": "old"}
    finally:
        os.close(fd)
    fsutil.remove_leftovers(out)
    assert content(out) == {"a": "old"} and hidden(tmp_path) == []


def test_remove_leftovers_removes_a_replaced_output_when_the_new_one_is_in(tmp_path):
    out = folder(tmp_path / "out", a="new")
    folder(tmp_path / f".out.old00000{OLD_SUFFIX}", a="old")
    fsutil.remove_leftovers(out)
    assert content(out) == {"a": "new"} and hidden(tmp_path) == []


def test_renameat2_through_the_raw_system_call(monkeypatch, tmp_path):
    """A C library without a renameat2 wrapper (glibc < 2.28): the system call by its number."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in fsutil._SYS_RENAMEAT2:
        pytest.skip("no renameat2 system call number for this platform")
    monkeypatch.delenv("PATCHKIT_PORTABLE_RENAME", raising=False)
    libc = ctypes.CDLL(None, use_errno=True)

    class NoWrapper:
        syscall = libc.syscall

    with monkeypatch.context() as m:
        m.setattr(ctypes, "CDLL", lambda *a, **k: NoWrapper())
        fn = fsutil._load_renameat2()
    assert fn is not None
    monkeypatch.setattr(fsutil, "_renameat2_fn", [fn])
    out = tmp_path / "out"
    fsutil.publish_folder(staged(out, a="1"), out)
    with pytest.raises(OutputExistsError):
        fsutil.publish_folder(staged(out, a="2"), out)
    a, b = folder(tmp_path / "a", x="a"), folder(tmp_path / "b", x="b")
    assert fsutil._renameat2(a, b, fsutil.RENAME_EXCHANGE)  # swapped in one call
    assert content(a) == {"x": "b"} and content(b) == {"x": "a"}
    fsutil.publish_folder(staged(out, a="3"), out, overwrite=True)
    assert content(out) == {"a": "3"} and hidden(tmp_path) == []
