"""The fixed sets of values of patchkit's options, as enums: one list for the library's checks and the
command's `click.Choice`. Each layer declares its own in its `choices.py` with `choices(...)`; this one
holds core's (standard library only, so that `patchkit.cli` reads them at import without numpy)."""

from __future__ import annotations

from enum import Enum


def choices(name: str, spellings: str, doc: str, module: str = __name__) -> type[Enum]:
    """A str enum with one member per spelling, in order (`random-rows` is `RANDOM_ROWS`)."""
    enum = Enum(name, [(s.upper().replace("-", "_"), s) for s in spellings.split()], type=str, module=module, qualname=name)
    enum.__doc__ = doc
    return enum


def values(options: type[Enum]) -> list[str]:
    """The spellings of an enum's members, in order (for `click.Choice` and error messages)."""
    return [m.value for m in options]


OnOverlap = choices("OnOverlap", "sum error last",
                    "Rows edited by several patches in a merge: add the weighted deltas, refuse, or keep the last.")
