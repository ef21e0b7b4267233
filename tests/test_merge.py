"""merge: overlap policies, encodings, fingerprints, the algebra of `sum`, and merged vs sequential apply."""

from __future__ import annotations

import itertools

import hypothesis.strategies as hs
import numpy as np
import pytest
from hypothesis import given, settings

from conftest import load_tensors
from patchkit.core import ops
from patchkit.core.checkpoint import Checkpoint
from patchkit.core.dtypes import to_float, ulp
from patchkit.core.merge import MergeError, Part, combine_edits, merge, merge_patches, to_edit
from patchkit.core.patchfile import Patch, TensorEdit, make_edit, rows_hash
from patchkit.errors import BaseMismatchError

GATE = "model.layers.0.mlp.gate_proj.weight"  # [48, 32]
UP = "model.layers.2.mlp.up_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"


def edit(ck: Checkpoint, name: str, rows, delta=None, values=None) -> TensorEdit:
    info = ck.info(name)
    rows = np.asarray(rows, dtype=np.int64)
    if delta is not None and np.ndim(delta) == 1:
        delta = np.tile(np.asarray(delta, dtype=np.float32), (len(rows), 1))
    return make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows), delta=delta, values=values)


def factored(ck: Checkpoint, name: str, rows, v, scale) -> TensorEdit:
    info, rows = ck.info(name), np.asarray(rows, dtype=np.int64)
    raw = ck.read_rows(name, rows)
    e = TensorEdit(name, info.shape, info.dtype, rows, "factored", rows_hash(raw), direction=v,
                   scale=np.asarray(scale, dtype=np.float32))
    e.result_sha256 = rows_hash(e.new_rows(raw))
    return e


def patch_of(*edits: TensorEdit, parents=(), seed=0) -> Patch:
    return Patch({e.name: e for e in edits}, base_model="tiny-llama", provenance={"method": "test", "params": {"seed": seed}},
                 parents=list(parents))


def rand(n, cols, seed, scale=0.05):
    return (np.random.default_rng(seed).standard_normal((n, cols)) * scale).astype(np.float32)


@pytest.fixture
def base(ckpts):
    return ckpts[("bf16", False)]


# ---- encodings -------------------------------------------------------------------------------------
def test_disjoint_rows_with_one_direction_and_scale_stay_factored_with_one_scale(base, tmp_path):
    ck = Checkpoint(base)
    v = rand(1, 32, 1)[0]
    a, b = patch_of(edit(ck, GATE, [1, 5], v)), patch_of(edit(ck, GATE, [3, 9], v), seed=1)
    m = merge_patches([a, b], base=base)
    e = m.edits[GATE]
    assert e.encoding == "factored" and e.scale.shape == (1,) and e.rows.tolist() == [1, 3, 5, 9]
    assert e.base_sha256 == rows_hash(ck.read_rows(GATE, e.rows))
    ops.apply([m], base, tmp_path / "merged")
    ops.apply([a, b], base, tmp_path / "seq")
    assert load_tensors(tmp_path / "merged")[GATE].equal(load_tensors(tmp_path / "seq")[GATE])


def test_per_row_scales_along_one_direction_stay_factored(base):
    ck = Checkpoint(base)
    v = rand(1, 32, 2)[0]
    a = patch_of(factored(ck, GATE, [0, 2], v, [1.08, -0.3]))
    b = patch_of(factored(ck, GATE, [4], v, [0.7]), seed=1)
    assert a.edits[GATE].encoding == "factored"
    e = merge_patches([a, b], base=base).edits[GATE]
    assert e.encoding == "factored" and e.scale.shape == (3,)
    expected = np.concatenate([a.edits[GATE].deltas(), b.edits[GATE].deltas()])
    assert np.array_equal(e.deltas().view(np.uint32), expected.view(np.uint32))


def test_different_directions_fall_back_to_dense(base):
    ck = Checkpoint(base)
    a = patch_of(edit(ck, GATE, [0, 2], rand(1, 32, 3)[0]))
    b = patch_of(edit(ck, GATE, [4, 6], rand(1, 32, 4)[0]), seed=1)
    e = merge_patches([a, b], base=base).edits[GATE]
    assert e.encoding == "dense" and e.rows.tolist() == [0, 2, 4, 6]


