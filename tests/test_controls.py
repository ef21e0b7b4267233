"""Controls per method (patchkit/evaluation/controls.py): projection -> random directions and label-shuffled
directions; damping -> the factors on random neurons; model surgery -> random rows and directions. Each has
the claimed structure and is a valid patch that applies and reverts exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from patchkit.core import ops
from patchkit.core.patchfile import Patch
from patchkit.errors import DataError, UnsupportedError
from patchkit.evaluation.controls import (control_builders, make_controls, random_directions, scaled_rows,
                                          shuffled_labels)
from patchkit.evaluation.inmemory import patched, state_tensors
from patchkit.method.damping import damping_patch
from patchkit.method.data import LabelledData
from patchkit.method.pipeline import load_model
from patchkit.method.projection import directions_from_features, layer_features, projection_patch
from test_architectures import LABELS, TEXTS, zoo  # noqa: F401  (fixture)

DATA = LabelledData(tuple(TEXTS) * 2, tuple(LABELS) * 2, ("good", "bad"), "0" * 64, "stub")


@pytest.fixture()
def llama(zoo):  # noqa: F811
    base = zoo("llama").path
    model, tok = load_model(base, dtype=torch.bfloat16)
    return base, model, tok


def applies_and_reverts(patch: Patch, base, tmp_path, name: str):
    """Through the files: apply to a copy changes the edited tensors only, revert gives the base bytes back."""
    path = patch.save(tmp_path / f"{name}.safetensors")
    assert Patch.load(path).id == patch.id
    ops.apply(str(path), base, tmp_path / f"{name}-out")
    ops.revert(str(path), tmp_path / f"{name}-out", tmp_path / f"{name}-back")
    ref = load_file(base / "model.safetensors")
    out = load_file(tmp_path / f"{name}-out" / "model.safetensors")
    back = load_file(tmp_path / f"{name}-back" / "model.safetensors")
    changed = {k for k in ref if not out[k].view(torch.uint8).equal(ref[k].view(torch.uint8))}
    assert changed and changed <= set(patch.edits)
    assert all(back[k].view(torch.uint8).equal(v.view(torch.uint8)) for k, v in ref.items())


def in_memory_exact(model, patch):
    before = {k: v.detach().clone() for k, v in state_tensors(model).items()}
    with patched(model, patch):
        assert any(not state_tensors(model)[k].equal(before[k]) for k in patch.edits)
    assert all(state_tensors(model)[k].view(torch.int16).equal(v.view(torch.int16)) for k, v in before.items())


def unit_directions(patch, layer_name):
    """The patch's directions of a rows-axis lowrank edit: U = -lam * u."""
    e = patch.edits[layer_name]
    u = -e.u.astype(np.float64)
    return u / np.linalg.norm(u, axis=0, keepdims=True)


# ---- projection -----------------------------------------------------------------------------------------------
def test_projection_controls_structure_apply_and_revert(llama, tmp_path):
    base, model, tok = llama
    p = projection_patch(base, data=DATA, layers=[0, 1], lam=0.6, rank=1)
    ctl = make_controls(model, p, seed=3, data=DATA)
    assert [k for k, _ in ctl] == ["random-direction", "label-shuffled"]
    down = "model.layers.1.mlp.down_proj.weight"
    for kind, c in ctl:
        assert sorted(c.edits) == sorted(p.edits) and c.provenance["params"] == p.provenance["params"]
        assert c.provenance["method"] == "control" and c.provenance["control"] == kind and c.provenance["of"] == p.id
        assert all(e.encoding == "lowrank" and e.rank == 1 for e in c.edits.values())
        assert np.allclose(np.linalg.norm(c.edits[down].u, axis=0), 0.6, atol=1e-5)  # -lam * a unit direction
        assert abs(float(unit_directions(c, down)[:, 0] @ unit_directions(p, down)[:, 0])) < 0.999  # not the patch's
        in_memory_exact(model, c)
        applies_and_reverts(c, base, tmp_path, kind)
    # the label-shuffled control is the class-mean difference of the same features under permuted labels
    feats = layer_features(load_model(base)[0], tok, DATA.texts, range(2))
    perm = shuffled_labels(DATA.labels, 3)
    assert sorted(perm.tolist()) == sorted(DATA.labels) and (perm != np.asarray(DATA.labels)).any()
    want, _q = directions_from_features(feats, perm, [0, 1], 1)
    got = unit_directions(dict(ctl)["label-shuffled"], down)
    assert np.allclose(got[:, 0], want[1][:, 0], atol=1e-5)


