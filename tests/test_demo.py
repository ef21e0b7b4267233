"""The main job on the embedded model runs end to end and proves its own revert."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from patchkit.cli import cli


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path / "demo"), "--prompts", "8", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["revert_bit_identical"] and out["weights_restored_after_eval"]
    assert out["patch"]["method"] == "projection" and out["patch"]["rows"] == 15 * 576  # every row of 15 down_proj
    assert out["paper_patch"]["rows"] == 2143  # the paper's fraction of SmolLM2's 30 x 1536 gate rows
    assert {j["name"].split(":")[0] for j in out["judges"]} == {"jigsaw", "lexical", "probe"}
    assert all(j["check"] and 0 <= j["check"]["accuracy"] <= 1 and j["check"]["auc"] is not None for j in out["judges"])
    assert all(j["quality"]["benign_false_positive"]["n"] > 0 for j in out["judges"])
    # base, the two patches, a random-direction control of the projection, random rows and directions of the paper's
    assert set(out["conditions"]) >= {"base"} and len(out["conditions"]) == 6
    assert not (tmp_path / "demo" / "smollm2-detox" / ".patchkit").exists()
