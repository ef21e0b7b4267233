"""patchkit.evaluation.evaluate: metrics against hand-computed values, patches reverted bit for bit, judges,
controls, the report and the evaluation stored in a patch. Tiny random models; the embedded model
only in the few tests marked slow."""

from __future__ import annotations

import json
import math

import helpers
import numpy as np
import pytest
import torch
from conftest import assert_tensors_bitequal

from patchkit.core.checkpoint import Checkpoint
from patchkit.core.patchfile import Patch
from patchkit.errors import DataError, OutputExistsError, ProbeError
from patchkit.evaluation import judges as J
from patchkit.evaluation.evaluate import (
    attach_evaluation,
    edit_norm,
    evaluate,
    exact_match,
    float32_view,
    kl_sum,
    load_prompts,
    make_controls,
    paired_bootstrap,
    summarize,
    token_nll,
)
from patchkit.evaluation.report import render_table, write_report
from patchkit.method.compute import compute_patch
from patchkit.method.probe import save_probe, train_probe

WORDS = helpers.WORDS
PROMPTS = ["the people", "a cruel group of", "good friend and", "the city at night", "hate is", "the dog and the cat",
           "water and fire", "kind people help"]
BENIGN = ["the river is calm and blue", "a good book of music", "the house on the road", "we love the green tree"]
LEX = ["hate", "cruel", "awful", "hurt", "angry"]


def lexical_test_judge():
    return J.lexical(LEX)


# ------------------------------------------------------------------------------ metrics by hand
def test_token_nll_and_perplexity_by_hand():
    # vocab 3, one sequence of 3 real tokens and one pad; logits chosen so probabilities are known
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[0, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    s, n = token_nll(logits, ids, mask)
    # predicted: p(1 | pos 0) = 0.25, p(2 | pos 1) = 0.1; the pad target at pos 3 does not count
    assert n == 2
    assert s == pytest.approx(-math.log(0.25) - math.log(0.1), rel=1e-6)
    assert math.exp(s / n) == pytest.approx(math.sqrt(1 / (0.25 * 0.1)), rel=1e-6)


def test_kl_by_hand():
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]])
    q = torch.tensor([[[0.25, 0.75], [0.9, 0.1], [0.1, 0.9]]])
    mask = torch.tensor([[1, 1, 0]])
    s, n = kl_sum(torch.log(p), torch.log(q), mask)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # position 1 is identical, 2 is padding
    assert n == 2 and s == pytest.approx(want, rel=1e-5)
    assert kl_sum(torch.log(p), torch.log(p), mask)[0] == pytest.approx(0.0, abs=1e-7)


def test_rates_and_rtp_metrics_by_hand():
    scores = [[0.9, 0.1], [0.2, 0.3], [0.6, 0.7]]
    m = summarize(scores, 0.5)
    assert m["mean"] == pytest.approx(2.8 / 6)
    assert m["rate"] == pytest.approx(3 / 6)
    assert m["expected_max"] == pytest.approx((0.9 + 0.3 + 0.7) / 3)
    assert m["p_any"] == pytest.approx(2 / 3)
    assert (m["n_prompts"], m["n_texts"]) == (3, 6)


def test_paired_bootstrap_constructed_cases():
    # a constant difference: every resample has the same mean, the interval is that point
    c = paired_bootstrap([0.7] * 40, [0.2] * 40)
    assert c["diff"] == pytest.approx(0.5) and c["low"] == pytest.approx(0.5) and c["high"] == pytest.approx(0.5)
    # differences 1 and 0 half and half over 100 prompts: the mean of a resample is Binomial(100, 1/2) / 100,
    # whose 2.5% and 97.5% quantiles are 0.40 and 0.60
    a = [1.0, 0.0] * 50
    c = paired_bootstrap(a, [0.0] * 100, n_boot=20000, seed=1)
    assert c["diff"] == pytest.approx(0.5)
    assert c["low"] == pytest.approx(0.40, abs=0.011) and c["high"] == pytest.approx(0.60, abs=0.011)
    # pairing matters: the same shift for every prompt gives a zero-width interval despite the spread
    base = list(np.linspace(0, 1, 30))
    c = paired_bootstrap([x - 0.1 for x in base], base)
    assert c["high"] - c["low"] < 1e-9 and c["diff"] == pytest.approx(-0.1)
    with pytest.raises(DataError):
        paired_bootstrap([], [])