# ---- fingerprints --------------------------------------------------------------------------------------
def test_different_row_sets_need_the_base(base, ckpts):
    ck = Checkpoint(base)
    a, b = patch_of(edit(ck, GATE, [0, 1], rand(2, 32, 5))), patch_of(edit(ck, GATE, [1, 2], rand(2, 32, 6)), seed=1)
    with pytest.raises(MergeError, match="different rows of tensor .*--base CHECKPOINT"):
        merge_patches([a, b])
    assert merge_patches([a, b], base=base).edits[GATE].rows.tolist() == [0, 1, 2]
    with pytest.raises(BaseMismatchError, match="was not made for"):
        merge_patches([a, b], base=ckpts[("bf16-other", False)])


def test_same_rows_merge_without_base_and_other_bases_are_refused(base, ckpts, tmp_path):
    ck, other = Checkpoint(base), Checkpoint(ckpts[("bf16-other", False)])
    a, b = patch_of(edit(ck, GATE, [0, 1], rand(2, 32, 7))), patch_of(edit(ck, GATE, [0, 1], rand(2, 32, 8)), seed=1)
    m = merge_patches([a, b])
    assert m.edits[GATE].base_sha256 == a.edits[GATE].base_sha256 and m.edits[GATE].result_sha256 is None
    merge([a, b], tmp_path / "m.safetensors")
    assert Patch.load(tmp_path / "m.safetensors").id == m.id
    foreign = patch_of(edit(other, GATE, [0, 1], rand(2, 32, 8)), seed=2)
    with pytest.raises(BaseMismatchError, match="different bases.*--allow-different-base"):
        merge_patches([a, foreign])
    m2 = merge_patches([a, foreign], allow_different_base=True)
    assert m2.provenance["allow_different_base"] and m2.provenance["base_mismatches"] == [{"patch": foreign.id, "tensor": GATE}]


def test_tensors_edited_by_one_patch_keep_their_edit(base):
    ck = Checkpoint(base)
    a, b = patch_of(edit(ck, GATE, [0], rand(1, 32, 9))), patch_of(edit(ck, UP, [3], rand(1, 32, 10)), seed=1)
    m = merge_patches([a, b])
    assert m.edits[GATE] is a.edits[GATE] and m.edits[UP] is b.edits[UP] and m.parents == []
    assert [p["id"] for p in m.provenance["parts"]] == [a.id, b.id]


# ---- overlap policies -----------------------------------------------------------------------------------
def test_error_policy_names_tensor_and_rows(base):
    ck = Checkpoint(base)
    a, b = patch_of(edit(ck, GATE, [0, 1, 7], rand(3, 32, 11))), patch_of(edit(ck, GATE, [1, 7, 9], rand(3, 32, 12)), seed=1)
    with pytest.raises(MergeError, match=rf"both edit 2 row\(s\) of tensor {GATE} \(rows 1, 7\)") as ei:
        merge_patches([a, b], on_overlap="error", base=base)
    assert ei.value.rows == [1, 7] and ei.value.exit_code == MergeError.exit_code


def test_last_policy_takes_the_last_edit_of_each_row(base):
    ck = Checkpoint(base)
    da, db = rand(2, 32, 13), rand(2, 32, 14)
    a, b = patch_of(edit(ck, GATE, [0, 1], da)), patch_of(edit(ck, GATE, [1, 2], db), seed=1)
    e = merge_patches([a, b], on_overlap="last", weights=[1, 0.5], base=base).edits[GATE]
    expected = np.stack([da[0], (db[0].astype(np.float64) * 0.5).astype(np.float32), (db[1] * np.float32(0.5))])
    assert np.array_equal(e.deltas(), expected)


