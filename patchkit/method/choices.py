"""The fixed sets of values of the method's options, as enums (standard library only: the command
reads them at import, without numpy or torch)."""

from __future__ import annotations

from ..core.choices import choices

Strategy = choices("Strategy", "paper layer-matched random-rows random-direction",
                   "How compute selects rows and directions (see patchkit.method.select).", __name__)
Pool = choices("Pool", "mean last", "How a text's hidden states become one feature vector.", __name__)
EditMethod = choices("EditMethod", "probe projection damping",
                     "What `patchkit compute --method` makes: the paper's gate-neuron edit, a projection, or damping.", __name__)
Modules = choices("Modules", "both mlp attn", "Which residual writers a projection edits.", __name__)
DeviceMap = choices("DeviceMap", "auto cpu cuda", "Where `load_model` puts the model's layers (accelerate's "
                    "big-model inference): spread by `auto`, or all on one device.", __name__)