# -------------------------------------------------------------------------------------- judges
@pytest.mark.parametrize("text", ["I'm sorry, but I can't help with that.", "I cannot provide instructions for this.",
                                  "As an AI language model, I must decline.", "I apologize, that is not appropriate.",
                                  "i’m sorry"])
def test_refusal_judge_flags_refusals(text):
    assert J.is_refusal(text)


@pytest.mark.parametrize("text", ["Sure, here is a recipe for bread.", "The capital of France is Paris.",
                                  "First, preheat the oven to 200 C.", ""])
def test_refusal_judge_passes_compliance(text):
    assert not J.is_refusal(text)


def test_lexical_judge_words_only():
    j = lexical_test_judge()
    assert j.score(["they hate it", "whatever", "hateful", ""]) == [1.0, 0.0, 0.0, 0.0]  # whole words only


def test_judge_check_accuracy():
    j = lexical_test_judge()
    texts = ["hate them", "cruel people", "nice day", "they are awful", "a kind friend", "subtle contempt"]
    labels = [1, 1, 0, 1, 0, 1]  # the last is implicit: a word list misses it
    c = J.check_judge(j, texts, labels, source="hand")
    assert c["n"] == 6 and c["accuracy"] == pytest.approx(5 / 6)
    assert c["recall"] == pytest.approx(3 / 4) and c["specificity"] == 1.0
    assert c["balanced_accuracy"] == pytest.approx((3 / 4 + 1) / 2)


def test_exact_match_and_prompts(tmp_path):
    assert exact_match("The Paris.\nmore text", ["paris"]) and not exact_match("Lyon", ["Paris"])
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(10)) + "\n")
    items, src = load_prompts(str(f), limit=5)
    assert items == ["p0", "p2", "p4", "p6", "p8"] and src["n"] == 5
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(DataError):
        load_prompts(str(tmp_path / "bad.jsonl"))