def test_projection_controls_scale_and_features(llama):
    base, model, tok = llama
    p = projection_patch(base, data=DATA, layers=[0], lam=0.5, rank=2, modules=("attn",))
    feats = (layer_features(load_model(base)[0], tok, DATA.texts, range(2)), list(DATA.labels))
    builders = dict(control_builders(model, p, seed=0, features=feats))
    c = builders["label-shuffled"](2.0)
    assert c.provenance["params"]["lam"] == 1.0 and c.provenance["strength"] == 2.0
    assert [e.rank for e in c.edits.values()] == [2] and sorted(c.edits) == sorted(p.edits)
    again = dict(make_controls(model, p, seed=0, data=DATA))["label-shuffled"]
    assert again.id == builders["label-shuffled"](1.0).id  # features given or recomputed from the data: one control
    assert dict(make_controls(model, p, seed=1, data=DATA))["random-direction"].id != dict(make_controls(model, p, seed=0, data=DATA))[
        "random-direction"].id


def test_random_directions_are_orthonormal_and_unbiased():
    hidden = 32
    d = random_directions([0, 5], hidden, 3, seed=0)
    assert sorted(d) == [0, 5] and d[0].shape == (hidden, 3) and d[0].dtype == np.float32
    assert np.allclose(d[0].T @ d[0], np.eye(3), atol=1e-6) and not np.allclose(d[0], d[5])
    assert np.array_equal(random_directions([0], hidden, 1, seed=4)[0], random_directions([0], hidden, 1, seed=4)[0])
    # against a fixed unit vector: mean cosine ~ 0, mean squared cosine ~ 1/hidden (isotropic)
    e = np.zeros(hidden)
    e[7] = 1.0
    cos = np.array([random_directions([0], hidden, 1, seed=s)[0][:, 0] @ e for s in range(2000)])
    assert abs(cos.mean()) < 0.02 and abs((cos ** 2).mean() * hidden - 1) < 0.15


def test_projection_controls_refuse_without_the_data(llama):
    base, model, _tok = llama
    p = projection_patch(base, data=DATA, layers=[1], lam=0.5)
    builders = dict(control_builders(model, p, seed=0))  # random directions need no data
    assert builders["random-direction"](1.0).edits
    with pytest.raises(DataError, match="needs the data the patch was made from .*pass data= or features="):
        builders["label-shuffled"](1.0)
    other = LabelledData(DATA.texts, DATA.labels, DATA.label_names, "1" * 64, "other")
    with pytest.raises(DataError, match="not the data the patch was made from"):
        make_controls(model, p, seed=0, data=other)


# ---- damping ---------------------------------------------------------------------------------------------------
def test_damping_controls_structure_apply_and_revert(llama, tmp_path):
    base, model, tok = llama
    data = LabelledData(tuple(TEXTS), tuple(LABELS), ("good", "bad"), "0" * 64, "stub")
    p = damping_patch(base, data=data, fraction=0.3, model=load_model(base)[0], tokenizer=tok)
    (kind, c), = make_controls(model, p, seed=0)
    assert kind == "random-neurons" and sorted(c.edits) == sorted(p.edits)
    moved = 0
    for name, e in p.edits.items():
        ce = c.edits[name]
        assert ce.encoding == "scale" and ce.n_rows == e.n_rows and len(set(ce.rows.tolist())) == ce.n_rows
        assert np.array_equal(np.sort(ce.gamma), np.sort(e.gamma))  # the same factors, permuted
        moved += int(not np.array_equal(ce.rows, e.rows))
    assert moved >= 1
    half = dict(control_builders(model, p, seed=0))["random-neurons"](0.5)
    for name, e in c.edits.items():
        assert np.array_equal(half.edits[name].rows, e.rows)
        assert np.allclose(half.edits[name].gamma, 1 - 0.5 * (1 - e.gamma), atol=1e-7)
    in_memory_exact(model, c)
    applies_and_reverts(c, base, tmp_path, "damp")


# ---- model surgery (row edits): as before, and scalable -------------------------------------------------------
def test_row_controls_dispatch_and_scale(llama, tmp_path):
    from patchkit.core.patchfile import make_edit
    from patchkit.evaluation.inmemory import raw_rows, row_view, tensor_for

    base, model, _tok = llama
    name = "model.layers.0.mlp.gate_proj.weight"
    rows = np.array([1, 4, 9], dtype=np.int64)
    t = tensor_for(state_tensors(model), name)
    raw = raw_rows(row_view(t)[torch.from_numpy(rows)], "BF16")
    direction = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    delta = np.outer(np.array([0.5, -0.5, 0.25], np.float32), direction)
    p = Patch(edits={name: make_edit(name, tuple(t.shape), "BF16", rows, raw, delta=delta)}, provenance={"method": "model-surgery"})
    kinds = [k for k, _ in make_controls(model, p, seed=0)]
    assert kinds == ["random-rows", "random-direction"]
    rr = dict(control_builders(model, p, seed=0))["random-rows"](2.0)
    assert np.allclose(rr.edits[name].deltas(), 2 * dict(make_controls(model, p, seed=0))["random-rows"].edits[name].deltas(), atol=1e-6)
    assert scaled_rows(p, 1.0) is p
    applies_and_reverts(rr, base, tmp_path, "rows")


