"""patchkit.evaluation.tune: the budget is respected on a constructed case with a known answer, every reported
number is what `evaluate` measures for the same patch, the ranking is computed once and sliced
exactly as compute selects, runs are reproducible byte for byte, and the numbers travel in the patch.

The model is a tiny Llama trained for a moment on the benign sentences, so that its perplexity on
them is near 1 and any edit raises it: perplexity grows with alpha, and the largest alpha within a
budget is known from measuring each grid point independently with `evaluate`.
"""

from __future__ import annotations

import json

import helpers
import numpy as np
import pytest
import torch

from patchkit.core.checkpoint import Checkpoint
from patchkit.core.patchfile import Patch
from patchkit.errors import DataError, OutputExistsError, ProbeError
from patchkit.evaluation import judges as J
from patchkit.evaluation.evaluate import edit_norm, evaluate
from patchkit.evaluation.tune import (
    NoFeasiblePointError,
    Point,
    choose,
    parse_budget,
    render_tune_table,
    tune,
)
from patchkit.method.compute import compute_patch, rank_rows

PROMPTS = ["the people", "a cruel group of", "good friend and", "the city at night", "hate is", "the dog and the cat"]
BENIGN = ["the river is calm and blue", "a good book of music", "the house on the road", "we love the green tree"]
NEVER = J.lexical(["zzzz"])  # scores every text 0: all points tie, so the largest edit within budget wins
COMMON = {"prompts": PROMPTS, "benign": BENIGN, "max_new_tokens": 4, "batch_size": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine they slow torch down a hundredfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from patchkit.method.activations import extract_features
    from patchkit.method.probe import save_probe, train_probe

    root = tmp_path_factory.mktemp("tune")
    torch.manual_seed(0)
    model = helpers.make_model(helpers.llama_config(), seed=3, dtype=torch.float32).train()
    tok = helpers.make_tokenizer()
    enc = tok(BENIGN, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ck = helpers.save_checkpoint(model.to(torch.bfloat16), root / "model")
    texts = [f"{a} {b}" for a in ("hate", "cruel", "awful", "hurt") for b in ("people", "the group", "dog now")]
    texts += [f"{a} {b}" for a in ("love", "kind", "nice", "help") for b in ("people", "the group", "dog now")]
    feats = extract_features(model.float(), tok, texts, layer=-1, progress=False)
    p = train_probe(feats, [1] * 12 + [0] * 12, epochs=30, layer=-1, model_fingerprint=Checkpoint(ck).fingerprint(),
                    data_hash="d" * 64, label_names=("ok", "toxic"))
    return {"ckpt": ck, "probe": save_probe(p, root / "probe.safetensors"), "root": root}


def test_parse_budget():
    assert parse_budget("5%") == pytest.approx(0.05) and parse_budget("0.05") == 0.05 and parse_budget(0.1) == 0.1
    assert parse_budget("150%") == pytest.approx(1.5) and parse_budget(None) is None
    for bad in ("5", "abc", "-1%", "nan%"):
        with pytest.raises(DataError):
            parse_budget(bad)


def test_ranking_is_computed_once_and_sliced_as_compute_selects(case):
    ranking = rank_rows(case["ckpt"], case["probe"], 100)
    assert list(ranking["scores"]) == sorted(ranking["scores"], reverse=True)
    for k in (1, 7, 40, 100):
        want = compute_patch(case["ckpt"], case["probe"], top_k=k)
        t, n = ranking["tensor_idx"][:k], ranking["neurons"][:k]
        got = {ranking["names"][i]: np.sort(n[t == i]) for i in np.unique(t)}
        assert sorted(got) == sorted(want.edits)
        for name, e in want.edits.items():
            assert np.array_equal(got[name], e.rows)


def test_choose_goal_and_ties():
    def pt(k, a, score, norm):
        return Point(k, 0.1, a, stage="grid", perplexity=1.0, ppl_increase=0.0, kl=0.0, edit_norm=norm, within_budget=True,
                     judged=True, score=score)

    pts = [pt(10, 1.0, 0.5, 1.0), pt(10, 2.0, 0.2, 2.0), pt(40, 1.0, 0.2, 3.0), pt(40, 2.0, 0.9, 4.0)]
    assert (choose(pts, "lower").k, choose(pts, "lower").alpha) == (40, 1.0)  # tie at 0.2: the larger edit
    assert (choose(pts, "higher").k, choose(pts, "higher").alpha) == (40, 2.0)


def _independent_ppl(case, k, alphas):
    """Perplexity increase of compute_patch(top_k=k, alpha=a), measured by evaluate (not by tune)."""
    patches = [compute_patch(case["ckpt"], case["probe"], top_k=k, alpha=a) for a in alphas]
    r = evaluate(case["ckpt"], patches, prompts=PROMPTS[:1], benign=BENIGN, judges=[NEVER], max_new_tokens=1, batch_size=3)
    base = r.conditions[0].capability["perplexity"]
    return {a: c.capability["perplexity"] / base - 1 for a, c in zip(alphas, r.conditions[1:])}, r, patches


def test_budget_respected_known_answer(case):
    alphas = [0.5, 1.0, 2.0, 4.0]
    inc, ev, patches = _independent_ppl(case, 40, alphas)
    assert [inc[a] for a in alphas] == sorted(inc[a] for a in alphas) and inc[4.0] > 0.2  # the construction holds
    budget = (inc[1.0] + inc[2.0]) / 2  # the known answer: alpha 1 is the largest grid alpha within budget
    r = tune(case["ckpt"], case["probe"], ks=[40], alphas=alphas, max_ppl_increase=budget, judge=NEVER, refine=0, **COMMON)
    assert (r.best.k, r.best.alpha, r.best.stage) == (40, 1.0, "grid")
    assert r.base["perplexity"] == pytest.approx(ev.conditions[0].capability["perplexity"], rel=1e-9)
    for p, c, patch in zip(r.table, ev.conditions[1:], patches):  # tune's numbers are evaluate's
        assert p.perplexity == pytest.approx(c.capability["perplexity"], rel=1e-9)
        assert p.kl == pytest.approx(c.capability["kl"], rel=1e-6, abs=1e-12)
        assert p.edit_norm == pytest.approx(edit_norm(patch), rel=1e-9)
    want = compute_patch(case["ckpt"], case["probe"], top_k=40, alpha=1.0)
    assert {n: e.result_sha256 for n, e in r.patch.edits.items()} == {n: e.result_sha256 for n, e in want.edits.items()}
    assert r.patch.provenance["params"] == want.provenance["params"]

    # with refinement: bisection between 1 and 2, and the chosen alpha is the largest measured within budget
    r = tune(case["ckpt"], case["probe"], ks=[40], alphas=alphas, max_ppl_increase=budget, judge=NEVER, refine=3, **COMMON)
    ok = [p.alpha for p in r.table if p.within_budget]
    over = [p.alpha for p in r.table if not p.within_budget]
    assert r.best.alpha == max(ok) and 1.0 <= r.best.alpha < 2.0
    assert min(a for a in over if a > r.best.alpha) - r.best.alpha == pytest.approx(1.0 / 2**3)
    refined = [p.alpha for p in r.table if p.stage == "refine"]
    assert len(refined) == 3 and 1.5 in refined and all(1.0 < x < 2.0 for x in refined)
    for p in r.table:  # every reported point is consistent with its own numbers
        assert p.ppl_increase == pytest.approx(p.perplexity / r.base["perplexity"] - 1, rel=1e-12)
        assert p.within_budget == (p.ppl_increase <= budget) and p.over == ([] if p.within_budget else ["ppl"])
        assert p.judged <= p.within_budget and (p.score is None) == (not p.judged)
        if p.judged:
            assert p.score == p.metrics["mean"] == 0.0 and p.metrics["n_prompts"] == len(PROMPTS)
    assert {p.alpha for p in r.table if p.judged} == {0.5, 1.0, r.best.alpha}  # grid within budget + largest refined
    assert not r.improves_on_base  # a judge that sees nothing cannot show an improvement
    text = render_tune_table(r)
    assert "refine" in text and "skipped" in text and f"alpha {r.best.alpha:g}" in text


def test_kl_budget_and_goal_higher(case):
    r = tune(case["ckpt"], case["probe"], ks=[10, 40], alphas=[0.5, 2.0], max_kl=0.05, refine=1, goal="higher",
             judge=J.lexical(["the", "a"]), **COMMON)
    for p in r.table:
        assert p.within_budget == (p.kl <= 0.05) and ("kl" in p.over) != p.within_budget
    judged = [p for p in r.table if p.judged]
    assert r.best.score == max(p.score for p in judged) and r.settings["goal"] == "higher"


def test_budget_nothing_meets_is_a_clear_error_and_writes_nothing(case, tmp_path):
    out = tmp_path / "never.safetensors"
    with pytest.raises(NoFeasiblePointError, match="no \\(K, alpha\\) point is within the budget") as e:
        tune(case["ckpt"], case["probe"], ks=[40], alphas=[8.0, 16.0], max_ppl_increase="0.01%", refine=1, judge=NEVER,
             output=out, **COMMON)
    assert "\n" not in str(e.value) and len(e.value.table) == 3 and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(case, tmp_path):
    with pytest.raises(DataError, match="budget"):
        tune(case["ckpt"], case["probe"], ks=[10], **COMMON)
    with pytest.raises(DataError, match="not both"):
        tune(case["ckpt"], case["probe"], ks=[10], fractions=[0.1], max_kl=1.0, **COMMON)
    with pytest.raises(DataError, match="non-zero"):
        tune(case["ckpt"], case["probe"], ks=[10], alphas=[0.0, 1.0], max_kl=1.0, **COMMON)
    with pytest.raises(DataError, match="between 1 and"):
        tune(case["ckpt"], case["probe"], ks=[10_000], max_kl=1.0, **COMMON)
    with pytest.raises(ProbeError, match="own edit"):
        tune(case["ckpt"], case["probe"], ks=[10], max_kl=1.0, judge=f"probe:{case['probe']}", **COMMON)
    (tmp_path / "x.safetensors").write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        tune(case["ckpt"], case["probe"], ks=[10], max_kl=1.0, output=tmp_path / "x.safetensors", **COMMON)
    assert (tmp_path / "x.safetensors").read_bytes() == b"keep"


def test_deterministic_bytes_and_eval_shown_by_inspect(case, tmp_path, cli_runner):
    kw = {"fractions": [0.05, 0.2], "alphas": [0.5, 1.0, 4.0], "max_ppl_increase": "5%", "refine": 2, "seed": 7,
          "judge": J.lexical(["hate", "cruel", "awful"]), "description": "tuned", **COMMON}
    a = tune(case["ckpt"], case["probe"], output=tmp_path / "a.safetensors", **kw)
    b = tune(case["ckpt"], case["probe"], output=tmp_path / "b.safetensors", **kw)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.patch.id == b.patch.id and a.timing["points"] == len(a.table)
    loaded = Patch.load(tmp_path / "a.safetensors")
    ev = loaded.evaluation
    assert ev["tool"] == "patchkit tune" and ev["chosen"]["alpha"] == a.best.alpha and ev["chosen"]["k"] == a.best.k
    assert len(ev["table"]) == len(a.table) and ev["settings"]["max_ppl_increase"] == pytest.approx(0.05)
    assert ev["base"]["capability"]["perplexity"] == a.base["perplexity"] and "timing" not in ev
    assert ev["patched"]["capability"]["perplexity"] == a.best.perplexity and loaded.description == "tuned"
    assert loaded.provenance["params"]["k"] == a.best.k and loaded.provenance["params"]["seed"] == 7
    r = cli_runner("inspect", tmp_path / "a.safetensors", "--json")
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)["eval"]
    assert shown == ev and shown["table"][0]["k"] == min(p.k for p in a.table)
    assert render_tune_table(ev) == render_tune_table(a)  # the table renders from the stored numbers alone


def test_cli_tune_writes_the_chosen_patch_and_refuses_bad_flags(case, tmp_path, cli_runner):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(BENIGN) + "\n")
    out = tmp_path / "t.safetensors"
    args = ["tune", case["ckpt"], "--probe", case["probe"], "--prompts", prompts, "--benign", benign,
            "--fraction", "0.05,0.2", "--alpha", "0.5,1", "--refine", "1", "--max-ppl-increase", "5%",
            "--max-new-tokens", "3", "--batch-size", "4"]
    r = cli_runner(*args, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert Patch.load(out).id == d["patch_id"] and Patch.load(out).evaluation["chosen"] == d["chosen"]
    again = cli_runner(*args, "-o", out)
    assert again.exit_code == 7 and "already exists" in again.output
    both = cli_runner(*args, "--top-k", "5", "-o", tmp_path / "x.safetensors")
    assert both.exit_code == 2 and "not both" in both.output
    nobudget = cli_runner("tune", case["ckpt"], "--probe", case["probe"], "-o", tmp_path / "y.safetensors")
    assert nobudget.exit_code == 2 and "budget" in nobudget.output