def test_replacements_under_each_policy(base):
    ck = Checkpoint(base)
    raw = ck.read_rows(GATE, np.array([0, 1]))
    vals = raw.view(np.uint16) ^ 1
    r = patch_of(edit(ck, GATE, [0, 1], values=vals))
    d = patch_of(edit(ck, GATE, [1, 2], rand(2, 32, 15)), seed=1)
    with pytest.raises(MergeError, match="replaces them whole.*--on-overlap last"):
        merge_patches([r, d], base=base)
    e = merge_patches([d, r], on_overlap="last", base=base).edits[GATE]  # r wins rows 0, 1; d keeps row 2
    assert e.encoding == "replace" and np.array_equal(e.values[:2], vals)
    with pytest.raises(MergeError, match="cannot be scaled"):
        merge_patches([d, r], on_overlap="last", weights=[1, 2], base=base)
    d2 = patch_of(edit(ck, GATE, [5], rand(1, 32, 16)), seed=2)
    c = combine_edits([Part(r.edits[GATE]), Part(d.edits[GATE])], on_overlap="last")
    with pytest.raises(MergeError, match="mix rows replaced whole"):
        to_edit(c, "0" * 64)  # merge_patches always has the base here: different row sets need it
    m = merge_patches([r, d2], base=base)  # disjoint: sum is fine, all rows written as replacements
    assert m.edits[GATE].encoding == "replace" and m.edits[GATE].rows.tolist() == [0, 1, 5]


def test_chain_given_child_first_is_refused(base):
    ck = Checkpoint(base)
    p = patch_of(edit(ck, GATE, [0], rand(1, 32, 18)))
    c = patch_of(edit(ck, UP, [0], rand(1, 32, 19)), parents=[p.id])
    with pytest.raises(MergeError, match=f"list {p.id[:12]} before it"):
        merge_patches([c, p])
    assert merge_patches([p, c]).parents == []


def test_bad_weights_and_duplicates(base):
    ck = Checkpoint(base)
    a = patch_of(edit(ck, GATE, [0], rand(1, 32, 20)))
    with pytest.raises(MergeError, match="one per patch"):
        merge_patches([a], weights=[1, 2])
    with pytest.raises(MergeError, match="given twice"):
        merge_patches([a, a])


# ---- the algebra of sum, on the float32 deltas ------------------------------------------------------------
def dense(rows, delta) -> TensorEdit:
    return TensorEdit("t", (8, 4), "F32", np.asarray(rows, dtype=np.int64), "dense", "0" * 64, delta=np.asarray(delta, dtype=np.float32))


def combined_edit(edits, weights=None) -> TensorEdit:
    c = combine_edits([Part(e, w, str(i)) for i, (e, w) in enumerate(zip(edits, weights or [1.0] * len(edits)))])
    return dense(c.rows, c.delta)


def by_row(e: TensorEdit) -> dict[int, bytes]:
    return {int(r): e.delta[i].tobytes() for i, r in enumerate(e.rows)}


# float32 values with exponents in [-8, 8] (or zero): three of them add exactly in float64
narrow = hs.one_of(hs.just(0.0), hs.floats(2.0**-8, 2.0**8, width=32), hs.floats(-(2.0**8), -(2.0**-8), width=32))
anyf32 = hs.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=False)


@hs.composite
def edits(draw, values=narrow, n=3):
    out = []
    for _ in range(n):
        rows = sorted(draw(hs.sets(hs.integers(0, 7), min_size=1, max_size=8)))
        out.append(dense(rows, [[draw(values) for _ in range(4)] for _ in rows]))
    return out


@settings(max_examples=60, deadline=None)
@given(edits(values=anyf32, n=2))
def test_sum_of_two_is_commutative_bit_for_bit(es):
    assert by_row(combined_edit(es)) == by_row(combined_edit(es[::-1]))


@settings(max_examples=60, deadline=None)
@given(edits(), hs.lists(hs.sampled_from([1.0, -1.0, 0.5, 2.0]), min_size=3, max_size=3))
def test_sum_of_many_is_order_free_when_the_float64_sum_is_exact(es, ws):
    ref = by_row(combined_edit(es, ws))
    for perm in itertools.permutations(range(3)):
        assert by_row(combined_edit([es[i] for i in perm], [ws[i] for i in perm])) == ref