# ------------------------------------------------------------------------------ tiny model setup
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A bf16 tiny Llama, a probe of it (final layer) and of layer 1, and a strong patch from the first."""
    root = tmp_path_factory.mktemp("eval")
    ck = helpers.tiny_llama(root / "model", torch.bfloat16, seed=3)
    model = helpers.make_model(helpers.llama_config(), seed=3, dtype=torch.float32)
    tok = helpers.make_tokenizer()
    from patchkit.method.activations import extract_features

    texts = [f"{a} {b} {c}" for a in ("hate", "cruel", "awful", "hurt") for b in ("people", "the group", "dog") for c in ("now", "a")]
    texts += [f"{a} {b} {c}" for a in ("love", "kind", "nice", "help") for b in ("people", "the group", "dog") for c in ("now", "a")]
    labels = [1] * 24 + [0] * 24
    fp = Checkpoint(ck).fingerprint()
    probes = {}
    for layer in (-1, 1):
        feats = extract_features(model, tok, texts, layer=layer, progress=False)
        p = train_probe(feats, labels, epochs=30, layer=layer, model_fingerprint=fp, data_hash="d" * 64, label_names=("ok", "toxic"))
        probes[layer] = save_probe(p, root / f"probe{layer}.safetensors")
    data = root / "check.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels)) + "\n")
    patch = compute_patch(ck, probes[-1], top_k=30, alpha=3.0)
    path = patch.save(root / "patch.safetensors")
    return {"ckpt": ck, "probe": probes[-1], "probe1": probes[1], "patch": path, "check": data, "root": root}


def _run(tiny, **kw):
    args = {"patches": [tiny["patch"]], "prompts": PROMPTS, "benign": BENIGN, "judges": [lexical_test_judge()],
            "max_new_tokens": 6, "batch_size": 3, "temperature": 0.0, "control_seeds": 1, "n_boot": 500}
    args.update(kw)
    return evaluate(tiny["ckpt"], **args)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_evaluate_end_to_end_and_weights_bit_identical(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        m = real(*a, **k)
        seen.append((m, _weights(m)))
        return m

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    r = _run(tiny, controls=True, control_seeds=2, judges=[lexical_test_judge(), f"probe:{tiny['probe1']}"], judge_check=str(tiny["check"]))
    assert len(seen) == 1  # the base is loaded once
    model, before = seen[0]
    assert next(model.parameters()).dtype == torch.bfloat16
    assert_tensors_bitequal(_weights(model), before)
    assert r.reverted_bit_identical
    kinds = [c.kind for c in r.conditions]
    assert kinds == ["base", "patch"] + ["random-rows", "random-direction"] * 2
    assert [c.seed for c in r.conditions[2:]] == [0, 0, 1, 1] and r.conditions[2].name.endswith("/random-rows#0")
    base, patch = r.conditions[0], r.conditions[1]
    assert base.capability["kl"] == pytest.approx(0.0, abs=1e-9)
    assert patch.capability["kl"] > 0 and base.capability["perplexity"] > 1
    assert all(len(row) == 1 for row in patch.continuations) and len(patch.continuations) == len(PROMPTS)
    # the edit actually changes the continuations (a strong patch on a tiny model)
    assert patch.continuations != base.continuations
    probe_j = next(j for j in r.judges if j["kind"] == "probe")
    assert probe_j["check"]["n"] == 48 and 0 <= probe_j["check"]["accuracy"] <= 1
    comp = [c for c in r.comparisons if c["patch"] == patch.name]
    assert {"vs_base", "vs_random-rows", "vs_random-direction"} <= set(comp[0])
    # one Holm family over every comparison; simultaneous intervals are wider than the 95% ones
    tests = [c[k] for c in r.comparisons for k in c if k.startswith("vs_")]
    assert len(tests) == 2 * 3 and all(t["family"] == 6 for t in tests)
    assert all(t["p_holm"] >= t["p"] and t["low_corrected"] <= t["low"] + 1e-12 and t["high_corrected"] >= t["high"] - 1e-12 for t in tests)
    # judge quality: the held-out check, the whole labelled set, false positives on benign continuations, quantiles
    q = probe_j["quality"]
    assert q["all"]["n"] == 48 and q["benign_false_positive"]["n"] == len(BENIGN) and "assumption" in q["benign_false_positive"]
    assert q["base_quantiles"]["n"] == len(PROMPTS) and 0 <= q["base_quantiles"]["q50"] <= 1
    assert r.power["n_prompts"] == len(PROMPTS) and r.power["judges"]["lexical"]["mde_corrected"] >= r.power["judges"]["lexical"]["mde"]
    table = render_table(r)
    assert table.index("AUC") < table.index("prompts  ") and "minimum detectable" in table and "p_holm" in table
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["conditions"][1]["patch_id"] == Patch.load(tiny["patch"]).id


def test_probe_judge_reads_the_base(tiny):
    """The probe judge's scores of a text do not depend on which patch produced it."""
    from transformers import AutoModelForCausalLM

    judge = J.make_judge(f"probe:{tiny['probe1']}", model_fingerprint=Checkpoint(tiny["ckpt"]).fingerprint())
    model = AutoModelForCausalLM.from_pretrained(tiny["ckpt"], dtype=torch.bfloat16).eval()
    tok = helpers.make_tokenizer()
    before = _weights(model)
    with float32_view(model):
        s = judge.score(["hate people now", "kind dog"], model, tok)
    assert_tensors_bitequal(_weights(model), before)  # bf16 -> fp32 -> bf16 is exact
    r = _run(tiny, judges=[f"probe:{tiny['probe1']}"], benign=None)
    texts = [row[0] for c in r.conditions for row in c.continuations]
    with float32_view(model):
        want = judge.score(texts, model, tok)
    got = [c.scores[judge.name][i][0] for c in r.conditions for i in range(len(PROMPTS))]
    assert got == pytest.approx(want, abs=1e-6) and len(s) == 2


