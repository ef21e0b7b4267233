"""Row selection: sign convention, streaming top-K, strategies and controls."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchkit.errors import DataError, UnsupportedError
from patchkit.method.select import (
    PAPER_FRACTION,
    Strategy,
    edit_direction,
    edit_directions,
    gate_proj_name,
    layer_of,
    paper_k,
    score_rows,
    select_rows,
)


def test_paper_k_matches_the_paper_and_rounds_half_up():
    assert paper_k(352256) == 16384
    assert paper_k(10, 0.25) == 3  # 2.5 -> 3
    assert paper_k(10, 0.24) == 2  # 2.4 -> 2
    assert paper_k(3) == 1  # never zero
    assert paper_k(30 * 1536) == round(30 * 1536 * PAPER_FRACTION)
    with pytest.raises(ValueError):
        paper_k(0)


def test_rows_most_anti_aligned_with_the_direction_are_chosen():
    d = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rows = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # cos +1
            [-3.0, 0.0, 0.0, 0.0],  # cos -1  (most anti-aligned, large norm must not matter)
            [0.0, 1.0, 0.0, 0.0],  # cos 0
            [-1.0, 1.0, 0.0, 0.0],  # cos -0.707
            [-0.1, 0.0, 0.0, 0.0],  # cos -1
            [0.0, 0.0, 0.0, 0.0],  # zero row: score 0
        ]
    )
    scores = score_rows(rows, d)
    assert torch.allclose(scores, torch.tensor([-1.0, 1.0, 0.0, 0.70710677, 1.0, 0.0]), atol=1e-6)
    assert select_rows({"a": rows}, d, k=2)["a"].tolist() == [1, 4]
    assert select_rows({"a": rows}, d, k=3)["a"].tolist() == [1, 3, 4]
    # flipping the direction flips the choice
    assert select_rows({"a": rows}, -d, k=1)["a"].tolist() == [0]


def test_global_top_k_spans_tensors_and_omits_untouched_ones():
    d = torch.tensor([0.0, 1.0])
    a = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    b = torch.tensor([[0.0, -2.0], [1.0, 0.0], [0.0, -0.5]])
    c = torch.tensor([[0.0, 5.0]])
    out = select_rows({"a": a, "b": b, "c": c}, d, k=3)
    assert list(out) == ["a", "b"]
    assert out["a"].tolist() == [1] and out["b"].tolist() == [0, 2]
    assert all(v.dtype == torch.long for v in out.values())


def test_ties_are_broken_by_tensor_order_then_row_index():
    d = torch.tensor([1.0, 0.0])
    same = torch.tensor([[-1.0, 0.0]] * 4)
    out = select_rows([("x", same), ("y", same)], d, k=6)
    assert out["x"].tolist() == [0, 1, 2, 3] and out["y"].tolist() == [0, 1]
    out = select_rows([("x", same), ("y", same)], d, k=3)
    assert out == {"x": out["x"]} and out["x"].tolist() == [0, 1, 2]


def _brute_force(tensors, d, k):
    scores = torch.cat([score_rows(t, d) for t in tensors])
    pos = torch.cat([torch.stack([torch.full((t.shape[0],), i), torch.arange(t.shape[0])], 1) for i, t in enumerate(tensors)])
    # sort by (score desc, tensor asc, row asc) with Python's sort as an independent reference
    keyed = sorted(range(len(scores)), key=lambda j: (-scores[j].item(), pos[j, 0].item(), pos[j, 1].item()))[:k]
    out = {}
    for j in keyed:
        out.setdefault(f"t{pos[j, 0].item()}", []).append(pos[j, 1].item())
    return {name: sorted(rows) for name, rows in out.items()}


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=5),
    hidden=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**16),
    k_frac=st.floats(min_value=0.01, max_value=1.0),
    quantize=st.booleans(),
)
def test_streaming_top_k_equals_brute_force(shapes, hidden, seed, k_frac, quantize):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn((n, hidden), generator=gen) for n in shapes]
    if quantize:  # few distinct values: many exact ties
        tensors = [t.round().clamp(-1, 1) for t in tensors]
    d = torch.randn(hidden, generator=gen)
    total = sum(shapes)
    if total == 0:
        return
    k = max(1, int(total * k_frac))

    def stream():  # one tensor at a time, as a loader would
        for i, t in enumerate(tensors):
            yield f"t{i}", t

    got = {name: rows.tolist() for name, rows in select_rows(stream(), d, k).items()}
    assert got == _brute_force(tensors, d, k)
    assert sum(len(v) for v in got.values()) == k


def test_layer_matched_scores_each_tensor_with_its_own_direction():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    names = [gate_proj_name(0), gate_proj_name(1)]
    dirs = {names[0]: torch.tensor([-1.0, 0.0]), names[1]: torch.tensor([0.0, -1.0])}
    out = select_rows({n: rows for n in names}, dirs, k=2, strategy="layer-matched")
    assert out[names[0]].tolist() == [0] and out[names[1]].tolist() == [1]
    # the paper strategy with one direction would pick row 0 of both
    paper = select_rows({n: rows for n in names}, torch.tensor([-1.0, 0.0]), k=2, strategy=Strategy.PAPER)
    assert paper[names[0]].tolist() == [0] and paper[names[1]].tolist() == [0]
    with pytest.raises(DataError):
        select_rows({n: rows for n in names}, torch.tensor([1.0, 0.0]), k=1, strategy="layer-matched")
    with pytest.raises(DataError):
        select_rows({n: rows for n in names}, {names[0]: dirs[names[0]]}, k=1, strategy="layer-matched")


def test_random_rows_is_seeded_uniform_and_has_exactly_k_rows():
    counts = {"a": 50, "b": 30, "c": 20}
    one = select_rows(counts, torch.ones(4), k=40, strategy="random-rows", seed=3)
    again = select_rows({n: torch.zeros(c, 4) for n, c in counts.items()}, torch.ones(4), k=40, strategy="random-rows", seed=3)
    other = select_rows(counts, torch.ones(4), k=40, strategy="random-rows", seed=4)
    assert {n: r.tolist() for n, r in one.items()} == {n: r.tolist() for n, r in again.items()}
    assert {n: r.tolist() for n, r in one.items()} != {n: r.tolist() for n, r in other.items()}
    assert sum(r.numel() for r in one.values()) == 40
    for name, rows in one.items():
        assert rows.unique().numel() == rows.numel() and 0 <= rows.min() and rows.max() < counts[name]
        assert torch.equal(rows, rows.sort().values)
    # uniform: every row is about equally likely over many seeds
    hits = torch.zeros(100)
    for s in range(300):
        out = select_rows(counts, torch.ones(4), k=40, strategy="random-rows", seed=s)
        offset = {"a": 0, "b": 50, "c": 80}
        for name, rows in out.items():
            hits[rows + offset[name]] += 1
    assert hits.min() > 0.4 * 300 * 0.4 and hits.max() < 1.6 * 300 * 0.4
    with pytest.raises(DataError):
        select_rows(counts, torch.ones(4), k=101, strategy="random-rows")


def test_random_direction_keeps_paper_rows_and_norm_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(30, 8, generator=gen)
    d = torch.randn(8, generator=gen) * 3
    paper = select_rows({"w": rows}, d, k=5, strategy="paper")
    control = select_rows({"w": rows}, d, k=5, strategy="random-direction")
    assert torch.equal(paper["w"], control["w"])
    r1, r2, r3 = (edit_direction(d, "random-direction", seed=s) for s in (1, 1, 2))
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    assert torch.isclose(r1.norm(), d.norm(), rtol=1e-5)
    assert abs(torch.nn.functional.cosine_similarity(r1, d, dim=0)) < 0.99
    assert torch.equal(edit_direction(d, "paper"), d)
    per = edit_directions(["x", "y"], {"x": d, "y": 2 * d}, "random-direction", seed=1)
    assert torch.isclose(per["y"].norm(), 2 * d.norm(), rtol=1e-5) and not torch.equal(per["x"], per["y"] / 2)
    same = edit_directions(["x", "y"], d, "random-direction", seed=1)
    assert torch.equal(same["x"], same["y"]) and torch.equal(same["x"], r1)
    assert torch.equal(edit_directions(["x"], d, "random-rows")["x"], d)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(DataError):
        score_rows(torch.ones(3, 4), torch.ones(5))
    with pytest.raises(DataError):
        score_rows(torch.ones(3, 4), torch.zeros(4))
    with pytest.raises(DataError):
        select_rows({"a": torch.ones(3, 4)}, torch.ones(4), k=4)
    with pytest.raises(ValueError):
        select_rows({"a": torch.ones(3, 4)}, torch.ones(4), k=1, strategy="nonsense")
    assert layer_of("model.layers.12.mlp.gate_proj.weight") == 12
    with pytest.raises(UnsupportedError):
        layer_of("lm_head.weight")


def test_bf16_targets_are_scored_in_float32():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(64, 16, generator=gen)
    d = torch.randn(16, generator=gen)
    expected = select_rows({"w": rows.bfloat16().float()}, d, k=7)["w"]
    assert torch.equal(select_rows({"w": rows.bfloat16()}, d, k=7)["w"], expected)
