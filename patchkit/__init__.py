"""patchkit: small, verifiable, reversible weight patches for safetensors checkpoints.

The top-level names load lazily, so that `import patchkit` (and `patchkit inspect`) stay free of torch.
No name here is also a top-level submodule (core, method, evaluation, share, cli, errors), so that
`patchkit.evaluate` is the function whatever has been imported before.
"""

__version__ = "0.1.0"

from .core.lazy import lazy_exports  # noqa: E402  (after __version__, which core modules read)

__getattr__, __dir__, _names = lazy_exports(__name__, {
    "Patch": "patchkit.core.patchfile",
    "TensorEdit": "patchkit.core.patchfile",
    "Checkpoint": "patchkit.core.checkpoint",
    "apply": "patchkit.core.ops",
    "revert": "patchkit.core.ops",
    "plan_apply": "patchkit.core.plan",
    "status": "patchkit.core.ops",
    "diff": "patchkit.core.diff",
    "compute_patch": "patchkit.method.compute",
    "merge_patches": "patchkit.core.merge",
    "evaluate": "patchkit.evaluation.evaluate",
    "apply_in_memory": "patchkit.evaluation.inmemory",
    "revert_in_memory": "patchkit.evaluation.inmemory",
    "patched": "patchkit.evaluation.inmemory",
})
del lazy_exports

__all__ = ["__version__", *_names]
del _names
