"""tune over the other methods' strength: a projection's lam and damping's fraction within a capability budget.

On the tiny Llama of test_tune (trained on the benign sentences, so that any edit raises their perplexity), with
a labelled file written here: every grid strength is measured, the budget decides what may be chosen, an impossible
budget is the typed one-line error with nothing written, and the written patch is, byte for byte, the one
`patchkit compute --method projection --lam LAM` (or `damping --fraction F`) writes for the same data.
"""

from __future__ import annotations

import json

import pytest
from test_tune import BENIGN, COMMON, NEVER, PROMPTS, case, one_thread  # noqa: F401  (fixtures)

from patchkit.core.patchfile import Patch
from patchkit.errors import DataError
from patchkit.evaluation.tune import NoFeasiblePointError, render_tune_table, tune
from patchkit.method.damping import damping_patch
from patchkit.method.pipeline import load_data
from patchkit.method.projection import projection_patch
from patchkit.method.targets import parse_layers

LAMS = [0.25, 0.5, 0.75, 1.0]
FRACTIONS = [0.02, 0.1, 0.3, 1.0]


@pytest.fixture(scope="module")
def data(case):
    bad = [f"{a} {b}" for a in ("hate", "cruel", "awful", "hurt", "angry") for b in ("people", "the group", "dog now")]
    good = [f"{a} {b}" for a in ("love", "kind", "nice", "help", "happy") for b in ("people", "the group", "dog now")]
    path = case["root"] / "labelled.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": int(i % 2 == 0)}) + "\n"
                            for i, t in enumerate(x for pair in zip(bad, good) for x in pair)))
    return path


def as_compute_writes(patch: Patch, result, path):
    """`patch` (made as compute makes it) with the description and the evaluation tune stores, saved to `path`."""
    patch.description, patch.evaluation = result.patch.description, result.patch.evaluation
    return patch.save(path).read_bytes()


def budget_between(result, name, lo, hi):
    """A ppl budget half way between the points of strength lo and hi of an unconstrained run (checked monotone)."""
    inc = {getattr(p, name): p.ppl_increase for p in result.table}
    grid = sorted(inc)
    assert [inc[s] for s in grid] == sorted(inc.values()) and inc[grid[0]] > 0  # the construction holds
    return (inc[lo] + inc[hi]) / 2


def test_parse_layers():
    assert parse_layers("15-17,20") == [15, 16, 17, 20] and parse_layers("2,0,2") == [0, 2] and parse_layers(None) is None
    assert parse_layers([3, 1]) == [1, 3]
    for bad in ("a-b", "", "-1", "3-x"):
        with pytest.raises(DataError, match="15-29"):
            parse_layers(bad)


def test_projection_search_respects_the_budget_and_writes_compute_s_patch(case, data, tmp_path):
    free = tune(case["ckpt"], method="projection", data=str(data), lams=LAMS, max_ppl_increase="1000%", judge=NEVER,
                refine=0, **COMMON)
    assert [p.lam for p in free.table] == LAMS and all(p.within_budget and p.judged for p in free.table)
    assert free.best.lam == 1.0  # a judge that sees nothing: the largest edit within budget
    budget = budget_between(free, "lam", 0.5, 0.75)
    out = tmp_path / "proj.safetensors"
    r = tune(case["ckpt"], method="projection", data=str(data), lams=LAMS, max_ppl_increase=budget, judge=NEVER, refine=2,
             description="tuned", output=out, **COMMON)
    grid = {p.lam: p for p in r.table if p.stage == "grid"}
    assert sorted(grid) == LAMS and [grid[x].within_budget for x in LAMS] == [True, True, False, False]
    refined = [p.lam for p in r.table if p.stage == "refine"]
    assert len(refined) == 2 and refined[0] == 0.625 and refined[1] in (0.5625, 0.6875)  # bisection between 0.5 and 0.75
    ok = [p for p in r.table if p.within_budget]
    assert r.best.lam == max(p.lam for p in ok) and r.best.within_budget
    assert not any(p.judged for p in r.table if not p.within_budget)  # over budget: never generated
    for p in r.table:
        assert p.within_budget == (p.ppl_increase <= budget) and p.rows == r.table[0].rows > 0

    # the written patch: compute's projection (float32 model, the same data) at the chosen lam, byte for byte
    written = out.read_bytes()
    want = projection_patch(case["ckpt"], lam=r.best.lam, data=load_data(str(data)))
    assert as_compute_writes(want, r, tmp_path / "want.safetensors") == written
    loaded = Patch.load(out)
    ev = loaded.evaluation
    assert loaded.provenance["method"] == "projection" and loaded.provenance["params"]["lam"] == r.best.lam
    assert loaded.provenance["data"]["sha256"] == load_data(str(data)).content_hash
    assert ev["settings"]["method"] == "projection" and ev["settings"]["lams"] == LAMS and ev["chosen"]["lam"] == r.best.lam
    assert len(ev["table"]) == len(r.table) and "timing" not in ev and loaded.description == "tuned"
    text = render_tune_table(ev)
    assert text == render_tune_table(r) and "lam" in text.splitlines()[3] and f"chosen   lam {r.best.lam:g}" in text

    again = tune(case["ckpt"], method="projection", data=str(data), lams=LAMS, max_ppl_increase=budget, judge=NEVER,
                 refine=2, description="tuned", output=tmp_path / "again.safetensors", **COMMON)
    assert (tmp_path / "again.safetensors").read_bytes() == written and again.patch.id == r.patch.id