@settings(max_examples=60, deadline=None)
@given(edits(values=hs.integers(-(2**20), 2**20).map(lambda k: k / 1024.0)))
def test_sum_is_associative_when_partial_sums_are_representable(es):
    a, b, c = es
    left = combined_edit([combined_edit([a, b]), c])
    right = combined_edit([a, combined_edit([b, c])])
    assert by_row(left) == by_row(right) == by_row(combined_edit(es))


@settings(max_examples=100, deadline=None)
@given(edits(values=anyf32))
def test_sum_groupings_differ_by_at_most_the_rounding_bound(es):
    a, b, c = es
    left, right = by_row(combined_edit([combined_edit([a, b]), c])), by_row(combined_edit([a, combined_edit([b, c])]))
    full = {k: np.zeros(4) for k in left}
    parts = [{k: np.zeros(4) for k in left} for _ in range(3)]
    for i, e in enumerate(es):
        for r, row in zip(e.rows, e.delta.astype(np.float64)):
            full[int(r)] += row
            parts[i][int(r)] = row
    u = 2.0**-24
    for r in left:
        x = np.frombuffer(left[r], np.float32).astype(np.float64)
        y = np.frombuffer(right[r], np.float32).astype(np.float64)
        ab, bc = parts[0][r] + parts[1][r], parts[1][r] + parts[2][r]
        bound = u * (np.abs(ab) + np.abs(bc) + 2 * np.abs(full[r])) * (1 + 4 * u) + 2 * 2.0**-149
        assert np.all(np.abs(x - y) <= bound)


# ---- merged vs applied in order -----------------------------------------------------------------------------
def bf16_bits(t) -> np.ndarray:
    import torch

    return t.reshape(-1, t.shape[-1]).view(torch.int16).numpy().view(np.uint16)


def ordered_bits(u16: np.ndarray) -> np.ndarray:
    u = u16.astype(np.int64)
    return np.where(u & 0x8000, -(u & 0x7FFF), u)


def test_merged_equals_sequential_up_to_the_intermediate_rounding(base, tmp_path, capsys):
    """Parent A on the base, child B on base+A (rows 10..29 overlap A's 0..19); A then B vs merge(A, B)."""
    ck = Checkpoint(base)
    a = patch_of(edit(ck, GATE, np.arange(20), rand(20, 32, 21, scale=0.03)), edit(ck, UP, [1, 2], rand(2, 32, 22)))
    ops.apply([a], base, tmp_path / "a")
    ck_a = Checkpoint(tmp_path / "a")
    b = patch_of(edit(ck_a, GATE, np.arange(10, 30), rand(20, 32, 23, scale=0.03)), parents=[a.id], seed=1)
    ops.apply([b], tmp_path / "a", tmp_path / "seq")
    m = merge_patches([a, b], base=base)
    assert m.parents == [] and m.edits[GATE].rows.tolist() == list(range(30))
    ops.apply([m], base, tmp_path / "merged")
    seq, mer = load_tensors(tmp_path / "seq"), load_tensors(tmp_path / "merged")
    for name in seq:
        if name != GATE:
            assert seq[name].equal(mer[name]), name  # untouched, or touched by one part: bit for bit
    bits = {k: bf16_bits(t[GATE]) for k, t in (("seq", seq), ("merged", mer), ("a", load_tensors(tmp_path / "a")))}
    ulps = np.abs(ordered_bits(bits["seq"]) - ordered_bits(bits["merged"]))
    assert not ulps[:10].any() and not ulps[20:].any()  # rows edited by one part only: identical
    # the bound of docs/merge.md: |seq - merged| <= ulp(y1)/2 + ulp(seq)/2 + ulp(merged)/2, y1 = A's result
    vals = {k: to_float(v, "BF16").astype(np.float64) for k, v in bits.items()}
    spacing = {k: ulp(v, "BF16") for k, v in vals.items()}
    err = np.abs(vals["seq"] - vals["merged"])[10:20]
    bound = (spacing["a"] + spacing["seq"] + spacing["merged"])[10:20] / 2 * (1 + 2.0**-20)
    assert np.all(err <= bound)
    overlap = ulps[10:20]
    n_diff, n_big, max_ulp = int((overlap > 0).sum()), int((overlap > 1).sum()), int(overlap.max())
    with capsys.disabled():
        print(f"\n[merge vs sequential, bf16] {n_diff} of {overlap.size} overlapped elements differ "
              f"({n_big} by more than 1 ulp), max {max_ulp} ulp of the result, max abs {err.max():.3g}, "
              f"max error / bound {float((err / bound).max()):.2f}")
    assert n_diff < overlap.size // 2 and (overlap <= 1).mean() > 0.9


