"""patchkit: small, verifiable, reversible weight patches for safetensors checkpoints.

The top-level names load lazily, so that `import patchkit` (and `patchkit inspect`) stay free of torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "Patch": ("patchkit.core.patchfile", "Patch"),
    "TensorEdit": ("patchkit.core.patchfile", "TensorEdit"),
    "Checkpoint": ("patchkit.core.checkpoint", "Checkpoint"),
    "apply": ("patchkit.core.ops", "apply"),
    "revert": ("patchkit.core.ops", "revert"),
    "plan_apply": ("patchkit.core.ops", "plan_apply"),
    "status": ("patchkit.core.ops", "status"),
    "diff": ("patchkit.core.diff", "diff"),
    "compute_patch": ("patchkit.method.compute", "compute_patch"),
    "merge_patches": ("patchkit.core.merge", "merge_patches"),
    "evaluate": ("patchkit.evaluation.evaluate", "evaluate"),
    "apply_in_memory": ("patchkit.evaluation.inmemory", "apply_in_memory"),
    "revert_in_memory": ("patchkit.evaluation.inmemory", "revert_in_memory"),
    "patched": ("patchkit.evaluation.inmemory", "patched"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'patchkit' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
