"""Downloads from the Hugging Face Hub: patches (`hf://` refs) and base models, into the HF cache.

`hf_hub_download` and `snapshot_download` do the transfers (offline or with the network down, the
cache answers); nothing is written on failure (the client downloads into a temporary file that it
removes when the transfer fails), and a downloaded patch that fails verification is evicted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.patchfile import FORMAT_NAME, Patch
from ..errors import CheckpointError, HubError, PatchFormatError
from .hub import (
    COMMIT_HASH,
    cache_dir,
    cached_commit,
    endpoint,
    hub_api,
    hub_error,
    is_hub_exception,
    location,
    offline,
    parse_model_ref,
    parse_patch_ref,
    reachable,
    storage_folder,
)

# Files of a model repo that are always fetched with its weights: config, tokenizer, generation, chat template.
MODEL_METADATA_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "*.safetensors.index.json",
]
WEIGHT_PATTERNS = ["*.safetensors"]
INDEX_FILE = "model.safetensors.index.json"
#: commit hashes resolved by `download_model` / `resolved_revision`, by reference (for base fingerprints)
RESOLVED: dict[str, str] = {}


def _download_error(e: Exception, repo_id: str, revision: str | None, path: str | None, net_down: bool) -> Exception:
    """The one-line error for a failed download: the network was down and the cache had no copy, or
    whatever the Hub answered."""
    if net_down:
        return HubError(f"network unreachable ({endpoint()}) and {location(repo_id, revision, path)} is not in the cache: "
                        "nothing was written", repo_id=repo_id)
    return hub_error(e, repo_id, revision, path)


# ---- patches ---------------------------------------------------------------------------------------------
def _header_is_patch(path: Path) -> bool:
    from ..core.stfile import read_header

    try:
        return read_header(path).metadata.get("format") == FORMAT_NAME
    except Exception:
        return False


def _pick_patch(repo_id: str, revision: str | None, names: list[str], is_patch) -> str:
    candidates = sorted(n for n in names if n.endswith(".safetensors"))
    where = location(repo_id, revision)
    if not candidates:
        raise HubError(f"{where} holds no .safetensors file, so no patchkit patch", repo_id=repo_id)
    if len(candidates) > 1:
        candidates = [n for n in candidates if is_patch(n)]
        if not candidates:
            raise HubError(f"{where} holds .safetensors files but none is a patchkit patch", repo_id=repo_id)
    if len(candidates) > 1:
        listing = ", ".join(candidates)
        raise HubError(
            f"{where} holds {len(candidates)} patches ({listing}): name one, e.g. hf://{repo_id}/{candidates[0]}",
            repo_id=repo_id, candidates=candidates,
        )
    return candidates[0]


def _cached_patch_path(repo_id: str, revision: str | None) -> Path:
    """The patch of a repo, from the cache only (offline, or network unreachable)."""
    commit = cached_commit(repo_id, revision)
    snap = storage_folder(repo_id) / "snapshots" / commit if commit else None
    if snap is None or not snap.is_dir():
        raise FileNotFoundError
    names = [str(p.relative_to(snap)) for p in snap.rglob("*.safetensors")]
    name = _pick_patch(repo_id, revision, names, lambda n: _header_is_patch(snap / n))
    return snap / name


def download_patch(ref: str, token=None) -> Path:
    """A local copy (in the HF cache) of the patch named by `hf://OWNER/REPO[/PATH][@REVISION]`.

    Without PATH, the repo's only `.safetensors` file that is a patchkit patch. The file is loaded with
    `Patch.load`, which checks its content id; a file that fails is an error, not a return value.
    """
    from huggingface_hub import hf_hub_download

    repo_id, path, revision = parse_patch_ref(ref)
    is_offline = offline()
    net_down = not is_offline and not reachable()
    local_only = is_offline or net_down
    try:
        if path is None:
            if local_only:
                try:
                    local = _cached_patch_path(repo_id, revision)
                except FileNotFoundError:
                    why = "HF_HUB_OFFLINE is set" if is_offline else f"network unreachable ({endpoint()})"
                    raise HubError(f"{why} and {location(repo_id, revision)} is not in the cache ({cache_dir()}): nothing was written",
                                   repo_id=repo_id) from None
            else:
                api = hub_api(token)
                names = api.list_repo_files(repo_id, revision=revision, token=token)

                def is_patch(name: str) -> bool:
                    meta = api.parse_safetensors_file_metadata(repo_id, name, revision=revision, token=token)
                    return (meta.metadata or {}).get("format") == FORMAT_NAME

                path = _pick_patch(repo_id, revision, names, is_patch)
        if path is not None:
            local = Path(hf_hub_download(
                repo_id, path, revision=revision, cache_dir=cache_dir(), endpoint=endpoint(),
                local_files_only=local_only, token=token,
            ))
    except HubError:
        raise
    except Exception as e:
        if not is_hub_exception(e):
            raise
        raise _download_error(e, repo_id, revision, path, net_down and not is_offline) from None
    try:
        Patch.load(local)
    except PatchFormatError as e:
        evicted = _evict(local)
        raise PatchFormatError(
            f"{location(repo_id, revision, path or local.name)}: {e.message.replace(str(local), 'the downloaded file')}"
            + ("; the bad copy was removed from the HF cache" if evicted else ""),
            path=local,
        ) from None
    return local


def _evict(local: Path) -> bool:
    """Remove a downloaded file that failed verification from the HF cache (the snapshot link and its
    blob), so that nothing bad is left behind and the next attempt downloads it again."""
    cache = Path(cache_dir()).resolve()
    try:
        blob = local.resolve()
        if cache not in blob.parents or cache not in Path(os.path.realpath(local.parent)).parents:
            return False
        if local.is_symlink():
            local.unlink()
        if blob.exists():
            blob.unlink()
        return True
    except OSError:
        return False


# ---- models ----------------------------------------------------------------------------------------------
def resolved_revision(ref: str, token=None) -> str:
    """The commit hash that `OWNER/NAME[@REVISION]` (or `hf://...`) names now (from the cache when offline)."""
    if ref.startswith("hf://"):
        repo_id, _, revision = parse_patch_ref(ref)
    else:
        repo_id, revision = parse_model_ref(ref)
    if revision and COMMIT_HASH.match(revision):
        return revision
    if offline() or not reachable():
        commit = cached_commit(repo_id, revision)
        if commit is None:
            why = "HF_HUB_OFFLINE is set" if offline() else f"network unreachable ({endpoint()})"
            raise HubError(f"{why} and the revision {revision or 'main'} of {repo_id} is not in the cache", repo_id=repo_id)
        RESOLVED[ref] = commit
        return commit
    try:
        sha = hub_api(token).model_info(repo_id, revision=revision, token=token).sha
    except Exception as e:
        if not is_hub_exception(e):
            raise
        raise hub_error(e, repo_id, revision) from None
    RESOLVED[ref] = sha
    return sha


def model_files_for(ref: str, tensor_names, token=None) -> list[str]:
    """The safetensors files of model `ref` that hold `tensor_names`, read from its
    `model.safetensors.index.json` (`["model.safetensors"]` for an unsharded model)."""
    from huggingface_hub import errors as he
    from huggingface_hub import hf_hub_download

    repo_id, revision = parse_model_ref(ref)
    local_only = offline() or not reachable()
    try:
        index = hf_hub_download(repo_id, INDEX_FILE, revision=revision, cache_dir=cache_dir(), endpoint=endpoint(),
                                local_files_only=local_only, token=token)
    except he.RemoteEntryNotFoundError:
        return ["model.safetensors"]
    except Exception as e:
        if isinstance(e, he.LocalEntryNotFoundError) and local_only:
            # offline: an unsharded model has no index; a cached single-file snapshot answers the question
            commit = cached_commit(repo_id, revision)
            snap = storage_folder(repo_id) / "snapshots" / (commit or "-")
            if (snap / "model.safetensors").exists():
                return ["model.safetensors"]
        if not is_hub_exception(e):
            raise
        raise hub_error(e, repo_id, revision, INDEX_FILE) from None
    try:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except Exception:
        raise CheckpointError(f"{location(repo_id, revision, INDEX_FILE)} is not a valid safetensors index (no weight_map)") from None
    missing = sorted(set(tensor_names) - set(weight_map))
    if missing:
        raise CheckpointError(
            f"{repo_id}: the index names no tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            missing=missing,
        )
    return sorted({weight_map[n] for n in tensor_names})


def download_model(ref: str, allow_patterns: list[str] | None = None, token=None) -> Path:
    """A local snapshot folder (in the HF cache) of model `OWNER/NAME[@REVISION]`.

    Always the config, tokenizer, generation-config and chat-template files and the safetensors index;
    weights: the files matching `allow_patterns` (for example `model_files_for(ref, names)`), or every
    `*.safetensors` file when None. The folder's name is the commit hash, also kept in `RESOLVED[ref]`
    and returned by `resolved_revision(ref)`. The snapshot lives in the shared cache (its files are
    symlinks to cached blobs): never edit it in place.
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_model_ref(ref)
    patterns = MODEL_METADATA_PATTERNS + (list(allow_patterns) if allow_patterns is not None else WEIGHT_PATTERNS)
    is_offline = offline()
    local_only = is_offline or not reachable()
    try:
        folder = Path(snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir(), endpoint=endpoint(),
            local_files_only=local_only, token=token,
        ))
    except Exception as e:
        if not is_hub_exception(e):
            raise
        raise _download_error(e, repo_id, revision, None, local_only and not is_offline) from None
    RESOLVED[ref] = folder.name
    wanted = [p for p in (allow_patterns or []) if not any(ch in p for ch in "*?[")]
    absent = [p for p in wanted if not (folder / p).exists()]
    if absent:
        raise HubError(f"{repo_id}@{revision or 'main'} has no file {absent[0]}", repo_id=repo_id)
    return folder


__all__ = [
    "download_patch", "download_model", "model_files_for", "resolved_revision",
    "RESOLVED", "MODEL_METADATA_PATTERNS",
]

