"""Probes: accuracy on separable data, determinism, held-out/k-fold reporting, files."""

from __future__ import annotations

import hashlib

import pytest
import torch

from patchkit.errors import DataError, ProbeError
from patchkit.method.probe import Probe, load_probe, save_probe, train_layer_probes, train_probe


def separable(n: int = 240, hidden: int = 24, seed: int = 0, margin: float = 2.0):
    """Two Gaussian clouds split along a hidden axis, with a bias shared by both."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.randn(hidden, generator=gen)
    axis /= axis.norm()
    y = torch.arange(n) % 2
    x = torch.randn(n, hidden, generator=gen) + 3.0 + margin * (2 * y - 1).unsqueeze(1).float() * axis
    return x, y, axis


def test_probe_reaches_near_perfect_accuracy_on_separable_features():
    x, y, axis = separable()
    probe = train_probe(x, y, seed=0)
    assert probe.train_accuracy >= 0.97
    assert probe.heldout_accuracy is not None and probe.heldout_accuracy >= 0.95
    assert probe.heldout_method.startswith("split:")
    # the behaviour row points along the class-1 side of the axis
    w = probe.weight[1] - probe.weight[0]
    assert torch.nn.functional.cosine_similarity(w, axis, dim=0) > 0.8
    assert torch.equal(probe.direction, probe.weight[1])
    assert (probe.predict(x) == y).float().mean() >= 0.97


def test_small_sets_use_kfold_and_the_final_probe_sees_all_data():
    x, y, _ = separable(n=60)
    probe = train_probe(x, y, seed=1)
    assert probe.heldout_method == "5-fold" and probe.training["kfold"] == 5
    assert probe.heldout_accuracy >= 0.9 and probe.n_examples == 60
    forced = train_probe(x, y, seed=1, kfold=0)
    assert forced.heldout_method.startswith("split:")
    three = train_probe(x, y, seed=1, kfold=3)
    assert three.heldout_method == "3-fold"


def test_random_labels_do_not_generalise():
    x, _y, _ = separable(n=300, margin=0.0)
    y = torch.randint(0, 2, (300,), generator=torch.Generator().manual_seed(5))
    probe = train_probe(x, y, seed=0, kfold=5)
    assert probe.heldout_accuracy < 0.7  # chance level, not the near-perfect fit above


def _bytes(probe: Probe, tmp_path, name: str) -> bytes:
    return save_probe(probe, tmp_path / name).read_bytes()


def test_same_inputs_give_bitwise_identical_probe_files(tmp_path):
    x, y, _ = separable()
    kw = dict(model_fingerprint="m", data_hash="d", label_names=("non-toxic", "toxic"))
    torch.manual_seed(123)  # global RNG state must not matter
    a = train_probe(x, y, seed=7, **kw)
    torch.manual_seed(999)
    torch.rand(10)
    b = train_probe(x, y, seed=7, **kw)
    c = train_probe(x, y, seed=8, **kw)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert _bytes(a, tmp_path, "a.safetensors") == _bytes(b, tmp_path, "b.safetensors")
    assert not torch.equal(a.weight, c.weight)
    assert hashlib.sha256(_bytes(a, tmp_path, "a2.safetensors")).hexdigest() == hashlib.sha256(
        _bytes(a, tmp_path, "a.safetensors")
    ).hexdigest()


def test_save_load_round_trip_with_layer_probes(tmp_path):
    x, y, _ = separable(n=80, hidden=8)
    main = train_probe(x, y, seed=0, layer=-1, pool="last", model_fingerprint="fp", data_hash="dh", label_names=("a", "b"))
    per_layer = {0: x * 0.5, 2: x + 1.0}
    probe = train_layer_probes(per_layer, y, main)
    assert set(probe.layer_probes) == {0, 2} and set(probe.layer_directions) == {0, 2}
    assert all(acc is not None and acc > 0.8 for acc in probe.layer_accuracies.values())
    path = save_probe(probe, tmp_path / "sub" / "p.safetensors")
    assert not list((tmp_path / "sub").glob("*.tmp"))  # no temp file left behind
    back = load_probe(path)
    assert torch.equal(back.weight, probe.weight) and torch.equal(back.bias, probe.bias)
    assert back.label_names == ("a", "b") and back.pool == "last" and back.layer == -1
    assert back.model_fingerprint == "fp" and back.data_hash == "dh" and back.n_examples == 80
    assert back.heldout_accuracy == probe.heldout_accuracy and back.training == probe.training
    for i in (0, 2):
        assert torch.equal(back.layer_probes[i][0], probe.layer_probes[i][0])
        assert torch.equal(back.layer_directions[i], probe.layer_directions[i])
    assert back.layer_accuracies == probe.layer_accuracies


def test_behaviour_index_selects_the_direction_row():
    x, y, _ = separable(n=80)
    p = train_probe(x, 1 - y, behavior_index=0)
    assert torch.equal(p.direction, p.weight[0])
    assert (p.predict(x) == y).float().mean() >= 0.95  # predicts class 0 of the flipped labels = y


def test_load_probe_rejects_missing_garbage_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ProbeError, match="no such probe file"):
        load_probe(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ProbeError, match="not a safetensors file"):
        load_probe(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 3)}, foreign, metadata={"format": "pt"})
    with pytest.raises(ProbeError, match="not a patchkit probe"):
        load_probe(foreign)
    broken = tmp_path / "broken.safetensors"
    save_file({"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, broken, metadata={"format": "patchkit-probe", "version": "1", "probe": "{}"})
    with pytest.raises(ProbeError, match="damaged"):
        load_probe(broken)
    future = tmp_path / "future.safetensors"
    save_file({"weight": torch.zeros(2, 3)}, future, metadata={"format": "patchkit-probe", "version": "9"})
    with pytest.raises(ProbeError, match="version"):
        load_probe(future)
    for err in (ProbeError,):
        try:
            load_probe(garbage)
        except err as e:
            assert "\n" not in str(e)


def test_bad_training_inputs_raise_data_errors():
    x, y, _ = separable(n=40)
    with pytest.raises(DataError):
        train_probe(x, torch.zeros(40, dtype=torch.long))
    with pytest.raises(DataError):
        train_probe(x, y[:-1])
    with pytest.raises(DataError):
        train_probe(x, y * 2)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(DataError):
        train_probe(bad, y)
    with pytest.raises(DataError):
        train_probe(x[:12], y[:12], kfold=10)
