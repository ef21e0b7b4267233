"""The `patchkit` command: thin click commands that parse, call the library, and print.

This module assembles the group from the command modules (core, method, eval, share: each a
list COMMANDS), and holds the one error table (`PatchkitGroup.invoke`): the library raises the typed
errors of patchkit.errors, and they are turned into one line and their exit code there and nowhere
else (a command's own usage error is a `CommandFailed`, exit 2); set PATCHKIT_DEBUG=1 to see the
traceback instead.
`run` is the console script's entry point and `python -m patchkit`'s.

The commands may import anything in patchkit, inside the command functions, so that `--help` and
the fast commands load only what they use; at module level they read only the options' enums (the
`choices.py` modules) and eval/tune's `RunSettings`, standard library all. Nothing outside
patchkit.cli imports it.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import warnings

import click

from .. import __version__
from ..errors import PatchkitError
from . import core, method, share
from . import eval as eval_commands
from ._common import CommandFailed


class PatchkitGroup(click.Group):
    """The one place where errors become messages: PatchkitError and OSError, one line each."""

    def invoke(self, ctx):
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"warning: {msg}", err=True)
        try:
            return super().invoke(ctx)
        except PatchkitError as e:
            if os.environ.get("PATCHKIT_DEBUG"):
                raise
            raise CommandFailed(str(e), e.exit_code) from None
        except OSError as e:
            if os.environ.get("PATCHKIT_DEBUG"):
                raise
            where = f": {e.filename}" if e.filename else ""
            raise CommandFailed(f"{e.strerror or e}{where}", 1) from None


@click.group(cls=PatchkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="patchkit")
def cli():
    """Small, verifiable, reversible weight patches for safetensors checkpoints."""


for _module in (core, method, eval_commands, share):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main(argv=None):
    """Run the command line (raises SystemExit, like every click program)."""
    cli.main(args=argv, prog_name="patchkit")


# Commands that use numpy for element-wise work and a few vector products only (not export, whose
# SVD of dense deltas is real BLAS work). numpy's OpenBLAS starts one thread per core when numpy is
# imported, and those threads spin for a while waiting for work that never comes here, taking the
# cores that patchkit's own threads read, hash and compute on (apply --in-place of the benchmark
# patch: 175 -> 160 ms on 2 cores). A value the user set is kept.
_NO_BLAS_COMMANDS = {"apply", "revert", "status", "inspect", "diff", "merge"}


def _quiet_blas(argv: list[str]) -> None:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in _NO_BLAS_COMMANDS:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def run() -> None:
    """Entry point of the `patchkit` console script and of `python -m patchkit`.

    Runs `main`, then ends the process without tearing the interpreter down: freeing every object
    and module one by one takes longer than a fast command itself (about 20 ms after an apply).
    Output is flushed and exit handlers run first; with threads still running, or under a tracer or
    profiler, it exits normally.
    """
    _quiet_blas(sys.argv[1:])
    try:
        main()
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    others = any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread())
    if others or sys.gettrace() is not None or sys.getprofile() is not None:  # a profiler reports at exit
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)
