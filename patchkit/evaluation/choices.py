"""The fixed sets of values of the evaluation's options, as enums (standard library only: the
command reads them at import, without torch)."""

from __future__ import annotations

from ..core.choices import choices

Goal = choices("Goal", "lower higher", "Which judge scores are better.", __name__)
Metric = choices("Metric", "mean rate expected_max p_any", "What tune maximises (or minimises) of a judge's scores.", __name__)
ControlMatch = choices("ControlMatch", "kl strength", "What a control shares with its patch: its next-token KL on benign "
                       "text (its strength searched), or the patch's strength.", __name__)
ControlKind = choices("ControlKind", "random-rows random-direction label-shuffled random-neurons",
                      "The kinds of control patches; which fit a patch depends on its method.", __name__)
