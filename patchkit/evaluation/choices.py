"""The fixed sets of values of the evaluation's options, as enums (standard library only: the
command reads them at import, without torch)."""

from __future__ import annotations

from ..core.choices import choices

Goal = choices("Goal", "lower higher", "Which judge scores are better.", __name__)
Metric = choices("Metric", "mean rate expected_max p_any", "What tune maximises (or minimises) of a judge's scores.", __name__)
