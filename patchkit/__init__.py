"""patchkit: small, verifiable, reversible weight patches for safetensors checkpoints.

The top-level names load lazily, so that `import patchkit` (and `patchkit inspect`) stay free of torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "Patch": ("patchkit.format", "Patch"),
    "TensorEdit": ("patchkit.format", "TensorEdit"),
    "Checkpoint": ("patchkit.checkpoint", "Checkpoint"),
    "apply": ("patchkit.ops", "apply"),
    "revert": ("patchkit.ops", "revert"),
    "plan_apply": ("patchkit.ops", "plan_apply"),
    "status": ("patchkit.ops", "status"),
    "diff": ("patchkit.diffing", "diff"),
    "compute_patch": ("patchkit.compute", "compute_patch"),
    "merge_patches": ("patchkit.merge", "merge_patches"),
    "evaluate": ("patchkit.evaluate", "evaluate"),
    "apply_in_memory": ("patchkit.memory", "apply_in_memory"),
    "revert_in_memory": ("patchkit.memory", "revert_in_memory"),
    "patched": ("patchkit.memory", "patched"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'patchkit' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
