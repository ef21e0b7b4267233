"""Damping (AurA, patchkit/method/damping.py): AUROC per MLP neuron, gamma = 1 - Gini, stored as scale edits of up_proj
rows that reproduce the torch computation bit for bit and revert exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from patchkit.core import ops
from patchkit.core.patchfile import Patch
from patchkit.errors import PatchkitError
from patchkit.method.damping import aura_gamma, auroc, damping_patch, neuron_activations
from patchkit.method.data import LabelledData
from test_architectures import LABELS, TEXTS, zoo  # noqa: F401  (fixture)


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(30, 5)).astype(np.float32)  # many ties
    y = rng.integers(0, 2, 30)
    y[:2] = [0, 1]
    want = [np.mean([(a > b) + 0.5 * (a == b) for a in s[y == 1, m] for b in s[y == 0, m]]) for m in range(5)]
    assert np.allclose(auroc(s, y), want, atol=1e-12)
    g = aura_gamma(np.array([0.2, 0.5, 0.75, 1.0]))
    assert g.tolist() == [1.0, 1.0, 0.5, 0.0]
    assert aura_gamma(np.array([0.6, 0.9, 0.8]), fraction=0.34).tolist() == [1.0, np.float32(1 - 0.8), 1.0]


def test_damping_patch_equals_the_torch_reference(zoo, tmp_path):  # noqa: F811
    from patchkit.method.pipeline import load_model

    base = zoo("llama").path
    model, tok = load_model(base)
    acts = neuron_activations(model, tok, TEXTS)
    assert sorted(acts) == [0, 1] and acts[0].shape == (len(TEXTS), 48)
    data = LabelledData(tuple(TEXTS), tuple(LABELS), ("good", "bad"), "0" * 64, "stub")
    p = damping_patch(base, data=data, fraction=0.25, model=model, tokenizer=tok)
    assert {e.encoding for e in p.edits.values()} == {"scale"} and p.provenance["method"] == "damping"
    assert sum(e.n_rows for e in p.edits.values()) <= round(0.25 * 96)
    path = p.save(tmp_path / "damp.safetensors")
    ops.apply(str(path), base, tmp_path / "out")
    got, ref = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    for name, w in ref.items():
        want = w.clone()
        if name in p.edits:
            e = p.edits[name]
            rows = torch.from_numpy(e.rows.copy())
            want[rows] = (w[rows].float() * torch.from_numpy(e.gamma.copy())[:, None]).to(w.dtype)
        assert got[name].view(torch.uint8).equal(want.view(torch.uint8)), name
    assert Patch.load(path).id == p.id
    ops.revert(str(path), tmp_path / "out", tmp_path / "back")
    assert all(load_file(tmp_path / "back" / "model.safetensors")[k].view(torch.uint8).equal(v.view(torch.uint8)) for k, v in ref.items())


def test_damping_from_given_aurocs_equals_from_activations(zoo):  # noqa: F811
    from patchkit.method.pipeline import load_model

    base = zoo("llama").path
    model, tok = load_model(base)
    acts = neuron_activations(model, tok, TEXTS)
    a = damping_patch(base, activations=acts, labels=LABELS, fraction=0.25)
    b = damping_patch(base, aurocs={l: auroc(v, LABELS) for l, v in acts.items()}, fraction=0.25)
    assert a.id == b.id
    with pytest.raises(PatchkitError, match="layer 7"):
        damping_patch(base, aurocs={l: auroc(v, LABELS) for l, v in acts.items()}, layers=[7])