def test_eval_finds_or_is_given_a_projection_patchs_data_file(zoo, tmp_path):  # noqa: F811
    """eval --controls on a projection patch made from a file: the label-shuffled control reads the file its
    provenance names; once the file is gone it is one DataError; --control-data gives it back."""
    import json
    import shutil

    from click.testing import CliRunner

    from patchkit.cli import cli
    from patchkit.evaluation.evaluate import evaluate
    from patchkit.method.pipeline import load_data

    base = zoo("llama").path
    data_file = tmp_path / "tox.jsonl"
    data_file.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, LABELS)))
    patch = projection_patch(base, data=load_data(str(data_file)), layers=[1], lam=0.5).save(tmp_path / "proj.safetensors")
    kw = {"prompts": ["the good dog", "they hate"], "benign": ["the river is calm"], "judges": ["lexical"], "samples": 0,
          "max_new_tokens": 2, "batch_size": 2, "controls": True, "control_seeds": 1}
    r = evaluate(base, [patch], **kw)
    assert {c.kind for c in r.conditions} == {"base", "patch", "random-direction", "label-shuffled"}
    # the patch is compared with each control kind it has, not only the model-surgery ones
    assert {k for row in r.comparisons for k in row if k.startswith("vs_")} == {"vs_base", "vs_random-direction", "vs_label-shuffled"}
    moved = shutil.move(data_file, tmp_path / "elsewhere.jsonl")
    with pytest.raises(DataError, match="needs the data the patch was made from"):
        evaluate(base, [patch], **kw)
    args = ["eval", str(base), "--patch", str(patch), "--benign-limit", "1", "--limit", "2", "--samples", "0",
            "--max-new-tokens", "2", "--controls", "--control-seeds", "1", "--json"]
    r = CliRunner().invoke(cli, args + ["--control-data", str(moved)])
    assert r.exit_code == 0, r.output
    assert {c["kind"] for c in json.loads(r.stdout)["conditions"]} >= {"label-shuffled", "random-direction"}
    r = CliRunner().invoke(cli, [a for a in args if a != "--controls"] + ["--control-data", str(moved)])
    assert r.exit_code == 2 and "--control-data is for --controls" in r.output


def test_the_size_of_a_damping_patch_and_eval_of_it(llama):
    """A scale edit changes row w by (gamma - 1) * w: its size needs the base rows, read from a checkpoint
    or from the model alike; eval of a damping patch with its controls runs (it raised: no deltas)."""
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.dtypes import to_float
    from patchkit.evaluation.controls import edit_norm, model_rows
    from patchkit.evaluation.evaluate import evaluate

    base, model, tok = llama
    data = LabelledData(tuple(TEXTS), tuple(LABELS), ("good", "bad"), "0" * 64, "stub")
    p = damping_patch(base, data=data, fraction=0.3, model=load_model(base)[0], tokenizer=tok)
    ck = Checkpoint(base)
    want = np.sqrt(sum((((np.broadcast_to(e.gamma, (e.n_rows,)).astype(np.float64) - 1)[:, None]
                         * to_float(ck.read_rows(n, e.rows), e.dtype).reshape(e.n_rows, -1)) ** 2).sum() for n, e in p.edits.items()))
    assert want > 0 and edit_norm(p, ck.read_rows) == pytest.approx(want, rel=1e-12)
    assert edit_norm(p, model_rows(model)) == pytest.approx(want, rel=1e-12)
    with pytest.raises(UnsupportedError, match="needs the base rows"):
        edit_norm(p)
    r = evaluate(base, [p], prompts=["the good dog", "they hate"], benign=["the river is calm"], judges=["lexical"],
                 samples=0, max_new_tokens=2, batch_size=2, controls=True, control_seeds=1)
    cond = {c.kind: c for c in r.conditions}
    assert set(cond) == {"base", "patch", "random-neurons"} and cond["patch"].edit_norm == pytest.approx(want, rel=1e-6)
    assert {k for row in r.comparisons for k in row if k.startswith("vs_")} == {"vs_base", "vs_random-neurons"}
    assert r.reverted_bit_identical