# ---- format v1.1: lowrank factors stack ---------------------------------------------------------------------
def lowrank_edit(ck: Checkpoint, name: str, rows, r: int, seed: int, exceptions=None) -> TensorEdit:
    info = ck.info(name)
    rng = np.random.default_rng(seed)
    rows = np.asarray(rows, dtype=np.int64)
    u = rng.standard_normal((len(rows), r)).astype(np.float32)
    v = (rng.standard_normal((r, info.n_cols)) * 0.05).astype(np.float32)
    return make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows), u=u, v=v, exceptions=exceptions)


def test_lowrank_parts_stack_into_one_lowrank_edit(ckpts, tmp_path):
    from patchkit.core.encodings import lowrank_delta

    ck = Checkpoint(ckpts[("bf16", False)])
    a = lowrank_edit(ck, GATE, [1, 4, 7], 2, 0)
    b = lowrank_edit(ck, GATE, [4, 9], 1, 1)
    f = edit(ck, GATE, [0, 9], delta=np.full(32, 0.25, np.float32))  # factored: rank 1
    pa, pb, pf = (Patch(edits={e.name: e}, provenance={"method": "t", "params": {"i": i}}) for i, e in enumerate((a, b, f)))
    m = merge_patches([pa, pb, pf], weights=[1.0, 0.5, 1.0], base=ck)
    e = m.edits[GATE]
    assert e.encoding == "lowrank" and e.rank == 4 and e.rows.tolist() == [0, 1, 4, 7, 9]
    # U is each part's (weighted) U scattered to the union's rows; V the parts' V stacked in order
    assert np.array_equal(e.v, np.concatenate([a.v, b.v, f.direction[None, :]]))
    assert np.array_equal(e.u[[1, 2, 3], :2], a.u) and np.array_equal(e.u[[2, 4], 2:3], np.float32(0.5) * b.u)
    assert not e.u[[0, 4], :2].any() and e.u[[0, 4], 3].tolist() == [1.0, 1.0]
    base = ck.read_rows(GATE, e.rows)
    from patchkit.core.dtypes import add_to_rows

    assert np.array_equal(e.new_rows(base), add_to_rows(base, "BF16", delta=lowrank_delta(e.u, e.v))[0])
    out = ops.apply(m, ckpts[("bf16", False)], tmp_path / "out")
    assert out  # applies
    last = merge_patches([pa, pb], on_overlap="last", base=ck).edits[GATE]
    assert last.rows.tolist() == [1, 4, 7, 9]
    assert not last.u[1, :2].any() and last.u[1, 2] == b.u[0, 0]  # row 4: the later part alone


def test_exceptions_and_scale_edits_are_not_summed(ckpts):
    ck = Checkpoint(ckpts[("bf16", False)])
    a = lowrank_edit(ck, GATE, [1, 4], 1, 0, exceptions=(np.array([3]), np.array([0x3F80], np.uint16)))
    b = lowrank_edit(ck, GATE, [4, 9], 1, 1)
    pa, pb = (Patch(edits={e.name: e}, provenance={"method": "t", "params": {"i": i}}) for i, e in enumerate((a, b)))
    with pytest.raises(MergeError, match="carries exceptions"):
        merge_patches([pa, pb], base=ck)
    info = ck.info(GATE)
    s = make_edit(GATE, info.shape, info.dtype, np.array([4]), ck.read_rows(GATE, np.array([4])), gamma=np.array([0.5], np.float32))
    with pytest.raises(MergeError, match="scale edit"):
        merge_patches([Patch(edits={GATE: s}, provenance={"method": "s"}), pb], base=ck)
    assert merge_patches([pa], base=ck).edits[GATE] is a  # alone and unweighted: kept as it is
