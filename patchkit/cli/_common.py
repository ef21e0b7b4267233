"""What every command shares: printing a result (human or `--json`), the `--json` option, short
ids and sizes, and `CommandFailed`, a usage or library error shown as one line with its exit code.

Imports click only; the command modules import it, never one another.
"""

from __future__ import annotations

import json

import click


def emit(ctx_json: bool, data: dict, human) -> None:
    if ctx_json:
        click.echo(json.dumps(data, sort_keys=True, default=str))
    else:
        human(data)


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
