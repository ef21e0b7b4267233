"""Typed errors. The library raises these; `patchkit.cli` turns each into one line and an exit code.

Every error carries the fields a caller may want to act on (which file, which tensor, what was
expected and what was found) and a message that says what to do next.
"""

from __future__ import annotations

from pathlib import Path


class PatchkitError(Exception):
    """Base class. `exit_code` is what the command line exits with."""

    exit_code = 1

    def __init__(self, message: str, **fields):
        super().__init__(message)
        self.message = message
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split("\n"))


class PatchFormatError(PatchkitError):
    """A patch file that is missing, truncated, not safetensors, or not a valid patchkit patch."""

    exit_code = 3


class CheckpointError(PatchkitError):
    """A checkpoint folder that cannot be read or written as a safetensors checkpoint."""

    exit_code = 4


class BaseMismatchError(PatchkitError):
    """A patch made for another base: shape, dtype or the touched rows' bytes differ."""

    exit_code = 5


class StateError(PatchkitError):
    """The checkpoint's record of applied patches forbids the operation (not applied, applied twice,
    reverted out of order, a child still applied...)."""

    exit_code = 6


class OutputExistsError(PatchkitError):
    """An output file or folder that exists already, and no --overwrite."""

    exit_code = 7

    @classmethod
    def check(cls, path, overwrite: bool = False) -> None:
        """The one check before writing an output: raise unless `path` is free or may be replaced."""
        if not overwrite and Path(path).exists():
            raise cls(f"output {path} already exists (use --overwrite to replace it)", path=Path(path))


class LockedError(PatchkitError):
    """Another patchkit process is writing this checkpoint."""

    exit_code = 8


class DataError(PatchkitError):
    """Labelled data or prompts that cannot be used (bad row, missing field, one class only)."""

    exit_code = 9


class ProbeError(PatchkitError):
    """A probe file that is invalid, or made for another model."""

    exit_code = 10


class UnsupportedError(PatchkitError):
    """An architecture, dtype or encoding that this version does not handle yet."""

    exit_code = 11


class NonFiniteError(PatchkitError):
    """Applying the edit would turn finite weights into inf or NaN."""

    exit_code = 13


class TooDenseError(PatchkitError):
    """diff: a tensor changed in more of its rows than the threshold allows."""

    exit_code = 14


class MergeError(PatchkitError):
    """Patches that cannot be merged as asked: rows edited by several of them under
    `--on-overlap error` (or a replacement under `sum`), or a fingerprint that needs the base."""

    exit_code = 15


class HubError(PatchkitError):
    """The Hub could not be reached or refused the request."""

    exit_code = 12
