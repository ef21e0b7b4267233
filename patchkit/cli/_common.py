"""What every command shares: printing a result (human or `--json`), the `--json` option, short
ids and sizes, `CommandFailed` (a usage error shown as one line with its exit code), `choice` (a
click.Choice of a library enum) and `options_from` (click options made from a dataclass's fields).

Imports click and patchkit.core.choices (standard library) only; the command modules import it,
never one another.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum

import click

from ..core.choices import values


def emit(ctx_json: bool, data: dict, human) -> None:
    if ctx_json:
        click.echo(json.dumps(data, sort_keys=True, default=str))
    else:
        human(data)


def choice(options: type[Enum]) -> click.Choice:
    """A click.Choice of an option's enum, so that the command and the library accept the same values."""
    return click.Choice(values(options))


def options_from(settings: type, overrides: dict[str, dict] | None = None):
    """click options, one per field of the dataclass `settings` (`--name-with-dashes`), made from the
    field's metadata (help, type, min, choice, flag) and default; `overrides` changes a field's
    default or help for one command."""

    def decorate(f):
        for fl in reversed(dataclasses.fields(settings)):
            meta = {"default": fl.default, **fl.metadata, **(overrides or {}).get(fl.name, {})}
            name = "--" + fl.name.replace("_", "-")
            if meta["flag"]:
                f = click.option(name, fl.name, is_flag=True, help=meta["help"])(f)
                continue
            if meta["choice"] is not None:
                kind = choice(meta["choice"])
            elif meta["min"] is not None:
                kind = (click.IntRange if meta["type"] is int else click.FloatRange)(meta["min"])
            else:
                kind = meta["type"]
            f = click.option(name, fl.name, type=kind, default=meta["default"], show_default=meta["default"] is not None,
                             help=meta["help"])(f)
        return f

    return decorate


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")(f)


def short(pid: str) -> str:
    return pid[:12]


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class CommandFailed(click.ClickException):
    """A library error, shown as one line with the error's own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)
