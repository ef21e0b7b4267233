"""The projection method: W <- W - lam * U U^T W on the tensors that write to the residual stream, stored as
lowrank edits (+ exceptions) that reproduce the torch computation bit for bit, on every family of the table."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from patchkit.core import ops
from patchkit.core.patchfile import Patch
from patchkit.errors import PatchkitError
from patchkit.method.data import LabelledData
from patchkit.method.projection import directions_from_features, projection_patch
from test_architectures import LABELS, SPECS, TEXTS, zoo  # noqa: F401  (fixture)

# written from the modelling code, not from patchkit.method.targets: the modules that add to the residual stream,
# and whether the weight is stored [hidden, in] (rows) or transposed [in, hidden] (GPT-2 Conv1D)
WRITERS = {r"(mlp\.down_proj|self_attn\.o_proj|mlp\.dense_4h_to_h|attention\.dense|fc2|self_attn\.out_proj|"
           r"self_attention\.dense|experts\.\d+\.w2|shared_expert\.down_proj|experts\.\d+\.down_proj)\.weight$": "rows",
           r"\.(mlp|attn)\.c_proj\.weight$": "cols"}
FAMILIES = [n for n in SPECS if n not in ("smollm3", "gemma2", "gemma3_text", "mixtral-fused", "qwen3_moe")]


def reference(path, dirs, lam):
    """Every residual writer of layer l edited in torch: W - lam * U (U^T W), or W - lam * (W U) U^T."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        for name, w in load_file(f).items():
            kind = next((k for rx, k in WRITERS.items() if re.search(rx, name)), None)
            m = re.search(r"(?:layers|h)\.(\d+)\.", name)
            if kind is None or m is None or int(m.group(1)) not in dirs or w.ndim != 2:
                out[name] = w
                continue
            u, wf = torch.from_numpy(dirs[int(m.group(1))]), w.float()
            out[name] = (wf - lam * (u @ (u.T @ wf)) if kind == "rows" else wf - lam * ((wf @ u) @ u.T)).to(w.dtype)
    return out


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("rank", [1, 2])
def test_projection_equals_the_torch_reference(zoo, tmp_path, name, rank):  # noqa: F811
    base = zoo(name).path
    hidden = SPECS[name].config.get("hidden_size") or SPECS[name].config["n_embd"]
    rng = np.random.default_rng(rank)
    dirs = {l: np.linalg.qr(rng.standard_normal((hidden, rank)))[0].astype(np.float32) for l in (0, 1)}
    p = projection_patch(base, lam=0.75, rank=rank, directions=dirs)
    assert p.edits and all(e.encoding == "lowrank" and e.rank == rank for e in p.edits.values())
    assert p.provenance["method"] == "projection" and p.provenance["params"]["rank"] == rank
    path = p.save(tmp_path / "proj.safetensors")
    ops.apply(str(path), base, tmp_path / "out")
    got = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(f))
    want = reference(base, dirs, 0.75)
    assert sorted(got) == sorted(want)
    changed = [k for k in want if k in p.edits]
    assert len(changed) >= 4  # both kinds in both layers
    for k in want:
        assert got[k].view(torch.uint8).equal(want[k].contiguous().view(torch.uint8)), k


def test_modules_and_layers_select(zoo):  # noqa: F811
    base = zoo("llama").path
    dirs = {1: np.eye(32, 1, dtype=np.float32)}
    p = projection_patch(base, layers=[1], modules=["mlp"], directions=dirs)
    assert sorted(p.edits) == ["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(PatchkitError, match="layer 5"):
        projection_patch(base, layers=[5], directions=dirs)


def test_directions_from_a_stub_labelled_set():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 30)
    signal = np.zeros(16)
    signal[3] = 1.0
    feats = {l: rng.standard_normal((60, 16)) * 0.1 + labels[:, None] * signal * (l + 1) for l in range(3)}
    dirs, quality = directions_from_features(feats, labels, [0, 2], rank=2)
    assert dirs[0].shape == (16, 2) and np.allclose(dirs[0].T @ dirs[0], np.eye(2), atol=1e-6)
    assert abs(dirs[2][3, 0]) > 0.95 and dirs[2][3, 0] > 0 and quality[2]["held_out_auc"] == 1.0


