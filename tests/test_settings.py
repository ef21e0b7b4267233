"""eval and tune share one settings object: its fields are the options of both commands (same names,
same defaults but where COMMAND_DEFAULTS says) and keyword arguments of both library functions."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from patchkit.cli import cli
from patchkit.evaluation.settings import COMMAND_DEFAULTS, Placement, RunSettings


def options(command: str) -> dict:
    return {p.name: p for p in cli.commands[command].params if p.name}


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_every_setting_is_an_option_with_its_default(command):
    opts = options(command)
    for f in dataclasses.fields(RunSettings):
        assert f.name in opts, f.name
        o = opts[f.name]
        assert o.opts == ["--" + f.name.replace("_", "-")]
        want = COMMAND_DEFAULTS[command].get(f.name, {}).get("default", f.default)
        assert o.is_flag == f.metadata["flag"]
        assert o.is_flag or o.default == want, (command, f.name)
        assert o.help == COMMAND_DEFAULTS[command].get(f.name, {}).get("help", f.metadata["help"])


def test_the_defaults_the_commands_had():
    ev, tu = options("eval"), options("tune")
    assert (ev["prompts"].default, tu["prompts"].default) == ("builtin:toxicity-eval", "builtin:toxic-prompts")
    assert (ev["samples"].default, tu["samples"].default, ev["temperature"].default, tu["temperature"].default) == (4, 1, 0.9, 0.0)
    assert (ev["max_new_tokens"].default, tu["max_new_tokens"].default, ev["limit"].default, tu["limit"].default) == (20, 32, None, 32)
    assert ev["benign_limit"].default == tu["benign_limit"].default == 32 and ev["seed"].default == tu["seed"].default == 0


def test_the_settings_are_keyword_arguments_of_the_library():
    from patchkit.evaluation.evaluate import evaluate
    from patchkit.evaluation.tune import tune
    from patchkit.method.pipeline import load_model, train_probe_for

    names = set(RunSettings().kwargs())
    assert names == {f.name for f in dataclasses.fields(RunSettings)}
    for fn in (evaluate, tune):
        assert names <= set(inspect.signature(fn).parameters), fn.__name__
    placement = set(Placement().kwargs())
    assert placement == {"device_map", "max_memory"} and placement <= names
    for fn in (load_model, train_probe_for):
        assert placement <= set(inspect.signature(fn).parameters), fn.__name__
    assert placement <= set(options("probe"))


def test_a_bad_setting_is_a_usage_error(cli_runner, tmp_path):
    r = cli_runner("eval", str(tmp_path), "--samples", "-1")
    assert r.exit_code == 2 and "--samples" in r.output and "Traceback" not in r.output
    r = cli_runner("tune", str(tmp_path), "--probe", "p", "-o", str(tmp_path / "o.safetensors"), "--max-kl", "1", "--device-map", "gpu")
    assert r.exit_code == 2 and "'gpu' is not one of 'auto', 'cpu', 'cuda'" in r.output
    assert not (tmp_path / "o.safetensors").exists()
