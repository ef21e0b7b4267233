"""Every fixed set of option values is one enum: the command's click.Choice is built from it, and the
library checks against the same enum (a value added in one place is accepted in the other)."""

from __future__ import annotations

import click

from patchkit.cli import cli
from patchkit.core.choices import OnOverlap, values
from patchkit.evaluation.choices import ControlKind, ControlMatch, Goal, Metric
from patchkit.method.choices import DeviceMap, EditMethod, Modules, Pool, Strategy
from patchkit.share.choices import AdapterFormat

EXPECTED = {
    ("apply", "on_overlap"): OnOverlap, ("merge", "on_overlap"): OnOverlap,
    ("compute", "strategy"): Strategy, ("compute", "edit_method"): EditMethod, ("compute", "modules"): Modules,
    ("probe", "pool"): Pool, ("probe", "device_map"): DeviceMap,
    ("tune", "metric"): Metric, ("tune", "goal"): Goal, ("tune", "device_map"): DeviceMap,
    ("tune", "edit_method"): EditMethod, ("tune", "modules"): Modules,
    ("eval", "device_map"): DeviceMap, ("eval", "control_match"): ControlMatch,
    ("eval", "control_kinds"): ControlKind, ("export", "fmt"): AdapterFormat,
}


def test_every_choice_option_is_its_enum():
    found = {(name, p.name): list(p.type.choices) for name, command in cli.commands.items() for p in command.params
             if isinstance(p.type, click.Choice)}
    assert set(found) == set(EXPECTED)  # a new Choice needs its enum here
    for key, enum in EXPECTED.items():
        assert found[key] == values(enum), key


def test_library_checks_use_the_same_enums():
    from patchkit.core.merge import POLICIES
    from patchkit.evaluation.evaluate import CONTROL_MATCH
    from patchkit.evaluation.tune import GOALS, METRICS
    from patchkit.method.activations import POOLS
    from patchkit.method.select import Strategy as SelectStrategy

    assert POLICIES == tuple(values(OnOverlap)) and POOLS == tuple(values(Pool))
    assert METRICS == tuple(values(Metric)) and GOALS == tuple(values(Goal))
    assert SelectStrategy is Strategy and CONTROL_MATCH == tuple(values(ControlMatch))
    from patchkit.evaluation.controls import CONTROL_KINDS

    assert sorted(values(ControlKind)) == sorted({k for kinds in CONTROL_KINDS.values() for k in kinds})


def test_the_library_refuses_a_value_outside_the_enum(tmp_path):
    import pytest

    from patchkit.core.merge import combine_edits
    from patchkit.errors import DataError, MergeError
    from patchkit.method.pipeline import load_model

    with pytest.raises(MergeError, match="use one of sum, error, last"):
        combine_edits([], on_overlap="average")
    with pytest.raises(DataError, match="use one of auto, cpu, cuda"):
        load_model(tmp_path, device_map="gpu")


def test_a_value_outside_the_choice_is_a_usage_error(cli_runner, tmp_path):
    r = cli_runner("merge", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "m.safetensors"), "--on-overlap", "average")
    assert r.exit_code == 2 and "'average' is not one of 'sum', 'error', 'last'" in r.output
    assert not (tmp_path / "m.safetensors").exists()
