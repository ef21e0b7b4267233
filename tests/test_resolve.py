"""One resolver of model references, method.pipeline.resolve_model, on one parser (share.sources.parse_model):
embedded, a folder, OWNER/NAME[@REV] and hf://OWNER/NAME[@REV] give (folder, repo id, commit) everywhere, and
the commands that take a model (probe, compute with every method, eval, tune, apply --push) take each form.
Hub tests run against the local fake Hub of tests/test_hub.py."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402
from test_hub import hub  # noqa: E402,F401 (the fake Hub fixture)

from patchkit.cli import cli  # noqa: E402
from patchkit.core.checkpoint import Checkpoint  # noqa: E402
from patchkit.core.patchfile import Patch, make_edit  # noqa: E402
from patchkit.errors import CheckpointError, DataError, HubError, UnsupportedError  # noqa: E402
from patchkit.method import pipeline  # noqa: E402
from patchkit.share import push as P  # noqa: E402
from patchkit.share.sources import parse_model  # noqa: E402


def test_the_one_parser_of_model_references(tmp_path):
    folder = tmp_path / "org" / "name"
    folder.mkdir(parents=True)
    assert parse_model("org/name") == (None, "org/name", None)
    assert parse_model("org/name@v1.0") == (None, "org/name", "v1.0")
    assert parse_model("hf://org/name@refs/pr/1") == (None, "org/name", "refs/pr/1")
    assert parse_model("hf://org/name") == (None, "org/name", None)
    assert parse_model(str(folder)) == (folder, None, None)
    assert parse_model("./org/name").repo_id is None  # a relative path, never the Hub
    with pytest.raises(HubError, match="names a repository"):
        parse_model("hf://org/name/model.safetensors")
    with pytest.raises(HubError, match="empty revision"):
        parse_model("hf://org/name@")
    assert pipeline.is_hub_id("org/name@main") and pipeline.is_hub_id("hf://org/name")
    assert not pipeline.is_hub_id("embedded") and not pipeline.is_hub_id(str(folder))


def test_embedded_and_local_references(tmp_path, monkeypatch):
    from patchkit.method import embedded

    seen = []
    monkeypatch.setattr(embedded, "embedded_model_path", lambda name=embedded.DEFAULT: seen.append(name) or tmp_path)
    assert pipeline.resolve_model("embedded") == (tmp_path, None, None) and seen == [embedded.DEFAULT]
    assert pipeline.resolve_model("embedded:gemma3-270m") == (tmp_path, None, None) and seen[-1] == "gemma3-270m"
    assert not pipeline.is_hub_id("embedded:gemma3-270m")
    with pytest.raises(UnsupportedError, match="unknown embedded model 'nope'"):
        pipeline.resolve_model("embedded:nope")
    assert pipeline.resolve_model(str(tmp_path)) == (tmp_path, None, None)
    with pytest.raises(CheckpointError, match=f"checkpoint folder {tmp_path / 'nope'} does not exist"):
        pipeline.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a Hub id"):
        pipeline.resolve_model(str(tmp_path / "file"))


@pytest.fixture
def tinybase(hub, tmp_path):  # noqa: F811
    base = helpers.tiny_llama(tmp_path / "base", torch.bfloat16, sharded=True)
    P.push_checkpoint(base, "me/tinybase")
    return base


def labelled(path: Path) -> Path:
    bad = [f"{a} {b}" for a in ("hate", "cruel", "awful") for b in ("people", "the group")]
    good = [f"{a} {b}" for a in ("love", "kind", "nice") for b in ("people", "the group")]
    path.write_text("".join(json.dumps({"text": t, "label": int(t in bad)}) + "\n" for t in bad + good))
    return path


def test_every_hub_form_resolves_to_the_same_commit(tinybase, hub):  # noqa: F811
    forms = ["me/tinybase", "me/tinybase@main", "hf://me/tinybase", "hf://me/tinybase@main"]
    got = [pipeline.resolve_model(f) for f in forms]
    assert len({g.path for g in got}) == 1
    path, repo_id, revision = got[0]
    assert repo_id == "me/tinybase" and len(revision) == 40 and path.name == revision
    assert Checkpoint(path).fingerprint() == Checkpoint(tinybase).fingerprint()


def test_compute_projection_and_damping_take_hub_models(tinybase, tmp_path):
    """compute --method projection fetched a Hub model through a function that had moved; damping is new."""
    data = labelled(tmp_path / "d.jsonl")
    run = CliRunner()
    r = run.invoke(cli, ["compute", "hf://me/tinybase", "--method", "projection", "--data", str(data), "--layers", "0",
                         "-o", str(tmp_path / "proj.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    r = run.invoke(cli, ["compute", "me/tinybase@main", "--method", "damping", "--data", str(data), "--fraction", "0.5",
                         "-o", str(tmp_path / "damp.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["params"]["fraction"] == 0.5 and out["rows"] > 0
    assert all(t["name"].endswith("mlp.up_proj.weight") for t in out["tensors"])


def test_probe_and_apply_push_record_the_hub_commit(tinybase, tmp_path, hub, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path / "pk"))
    _, _, commit = pipeline.resolve_model("me/tinybase")
    run = CliRunner()
    r = run.invoke(cli, ["probe", "hf://me/tinybase", "--data", str(labelled(tmp_path / "d.jsonl")), "-o", str(tmp_path / "p.safetensors")])
    assert r.exit_code == 0, r.output
    from patchkit.method.probe import load_probe

    assert load_probe(tmp_path / "p.safetensors").model_source == f"me/tinybase@{commit}"
    ck = Checkpoint(tinybase)
    name = "model.layers.1.mlp.gate_proj.weight"
    info, rows = ck.info(name), np.array([2, 5], dtype=np.int64)
    Patch(edits={name: make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows),
                                 delta=np.full((2, info.n_cols), 0.25, np.float32))}).save(tmp_path / "fix.safetensors")
    r = run.invoke(cli, ["apply", str(tmp_path / "fix.safetensors"), "hf://me/tinybase", "-o", str(tmp_path / "out"),
                         "--push", "me/release", "--json"])
    assert r.exit_code == 0, r.output
    card = hub.files("me/release")["README.md"].decode()
    assert "me/tinybase" in card and commit in card


def test_evaluate_apply_in_memory_and_export_take_hf_patches(tinybase, tmp_path, hub):  # noqa: F811
    from patchkit.core.plan import load_patch
    from patchkit.evaluation.evaluate import evaluate
    from patchkit.evaluation.inmemory import apply_in_memory, revert_in_memory
    from patchkit.share.export import export_peft

    ck = Checkpoint(tinybase)
    name = "model.layers.0.mlp.gate_proj.weight"
    info, rows = ck.info(name), np.array([1, 3], dtype=np.int64)
    p = Patch(edits={name: make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows),
                                     delta=np.full((2, info.n_cols), 0.5, np.float32))}, base_model="me/tinybase")
    p.save(tmp_path / "calm.safetensors")
    P.push_patch(tmp_path / "calm.safetensors", "me/calm")
    assert load_patch("hf://me/calm").id == load_patch(tmp_path / "calm.safetensors").id == p.id
    model, _ = pipeline.load_model(tinybase, torch.bfloat16)
    weight = dict(model.named_parameters())[name]
    before = weight.detach().clone()
    undo = apply_in_memory(model, "hf://me/calm")
    assert not torch.equal(weight, before)
    revert_in_memory(model, undo)
    assert torch.equal(weight, before)
    assert export_peft("hf://me/calm", tmp_path / "adapter")["patch"] == p.id
    r = evaluate("hf://me/tinybase", ["hf://me/calm"], prompts=["hello there", "the group"], benign=["a kind word for people"],
                 samples=0, max_new_tokens=2, batch_size=2)
    assert [c.kind for c in r.conditions] == ["base", "patch"] and r.reverted_bit_identical
    assert r.conditions[1].patch_id == p.id


@pytest.mark.parametrize("command", ["probe", "eval", "tune"])
def test_device_map_and_max_memory_reach_load_model(tmp_path, monkeypatch, command):
    base = helpers.tiny_llama(tmp_path / "base", torch.bfloat16)
    seen = {}

    def recorder(path, dtype=None, **kw):
        seen.update(kw)
        raise DataError("stop here")

    from patchkit.evaluation import tune

    monkeypatch.setattr(pipeline, "load_model", recorder)
    monkeypatch.setattr(tune, "load_model", recorder)  # imported by name when tune.py loads
    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path / "pk"))
    data = str(labelled(tmp_path / "d.jsonl"))
    args = {"probe": ["probe", str(base), "--data", data, "-o", str(tmp_path / "p.safetensors"), "--no-cache"],
            "eval": ["eval", str(base), "--prompts", data, "--benign", data, "--limit", "2"],
            "tune": ["tune", str(base), "--probe", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "t.safetensors"),
                     "--max-kl", "1"]}[command]
    if command == "tune":  # tune loads the model after reading the probe: give it one
        from patchkit.method.probefile import ProbeArrays, write_probe

        probe = ProbeArrays(np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32), np.zeros(2, np.float32),
                            {"behavior_index": 1, "label_names": ["ok", "bad"], "model_fingerprint": Checkpoint(base).fingerprint()})
        write_probe(tmp_path / "missing.safetensors", probe)
        args += ["--prompts", data, "--benign", data, "--top-k", "2", "--alpha", "1"]
    r = CliRunner().invoke(cli, args + ["--device-map", "cpu", "--max-memory", "1GiB"])
    assert r.exit_code == DataError.exit_code and "stop here" in r.output, r.output
    assert seen == {"device_map": "cpu", "max_memory": "1GiB"}


def test_load_model_passes_the_placement_to_from_pretrained(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    base = helpers.tiny_llama(tmp_path / "base", torch.bfloat16)
    real, seen = AutoModelForCausalLM.from_pretrained, []

    def spy(path, **kw):
        seen.append({k: copy.deepcopy(v) for k, v in kw.items() if k in ("device_map", "max_memory")})  # accelerate edits the dict
        return real(path, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, tok = pipeline.load_model(base, torch.float32, device_map="cpu", max_memory="1GiB")
    assert not model.training and {p.device.type for p in model.parameters()} == {"cpu"}
    pipeline.load_model(base, max_memory="1GiB")  # a budget alone: accelerate places the layers
    pipeline.load_model(base)
    budget = {"cpu": "1GiB", **{i: "1GiB" for i in range(torch.cuda.device_count())}}
    assert seen == [{"device_map": "cpu", "max_memory": budget}, {"device_map": "auto", "max_memory": budget}, {}]
    with pytest.raises(DataError, match="not a size"):
        pipeline.memory_budget("lots")
    r = CliRunner().invoke(cli, ["eval", str(base), "--max-memory", "lots", "--prompts", "x.txt"])
    assert r.exit_code != 0 and "Traceback" not in r.output
