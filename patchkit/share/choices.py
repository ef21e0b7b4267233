"""The fixed sets of values of share's options, as enums (standard library only)."""

from __future__ import annotations

from ..core.choices import choices

AdapterFormat = choices("AdapterFormat", "peft", "What `patchkit export --to` writes.", __name__)
