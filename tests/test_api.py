"""The top-level Python API named in the README: lazy names that resolve and work together."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from conftest import build_patch
from helpers import snapshot

import patchkit
from patchkit.core.checkpoint import Checkpoint
from patchkit.method.probe import Probe


def test_readme_api_round_trip(copy_ckpt, tmp_path):
    base = copy_ckpt("bf16", True)
    before = snapshot(base)
    fix = build_patch(base, seed=3).save(tmp_path / "fix.safetensors")
    patch = patchkit.Patch.load(fix)
    assert patchkit.apply(fix, base, tmp_path / "fixed")["rows"] == patch.rows
    ck = Checkpoint(base)
    probe = Probe(weight=torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), bias=torch.zeros(2),
                  model_fingerprint=ck.fingerprint())
    detox = patchkit.compute_patch(base, probe, top_k=6, alpha=1.08)
    both = patchkit.merge_patches([patch, detox], on_overlap="sum", base=base)
    assert both.rows == len({(n, r) for p in (patch, detox) for n, e in p.edits.items() for r in e.rows.tolist()})
    patchkit.apply(both, base, in_place=True)
    assert patchkit.status(base)["applied"][0]["id"] == both.id
    patchkit.revert(both, base, in_place=True)
    assert snapshot(base) == before
    diffed = patchkit.diff(base, tmp_path / "fixed", max_changed=1.0)  # the patch edits a 1-d norm: one row
    assert set(diffed.edits) == set(patch.edits)
    assert np.array_equal(diffed.edits[sorted(patch.edits)[0]].rows, patch.edits[sorted(patch.edits)[0]].rows)


def test_import_patchkit_does_not_import_torch():
    code = "import sys, patchkit; patchkit.Patch; patchkit.apply; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def all_packages_and_modules():
    """Every package and module of patchkit (imported; `patchkit.__main__` would run the command)."""
    import importlib
    import pkgutil

    names = ["patchkit"] + [m.name for m in pkgutil.walk_packages(patchkit.__path__, "patchkit.")
                            if m.name != "patchkit.__main__"]
    return {name: importlib.import_module(name) for name in names}


def test_exported_names_are_what_they_say_after_every_submodule_is_imported():
    """A lazy export that shares its name with a submodule is replaced by the module as soon as the
    submodule is imported (`import patchkit.evaluate` used to make `patchkit.evaluate` a module).
    With everything imported, each package's exports are still functions or classes, and the same
    object on a second access."""
    import inspect
    import pkgutil

    modules = all_packages_and_modules()
    packages = {name: m for name, m in modules.items() if hasattr(m, "__path__")}
    assert {"patchkit.core", "patchkit.method", "patchkit.evaluation", "patchkit.share", "patchkit.cli"} <= set(packages)
    checked = 0
    for name, package in packages.items():
        submodules = {m.name for m in pkgutil.iter_modules(package.__path__)}
        for export in getattr(package, "__all__", []):
            if export.startswith("__"):
                continue
            assert export not in submodules, f"{name}.{export} is both an export and a submodule"
            first, second = getattr(package, export), getattr(package, export)
            assert first is second, f"{name}.{export}"
            if callable(first):
                assert inspect.isfunction(first) or inspect.isclass(first), f"{name}.{export} is {first!r}"
            assert export in dir(package)
            checked += 1
    assert checked >= len(patchkit.__all__) - 1


FRESH_PROCESS_CHECK = """
import importlib, inspect, pkgutil, patchkit

def exports():
    out = {}
    for name in patchkit.__all__:
        if name.startswith("__"):
            continue
        value = getattr(patchkit, name)
        assert inspect.isfunction(value) or inspect.isclass(value), (name, value)
        out[name] = value
    return out

before = exports()                      # nothing imported yet but what the names need
for m in pkgutil.walk_packages(patchkit.__path__, "patchkit."):
    if m.name != "patchkit.__main__":
        importlib.import_module(m.name)
after = exports()                       # every submodule imported: the same objects
assert before == after, {k for k in before if before[k] is not after[k]}
import patchkit.evaluation.evaluate as m
assert callable(patchkit.evaluate) and patchkit.evaluate is m.evaluate
"""


def test_exports_survive_importing_every_submodule_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_an_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        patchkit.nothing_here  # noqa: B018