def test_damping_search_respects_the_budget_and_writes_compute_s_patch(case, data, tmp_path):
    free = tune(case["ckpt"], method="damping", data=str(data), fractions=FRACTIONS, max_kl=100.0, judge=NEVER, refine=0,
                **COMMON)
    rows = [p.rows for p in free.table]
    assert [p.fraction for p in free.table] == FRACTIONS and rows == sorted(rows) and rows[0] >= 1
    kl = {p.fraction: p.kl for p in free.table}
    assert kl[0.02] < kl[0.1] < kl[1.0]
    budget = (kl[0.02] + kl[0.1]) / 2
    out = tmp_path / "damp.safetensors"
    r = tune(case["ckpt"], method="damping", data=str(data), fractions=FRACTIONS, max_kl=budget, judge=NEVER, refine=1,
             output=out, **COMMON)
    assert [p.fraction for p in r.table if p.stage == "refine"] == [pytest.approx(0.06)]  # between 0.02 and 0.1
    assert r.best.within_budget and r.best.fraction == max(p.fraction for p in r.table if p.within_budget)
    assert all(p.within_budget == (p.kl <= budget) and (not p.judged or p.within_budget) for p in r.table)
    want = damping_patch(case["ckpt"], data=load_data(str(data)), fraction=r.best.fraction)
    assert as_compute_writes(want, r, tmp_path / "want.safetensors") == out.read_bytes()
    ev = Patch.load(out).evaluation
    assert ev["settings"]["method"] == "damping" and ev["chosen"]["fraction"] == r.best.fraction
    assert [p["fraction"] for p in ev["table"]] == sorted(p.fraction for p in r.table)


def test_impossible_budget_is_the_typed_error_and_writes_nothing(case, data, tmp_path):
    out = tmp_path / "never.safetensors"
    with pytest.raises(NoFeasiblePointError, match=r"no \(lam\) point is within the budget") as e:
        tune(case["ckpt"], method="projection", data=str(data), lams=[0.5, 1.0], max_kl=1e-12, refine=1, judge=NEVER,
             output=out, **COMMON)
    assert "\n" not in str(e.value) and "lam=0.25" in str(e.value) and len(e.value.table) == 3
    assert e.value.exit_code == 9 and list(tmp_path.iterdir()) == []


def test_bad_arguments(case, data):
    kw = {"max_kl": 1.0, **COMMON}
    for bad, match in (({"method": "projection", "data": str(data), "alphas": [1.0]}, "not alphas"),
                       ({"method": "projection"}, "labelled data"),
                       ({"method": "damping", "data": str(data), "lams": [1.0]}, "not lams"),
                       ({"method": "probe", "data": str(data)}, "not data"),
                       ({"method": "probe"}, "a probe"),
                       ({"method": "nope"}, "method must be"),
                       ({"method": "projection", "data": str(data), "lams": [0.0]}, "above 0"),
                       ({"method": "damping", "data": str(data), "fractions": [1.5]}, r"\(0, 1\]"),
                       ({"method": "projection", "data": str(data), "layers": "7"}, "layer 7"),
                       ({"method": "damping", "data": str(data), "layers": [9]}, "layer 9")):
        with pytest.raises(DataError, match=match):
            tune(case["ckpt"], **bad, **kw)


def test_cli_tune_projection_and_damping(case, data, tmp_path, cli_runner):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(BENIGN) + "\n")
    common = [case["ckpt"], "--prompts", prompts, "--benign", benign, "--max-new-tokens", "3", "--batch-size", "4",
              "--refine", "1"]
    out = tmp_path / "p.safetensors"
    r = cli_runner("tune", *common, "--method", "projection", "--data", data, "--lams", "0.25,0.5", "--layers", "0-1",
                   "--rank", "2", "--modules", "mlp", "--max-ppl-increase", "1000%", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    p = Patch.load(out)
    assert p.id == d["patch_id"] and p.evaluation["chosen"] == d["chosen"] and d["chosen"]["lam"] == 0.5
    assert p.provenance["params"] == {"lam": 0.5, "layers": [0, 1], "rank": 2, "modules": ["mlp"]}
    assert all(".mlp.down_proj." in n for n in p.edits) and len(p.edits) == 2
    human = cli_runner("tune", *common, "--method", "damping", "--data", data, "--fractions", "0.05,0.2",
                       "--max-ppl-increase", "1000%", "-o", tmp_path / "d.safetensors")
    assert human.exit_code == 0, human.output
    assert "chosen   fraction 0.2" in human.stdout and "wrote " in human.stdout
    assert Patch.load(tmp_path / "d.safetensors").provenance["method"] == "damping"

    never = tmp_path / "never.safetensors"
    r = cli_runner("tune", *common, "--method", "damping", "--data", data, "--fraction", "0.5", "--max-kl", "0", "-o", never)
    assert r.exit_code == 9 and "no (fraction) point is within the budget" in r.output and not never.exists()
    assert "Traceback" not in r.output and r.output.strip().splitlines()[-1].startswith("error: no (fraction) point")
    for args, msg in ((["--method", "projection", "--data", data, "--probe", "x.safetensors"], "--probe does not go with --method projection"),
                      (["--method", "projection", "--data", data, "--fraction", "0.1"], "--fraction does not go with"),
                      (["--method", "damping", "--data", data, "--lam", "1"], "--lam does not go with --method damping"),
                      (["--method", "damping", "--data", data, "--rank", "2"], "--rank does not go with"),
                      (["--probe", "x.safetensors", "--data", data], "--data does not go with --method probe"),
                      (["--method", "projection"], "--method projection needs --data"),
                      ([], "--method probe needs --probe")):
        r = cli_runner("tune", *common, *args, "--max-kl", "1", "-o", tmp_path / "x.safetensors")
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
    assert not (tmp_path / "x.safetensors").exists()
