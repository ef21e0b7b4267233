"""patchkit.method: from a model to a patch, the paper's method.

Here live the table of model families and their target tensors (targets), labelled data and the
built-in sets (data), hidden-state features (activations), behaviour probes and their file
(probe, probefile), the row selection in numpy (select), the edit as a patch (compute), the
other methods: projecting behaviour directions out of the residual writers (projection) and
damping neurons (damping), the embedded models (embedded: SmolLM2-135M-Instruct and Gemma 3 270M
from PyPI GGUFs), the steps wired together for the commands (pipeline: the one model loader and
the one model-reference resolver), and the option values as enums (choices).
It may import patchkit.core, patchkit.share (a Hub model id becomes a local snapshot) and
torch/transformers, the latter only where a model is run (activations, probe, embedded,
pipeline): compute and select read checkpoints with numpy, so `patchkit compute` stays light.
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "compute_patch": "patchkit.method.compute",
    "train_probe_for": "patchkit.method.pipeline",
    "checkpoint_for_compute": "patchkit.method.pipeline",
    "resolve_model": "patchkit.method.pipeline",
    "load_model": "patchkit.method.pipeline",
    "Probe": "patchkit.method.probe",
    "train_probe": "patchkit.method.probe",
    "load_probe": "patchkit.method.probe",
    "save_probe": "patchkit.method.probe",
    "resolve_targets": "patchkit.method.targets",
    "family_for": "patchkit.method.targets",
    "extract_features": "patchkit.method.activations",
    "embedded_model_path": "patchkit.method.embedded",
})
del lazy_exports