def test_end_to_end_with_features_from_the_model(zoo, tmp_path):  # noqa: F811
    base = zoo("llama").path
    data = LabelledData(tuple(TEXTS) * 2, tuple(LABELS) * 2, ("good", "bad"), "0" * 64, "stub")
    p = projection_patch(base, data=data, layers=[0, 1], lam=1.0)
    prov = p.provenance
    assert prov["data"] == {"source": "stub", "sha256": "0" * 64, "examples": 24}
    assert set(prov["directions"]) == {"0", "1"} and all(0 <= d["held_out_auc"] <= 1 and sum(d["held_out"]) == 5 for d in prov["directions"].values())
    q = Patch.load(p.save(tmp_path / "p.safetensors"))
    assert q.id == p.id and len(q.edits) == 4


def test_cli_compute_method_projection(zoo, tmp_path, cli_runner):  # noqa: F811
    import json

    base = zoo("llama").path
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS * 2, LABELS * 2)))
    out = tmp_path / "p.safetensors"
    r = cli_runner("compute", base, "--method", "projection", "--data", data, "--lam", "0.5", "--layers", "1",
                   "--rank", "1", "--modules", "attn", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(next(line[line.index("{"):] for line in r.output.splitlines() if '"params"' in line))
    assert obj["params"] == {"lam": 0.5, "layers": [1], "rank": 1, "modules": ["attn"]}
    p = Patch.load(out)
    assert sorted(p.edits) == ["model.layers.1.self_attn.o_proj.weight"] and p.provenance["data"]["examples"] == 24
    human = cli_runner("inspect", out)
    assert "lowrank r1" in human.output
    r = cli_runner("compute", base, "--method", "projection", "-o", tmp_path / "q.safetensors")
    assert r.exit_code == 2 and "needs --data" in r.output
    r = cli_runner("compute", base, "-o", tmp_path / "q.safetensors")
    assert r.exit_code == 2 and "needs --probe" in r.output
    r = cli_runner("compute", base, "--method", "projection", "--data", data, "--layers", "0-1", "--modules", "attn",
                   "-o", tmp_path / "r.safetensors")
    assert r.exit_code == 0, r.output
    assert sorted(Patch.load(tmp_path / "r.safetensors").edits) == [f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)]
    r = cli_runner("compute", base, "--method", "projection", "--data", data, "--layers", "1-x", "-o", tmp_path / "s.safetensors")
    assert r.exit_code != 0 and "ranges such as 15-29" in r.output and not (tmp_path / "s.safetensors").exists()


def test_layer_features_in_one_pass_equal_extract_features_per_layer(zoo):  # noqa: F811
    from patchkit.method.activations import extract_features
    from patchkit.method.pipeline import load_model
    from patchkit.method.projection import layer_features

    model, tok = load_model(zoo("llama").path)
    got = layer_features(model, tok, TEXTS, [1, 0], batch_size=3)
    assert sorted(got) == [0, 1]
    for l in (0, 1):
        want = extract_features(model, tok, TEXTS, layer=l, pool="mean", batch_size=3, progress=False).numpy()
        assert got[l].shape == want.shape and np.array_equal(got[l], want), l


def test_direction_quality_is_a_held_out_auc_not_a_thresholded_accuracy():
    from patchkit.method.projection import held_out_quality

    # held out: every 5th of 40 texts, 4 toxic and 4 not; only their ranking on u counts (the training
    # texts, here far below both, would move a midpoint threshold but not the AUC)
    labels = np.array([i % 10 == 0 for i in range(40)])
    score = np.where(labels, 1.0, 0.0) + np.arange(40) * 1e-3
    score[~labels & (np.arange(40) % 5 != 0)] -= 50  # the training negatives pull the midpoint far down
    q = held_out_quality(score[:, None], labels, np.array([1.0]))
    assert q == {"held_out_auc": 1.0, "held_out": [4, 4]}
    assert held_out_quality(-score[:, None], labels, np.array([1.0]))["held_out_auc"] == 0.0
    assert held_out_quality(score[:, None], np.zeros(40, bool), np.array([1.0])) == {"held_out_auc": None, "held_out": [8, 0]}
