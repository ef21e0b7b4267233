"""patchkit.core: checkpoints, patch files and what is done with them, byte for byte.

Here live the safetensors reader and writer (stfile), a tensor's rows read and written in place
(tensorio), the dtypes' rounding in numpy (dtypes), a checkpoint folder (checkpoint), the patch file format and one tensor's edit (patchfile), the
arithmetic of the v1.1 encodings, lowrank and scale (encodings), fitting a lowrank edit (lowrank), the
bounded checks of a patch file's metadata and arrays (patchcheck), planning apply/revert (plan),
carrying a plan out (writes) and the commands apply/revert/status (ops) under the `.patchkit/`
state (state), its checksummed undo records (records), the lock and journal (journal), diff and
merge, and small helpers (fsutil, parallel, lazy). It may import numpy, the
standard library and patchkit.errors only: never torch, transformers or huggingface_hub, so that
`inspect`, `apply`, `revert` and `status` start fast. The one way out is a function-local import of
patchkit.share.sources, to turn an `hf://` reference into a local file when one is given.
(`diff`, the function, is `patchkit.diff` or `patchkit.core.diff.diff`: the name is the module's.)
"""

from .lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Checkpoint": "patchkit.core.checkpoint",
    "Patch": "patchkit.core.patchfile",
    "TensorEdit": "patchkit.core.patchfile",
    "make_edit": "patchkit.core.patchfile",
    "Plan": "patchkit.core.plan",
    "plan_apply": "patchkit.core.plan",
    "plan_revert": "patchkit.core.plan",
    "apply": "patchkit.core.ops",
    "revert": "patchkit.core.ops",
    "status": "patchkit.core.ops",
    "merge_patches": "patchkit.core.merge",
})
del lazy_exports
