"""Memory of apply and revert follows one tensor's touched rows, not the checkpoint nor the patch.

Measured with tracemalloc (numpy's buffers are traced), in this process, on a checkpoint with one
large tensor (16 MB) and eight smaller ones. Untouched bytes are never read into memory. The touched
rows are processed a tensor at a time: planning keeps only their hashes, and writing reads each
tensor's rows again, checks them and makes its new rows just before they are written, the undo
record and the journal being streamed to their files tensor by tensor. So the peak is a few copies
of one tensor's touched rows per thread (PATCHKIT_THREADS), whatever the number of tensors: below
the touched bytes once a patch touches more tensors than that, and flat as it touches more.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import weight_files
from patchkit.core import ops
from patchkit.core.checkpoint import Checkpoint
from patchkit.core.patchfile import Patch, make_edit

COLS = 1024
BIG = ("big.weight", 8192)  # 16 MB of F16, of which the first test touches 8 rows
SMALL = [(f"layers.{i}.weight", 512) for i in range(8)]  # 1 MB each
MB = 1 << 20


@pytest.fixture
def ckpt(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal((n, COLS)) * 0.02).astype(np.float16) for name, n in [BIG, *SMALL]}
    d = tmp_path / "ck"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def patch_for(ckpt, rows_by_tensor: dict[str, int], path) -> tuple:
    """The paper's kind of patch (one shared direction, so a factored edit of a few KB) editing the
    first `n` rows of each tensor named: what is in memory is then the rows, not the patch."""
    ck, rng = Checkpoint(ckpt), np.random.default_rng(1)
    direction = (rng.standard_normal(COLS) * 0.01).astype(np.float32)
    edits = {}
    for name, n in rows_by_tensor.items():
        info = ck.info(name)
        rows = np.arange(n, dtype=np.int64)
        delta = np.broadcast_to(direction, (n, COLS))
        edits[name] = make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows), delta=delta)
    touched = sum(n * COLS * 2 for n in rows_by_tensor.values())
    return Patch(edits=edits, provenance={"method": "test"}).save(path), touched


def peak(fn) -> int:
    """Peak bytes traced while `fn` runs, over what was allocated when it started."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_untouched_bytes_are_never_read_into_memory(ckpt, tmp_path):
    path, touched = patch_for(ckpt, {BIG[0]: 8}, tmp_path / "p.safetensors")
    before = weight_files(ckpt)
    assert touched == 16 * 1024
    # the 16 MB tensor is the checkpoint; 8 rows of it are 16 KB: well under 1 MB in every mode
    assert peak(lambda: ops.apply(path, ckpt, tmp_path / "out")) < 1 * MB
    assert peak(lambda: ops.apply(path, ckpt, in_place=True)) < 1 * MB
    assert peak(lambda: ops.revert(path, ckpt, in_place=True)) < 1 * MB
    assert weight_files(ckpt) == before


def test_memory_grows_with_touched_rows_not_beyond_a_few_copies(ckpt, tmp_path):
    # 8 tensors x 512 rows x 2 KB = 8 MB touched. Old and new rows, the undo record's bytes and
    # per-tensor float32 work: a few copies of the touched bytes, never the 24 MB checkpoint's size
    path, touched = patch_for(ckpt, {name: n for name, n in SMALL}, tmp_path / "p.safetensors")
    before = weight_files(ckpt)
    for label, fn in [
        ("apply -o", lambda: ops.apply(path, ckpt, tmp_path / "out")),
        ("apply --in-place", lambda: ops.apply(path, ckpt, in_place=True)),
        ("revert --in-place", lambda: ops.revert(path, ckpt, in_place=True)),
    ]:
        used = peak(fn)
        assert used < 4 * touched, f"{label}: peak {used / MB:.1f} MB for {touched / MB:.0f} MB of rows"
    assert weight_files(ckpt) == before


def test_rows_are_processed_a_tensor_at_a_time(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHKIT_THREADS", "2")  # each thread holds one tensor's rows: fix how many
    path, touched = patch_for(ckpt, {name: n for name, n in SMALL}, tmp_path / "p.safetensors")
    assert peak(lambda: ops.apply(path, ckpt, in_place=True)) < touched


def modes(path, ckpt, out):
    return [
        ("apply -o", lambda: ops.apply(path, ckpt, out, overwrite=True)),
        ("apply --in-place", lambda: ops.apply(path, ckpt, in_place=True)),
        ("revert --in-place", lambda: ops.revert(path, ckpt, in_place=True)),
    ]


@pytest.mark.parametrize("threads", ["1", "2"])
def test_every_mode_stays_below_the_touched_bytes_and_flat_in_the_tensors_touched(ckpt, tmp_path, monkeypatch, threads):
    """apply -o, apply --in-place and revert --in-place: with 8 tensors touched the peak is below the
    touched bytes, and on one thread no higher than with 4 (holding every tensor's rows, it would
    double; with more threads it depends on which tensors the threads hold at the same moment)."""
    monkeypatch.setenv("PATCHKIT_THREADS", threads)
    before = weight_files(ckpt)
    peaks = {}
    for n_tensors in (4, 8):
        path, touched = patch_for(ckpt, {name: n for name, n in SMALL[:n_tensors]}, tmp_path / f"p{n_tensors}.safetensors")
        for label, fn in modes(path, ckpt, tmp_path / "out"):
            peaks[label, n_tensors] = used = peak(fn)
            if n_tensors == 8:
                assert used < touched, f"{label}: peak {used / MB:.1f} MB for {touched / MB:.0f} MB of rows"
        assert weight_files(ckpt) == before
    one_tensor = 512 * COLS * 2
    for label, _ in modes(None, ckpt, None) if threads == "1" else []:
        grown = peaks[label, 8] - peaks[label, 4]
        assert grown < one_tensor / 4, f"{label}: {peaks[label, 4] / MB:.1f} MB for 4 tensors, {peaks[label, 8] / MB:.1f} for 8"


def test_a_write_rolled_back_holds_a_tensor_at_a_time_too(ckpt, tmp_path, monkeypatch):
    """A write that fails once the rows are written is rolled back from the undo record, read back
    and checked a tensor at a time (not loaded whole)."""
    from patchkit.core import state as st
    from patchkit.errors import CheckpointError

    monkeypatch.setenv("PATCHKIT_THREADS", "2")
    path, touched = patch_for(ckpt, {name: n for name, n in SMALL}, tmp_path / "p.safetensors")
    before = weight_files(ckpt)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_state", disk_full)
    failed = []

    def apply():
        with pytest.raises(CheckpointError, match="rolled back") as ei:
            ops.apply(path, ckpt, in_place=True)
        failed.append(ei.value)

    assert peak(apply) < touched and failed
    assert weight_files(ckpt) == before