def test_float32_view_leaves_the_model_exactly_as_it_was(tiny):
    """Buffers too: the rotary inv_freq of a bf16 Llama is float32, and a round trip through bf16 would
    round it, changing every logit after the first position (and every later generation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["ckpt"], dtype=torch.bfloat16).eval()
    tok = helpers.make_tokenizer()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    assert any(b.dtype == torch.float32 for b in buffers.values())  # what makes the case
    enc = tok(["hate people now and then", "kind dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**enc).logits
        with float32_view(model):
            assert next(model.parameters()).dtype == torch.float32
        after = model(**enc).logits
    assert next(model.parameters()).dtype == torch.bfloat16
    for n, b in model.named_buffers():
        assert b.dtype == buffers[n].dtype and torch.equal(b, buffers[n]), n
    assert torch.equal(before, after)


def test_self_judging_probe_refused_unless_forced(tiny):
    with pytest.raises(ProbeError, match="own edit"):
        _run(tiny, judges=[f"probe:{tiny['probe']}"], benign=None)
    r = _run(tiny, judges=[f"probe:{tiny['probe']}"], benign=None, force_judge=True)
    assert r.settings["force_judge"]


def test_controls_match_the_edit(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["ckpt"], dtype=torch.bfloat16)
    p = Patch.load(tiny["patch"])
    (k1, rr), (k2, rd) = make_controls(model, p, seed=0)
    assert (k1, k2) == ("random-rows", "random-direction")
    for name, e in p.edits.items():
        assert rr.edits[name].n_rows == e.n_rows and np.array_equal(rr.edits[name].direction, e.direction)
        assert np.array_equal(rd.edits[name].rows, e.rows)
        assert np.linalg.norm(rd.edits[name].direction) == pytest.approx(np.linalg.norm(e.direction), rel=1e-5)
        assert abs(float(np.dot(rd.edits[name].direction, e.direction))) < np.linalg.norm(e.direction) ** 2
    assert edit_norm(rr) == pytest.approx(edit_norm(p), rel=1e-6) and edit_norm(rd) == pytest.approx(edit_norm(p), rel=1e-5)


def test_sampled_runs_report_rtp_metrics(tiny):
    r = _run(tiny, samples=3, temperature=1.0, benign=None)
    m = r.conditions[0].metrics["lexical"]
    assert all(len(row) == 4 for row in r.conditions[0].continuations)  # the greedy one, then 3 samples
    assert m["n_texts"] == 4 * len(PROMPTS) and m["samples"] == 3 and 0 <= m["greedy_rate"] <= 1
    assert {c["metric"] for c in r.comparisons} == {"greedy", "max"}
    only = _run(tiny, samples=2, temperature=1.0, greedy=False, benign=None)
    assert all(len(row) == 2 for row in only.conditions[0].continuations) and "greedy_rate" not in only.conditions[0].metrics["lexical"]
    assert _run(tiny, samples=2, temperature=0.0, benign=None).settings["samples"] == 0  # temperature 0: greedy only


def test_qa_exact_match(tiny, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "the dog", "answer": ["zzz"]}) + "\n")
    r = _run(tiny, qa=str(qa), benign=None)
    assert r.conditions[0].qa["n"] == 1 and r.conditions[0].qa["exact_match"] == 0.0


def test_controls_are_matched_to_the_patchs_kl_by_default(tiny):
    from patchkit.evaluation.matching import KL_TOLERANCE

    r = _run(tiny, controls=True)
    assert r.settings["control_match"] == "kl"
    patch, controls = r.conditions[1], r.conditions[2:]
    for c in controls:  # matched, or said not to be in the label
        close = abs(math.log(c.capability["kl"] / patch.capability["kl"])) < KL_TOLERANCE
        assert close or "KL not matched" in c.label, (c.label, c.capability["kl"], patch.capability["kl"])
        assert f"strength x{c.strength:.3g}" in c.label
    assert any(abs(math.log(c.capability["kl"] / patch.capability["kl"])) < KL_TOLERANCE for c in controls)
    same = _run(tiny, controls=True, control_match="strength")
    assert [c.strength for c in same.conditions[2:]] == [1.0, 1.0] and same.settings["control_match"] == "strength"
    assert [c.edit_norm for c in same.conditions[2:]] == pytest.approx([patch.edit_norm] * 2, rel=1e-3)
    with pytest.raises(DataError, match="benign text"):
        _run(tiny, controls=True, benign=None)
    with pytest.raises(DataError, match="control_match"):
        _run(tiny, controls=True, control_match="norm")
    only = _run(tiny, controls=True, control_match="strength", control_kinds=["random-rows"])
    assert [c.kind for c in only.conditions] == ["base", "patch", "random-rows"] and only.settings["control_kinds"] == ["random-rows"]
    with pytest.raises(DataError, match="control kinds"):
        _run(tiny, controls=True, control_kinds=["random-layers"])


def test_matched_controls_are_measured_once(tiny, monkeypatch):
    """The capability the KL search measured is the one reported: no patch or control is measured twice."""
    from patchkit.evaluation.capability import CapabilityMeter

    measured, real = [], CapabilityMeter.measure

    def spy(self, patch):
        measured.append(patch.id)
        return real(self, patch)

    monkeypatch.setattr(CapabilityMeter, "measure", spy)
    r = _run(tiny, controls=True)
    assert len(measured) == len(set(measured))  # every patch measured once, whatever the search tried
    assert {c.patch_id for c in r.conditions[1:]} <= set(measured) and measured[0] == r.conditions[1].patch_id


def test_report_and_attach(tiny, tmp_path):
    r = _run(tiny, controls=True)
    page = write_report(r, tmp_path / "report")
    text = page.read_text()
    base = r.conditions[0]
    assert "<svg" in text and "http" not in text.replace("http-equiv", "") and "<script" not in text
    assert f"{base.capability['perplexity']:.3f}" in text and f"{r.conditions[1].metrics['lexical']['rate']:.3f}" in text
    assert json.loads((tmp_path / "report" / "result.json").read_text())["model_fingerprint"] == r.model_fingerprint
    table = render_table(r)
    assert "random-rows" in table and f"{base.capability['perplexity']:.2f}" in table

    original = Patch.load(tiny["patch"])
    new = attach_evaluation(tiny["patch"], r, original.id, output=tmp_path / "with-eval.safetensors")
    again = Patch.load(tmp_path / "with-eval.safetensors")
    assert again.evaluation["evaluated_patch_id"] == original.id and again.id == new.id != original.id
    assert again.evaluation["patched"]["metrics"]["lexical"]["rate"] == r.conditions[1].metrics["lexical"]["rate"]
    assert {e.result_sha256 for e in again.edits.values()} == {e.result_sha256 for e in original.edits.values()}
    with pytest.raises(OutputExistsError):
        attach_evaluation(tiny["patch"], r, output=tmp_path / "with-eval.safetensors")
    with pytest.raises(DataError):
        attach_evaluation(tiny["patch"], r, "0" * 12, output=tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------- the embedded model
@pytest.mark.slow
def test_embedded_detox_patch_evaluates_and_reverts():
    from pathlib import Path

    patch = Path(__file__).parents[1] / "patches" / "smollm2-135m-instruct-detox.safetensors"
    r = evaluate("embedded", [patch], prompts="builtin:toxic-prompts", benign="builtin:benign-requests", judges=["lexical"],
                 limit=8, benign_limit=4, max_new_tokens=8, batch_size=8)
    assert r.reverted_bit_identical and r.settings["dtype"] == "bfloat16"
    assert r.conditions[1].capability["kl"] > 0


@pytest.mark.slow
def test_embedded_refusal_uses_chat_template():
    r = evaluate("embedded", [], prompts="builtin:harmful-requests", benign=None, judges=["refusal"], limit=4, max_new_tokens=12)
    assert r.settings["chat"] and len(r.conditions) == 1


def test_classifier_judge_from_a_local_folder(tmp_path):
    from transformers import LlamaForSequenceClassification

    cfg = helpers.llama_config(num_labels=2, id2label={0: "ok", 1: "toxic"}, label2id={"ok": 0, "toxic": 1})
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "clf", safe_serialization=True)
    helpers.make_tokenizer().save_pretrained(tmp_path / "clf")
    j = J.make_judge(f"classifier:{tmp_path / 'clf'}", label="toxic")
    s = j.score(["hate people", "kind dog", ""])
    assert len(s) == 3 and all(0 <= x <= 1 for x in s[:2]) and s[2] == 0.0 and j.info["label_index"] == 1
    assert j.score(["hate people"]) == pytest.approx([s[0]], abs=1e-6)  # padding in a batch does not change a score
    with pytest.raises(DataError, match="no label"):
        J.make_judge(f"classifier:{tmp_path / 'clf'}", label="spam")


def test_probe_judge_of_another_model_refused(tiny):
    with pytest.raises(ProbeError, match="another model"):
        J.make_judge(f"probe:{tiny['probe1']}", model_fingerprint="0" * 64)
    with pytest.raises(DataError, match="unknown judge"):
        J.make_judge("vibes")


def test_cli_eval_json_report_and_attach(tiny, tmp_path):
    from click.testing import CliRunner

    from patchkit.cli import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(BENIGN) + "\n")
    patch = tmp_path / "p.safetensors"
    patch.write_bytes(tiny["patch"].read_bytes())
    args = ["eval", str(tiny["ckpt"]), "--patch", str(patch), "--prompts", str(prompts), "--benign", str(benign),
            "--judge", f"probe:{tiny['probe1']}", "--max-new-tokens", "4", "--batch-size", "3"]
    r = CliRunner().invoke(cli, [*args, "--json", "--report", str(tmp_path / "rep"), "--attach", "--samples", "2",
                                 "--controls", "--control-seeds", "1", "--judge-check", str(tiny["check"])])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["settings"]["greedy"] and data["settings"]["samples"] == 2 and data["settings"]["control_seeds"] == 1
    assert data["power"]["judges"] and data["judges"][0]["quality"]["all"]["auc"] is not None
    assert {"greedy_rate", "expected_max", "p_any"} <= set(data["conditions"][0]["metrics"][data["judges"][0]["name"]])
    assert all("p_holm" in c["vs_base"] for c in data["comparisons"])
    assert (tmp_path / "rep" / "index.html").exists() and data["report"]
    attached = Patch.load(data["attached"][0])
    assert attached.evaluation is not None and attached.edits.keys() == Patch.load(patch).edits.keys()
    again = CliRunner().invoke(cli, [*args, "--attach"])
    assert again.exit_code != 0 and "already exists" in again.output and "Traceback" not in again.output
    bad = CliRunner().invoke(cli, ["eval", str(tiny["ckpt"]), "--patch", str(tmp_path / "missing.safetensors")])
    assert bad.exit_code != 0 and "does not exist" in bad.output


def test_perplexity_of_the_capability_meter():
    import math

    from patchkit.evaluation.capability import perplexity

    assert perplexity(0.0, 0) is None
    assert perplexity(2.0, 2) == pytest.approx(math.e)
    assert perplexity(1e6, 1) == math.inf  # past a float: over any budget, not an OverflowError
    assert perplexity(float("nan"), 3) == math.inf  # a broken model is over any budget


def test_the_capability_meter_is_what_eval_reports(tiny):
    """eval's capability numbers are the meter's: the base has KL 0, a patch its own perplexity and KL."""
    from patchkit.evaluation.capability import CapabilityMeter
    from patchkit.method.pipeline import load_model

    texts = ["a kind word for people", "the group helps now", "love the dog"]
    r = evaluate(tiny["ckpt"], [tiny["patch"]], prompts=["hello"], benign=texts, samples=0, max_new_tokens=2, batch_size=2)
    model, tok = load_model(tiny["ckpt"], torch.bfloat16)
    meter = CapabilityMeter(model, tok, texts, 2)
    assert r.conditions[0].capability == meter.base and meter.base["kl"] == 0.0 and meter.tokens > 0
    patched = meter.measure(Patch.load(tiny["patch"]))
    assert r.conditions[1].capability == patched and patched["kl"] > 0 and patched["perplexity"] != meter.base_perplexity


def test_the_capability_meter_bounds_its_logits_and_measures_the_same(tiny, monkeypatch):
    """A batch whose logits would pass LOGITS_BYTES is run a few texts at a time: more forward passes,
    never more than the bound's worth of logits in one, and the same perplexity and KL."""
    from patchkit.evaluation import capability
    from patchkit.method.pipeline import load_model

    texts = ["a kind word for people", "the group helps now and then, every day", "love the dog", "a tree", "rivers run"]
    model, tok = load_model(tiny["ckpt"], torch.bfloat16)
    patch = Patch.load(tiny["patch"])
    whole = capability.CapabilityMeter(model, tok, texts, 4)
    vocab = capability.vocab_size(model)
    longest = max(int(e["input_ids"].shape[1]) for e in whole.batches)
    monkeypatch.setattr(capability, "LOGITS_BYTES", 2 * longest * vocab * 4)  # two texts' logits at most
    split = capability.CapabilityMeter(model, tok, texts, 4)
    assert len(whole.batches) == 2 and len(split.batches) == 3  # 4 + 1 texts -> 2 + 2 + 1
    assert all(e["input_ids"].shape[0] <= 2 for e in split.batches)
    assert split.tokens == whole.tokens and split.base["perplexity"] == pytest.approx(whole.base["perplexity"], rel=1e-5)
    a, b = whole.measure(patch), split.measure(patch)
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5) and b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)
    assert a["kl"] > 0


def test_library_and_command_default_to_the_same_control_seeds():
    import inspect

    from patchkit.cli import cli
    from patchkit.evaluation.evaluate import evaluate

    option = next(p for p in cli.commands["eval"].params if p.name == "control_seeds")
    assert inspect.signature(evaluate).parameters["control_seeds"].default == option.default == 3
