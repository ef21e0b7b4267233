"""The Hugging Face Hub: download patches (`hf://` refs) and base models; `patchkit.share.push` uploads.

With `patchkit.share.push`, the only modules of patchkit that talk to the network, always through the
`huggingface_hub` client: `hf_hub_download` and `snapshot_download` for reads (the usual HF cache,
`HF_HUB_OFFLINE`, `HF_TOKEN`); writes are `HfApi.create_repo` / `create_commit` (one commit per push).

References:
- patch:  `hf://OWNER/REPO[/PATH][@REVISION]` (PATH defaults to the repo's only patchkit patch)
- model:  `OWNER/NAME[@REVISION]`

Environment (read at each call, so that a changed environment is honoured inside one process):
`HF_ENDPOINT`, `HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN` (through the client).

Every failure is a `patchkit.errors.HubError` with a one-line message; nothing is written on failure
(the client downloads into a temporary file that it removes when the transfer fails).
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from ..core.patchfile import FORMAT_NAME, Patch
from ..errors import CheckpointError, HubError, PatchFormatError

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
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
PROBE_TIMEOUT = 5.0

#: commit hashes resolved by `download_model` / `resolved_revision`, by reference (for base fingerprints)
RESOLVED: dict[str, str] = {}


# ---- references ----------------------------------------------------------------------------------------
def parse_patch_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`hf://OWNER/REPO[/PATH][@REVISION]` -> (repo_id, path or None, revision or None)."""
    if not ref.startswith("hf://"):
        raise HubError(f"{ref} is not a Hub reference (expected hf://OWNER/REPO[/PATH][@REVISION])")
    body = ref[len("hf://"):]
    revision = None
    if "@" in body:
        body, _, revision = body.rpartition("@")
        if not revision:
            raise HubError(f"{ref}: empty revision after '@'")
    parts = body.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise HubError(f"{ref}: expected hf://OWNER/REPO[/PATH][@REVISION]")
    repo_id = "/".join(parts[:2])
    _check_repo_id(repo_id, ref)
    path = "/".join(parts[2:]) or None
    if path is not None and any(p in ("", ".", "..") for p in parts[2:]):
        raise HubError(f"{ref}: invalid path {path!r} in the repository")
    return repo_id, path, revision


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """`OWNER/NAME[@REVISION]` -> (repo_id, revision or None)."""
    repo_id, _, revision = ref.partition("@")
    _check_repo_id(repo_id, ref)
    if "@" in ref and not revision:
        raise HubError(f"{ref}: empty revision after '@'")
    return repo_id, revision or None


def _check_repo_id(repo_id: str, ref: str) -> None:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", "-", ".")):
        raise HubError(f"{ref}: {repo_id!r} is not a valid Hub repository id (OWNER/NAME)")


def _where(repo_id: str, revision: str | None, path: str | None = None) -> str:
    return f"hf://{repo_id}" + (f"/{path}" if path else "") + (f"@{revision}" if revision else "")


def _download_error(e: Exception, repo_id: str, revision: str | None, path: str | None, net_down: bool) -> Exception:
    """The one-line error for a failed download: the network was down and the cache had no copy, or
    whatever the Hub answered."""
    if net_down:
        return HubError(f"network unreachable ({endpoint()}) and {_where(repo_id, revision, path)} is not in the cache: "
                        "nothing was written", repo_id=repo_id)
    return hub_error(e, repo_id, revision, path)


# ---- environment -----------------------------------------------------------------------------------------
def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "on", "yes", "true")


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cache_dir() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(os.environ["HUGGINGFACE_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        return _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE)


def _uses_proxy() -> bool:
    return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"))


def reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the Hub endpoint opens: a fast check, so that an unreachable network
    fails (or falls back to the cache) at once instead of after the client's retries. Behind a proxy the
    answer is always True (the client knows how to get through; we do not)."""
    if _uses_proxy():
        return True
    parts = urlsplit(url or endpoint())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _api(token=None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


def _storage_folder(repo_id: str) -> Path:
    return Path(cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    rev = revision or "main"
    if _COMMIT.match(rev):
        return rev
    ref = _storage_folder(repo_id) / "refs" / rev
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


# ---- errors ----------------------------------------------------------------------------------------------
def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.timeout]
    for mod, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                       ("requests", ("ConnectionError", "Timeout"))):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        types += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(types)


def hub_error(e: BaseException, repo_id: str, revision: str | None = None, path: str | None = None,
              action: str = "download") -> HubError:
    """A one-line `HubError` for an exception raised by `huggingface_hub` (or the HTTP stack under it)."""
    from huggingface_hub import errors as he

    rev = revision or "main"
    where = _where(repo_id, revision, path)
    nothing = "nothing was written" if action != "push" else "nothing was pushed"
    fields = {"repo_id": repo_id, "revision": revision, "path_in_repo": path}
    status = getattr(getattr(e, "response", None), "status_code", None)
    server_msg = None
    if getattr(e, "response", None) is not None:
        server_msg = e.response.headers.get("X-Error-Message")
    if isinstance(e, he.GatedRepoError):
        msg = f"{repo_id} is a gated repository: request access on its Hub page, then set HF_TOKEN to a token of that account"
    elif isinstance(e, he.RepositoryNotFoundError):
        msg = f"repository {repo_id} not found (or you have no access: set HF_TOKEN)"
    elif isinstance(e, he.RevisionNotFoundError):
        msg = f"revision {rev} not found in {repo_id}"
    elif isinstance(e, he.RemoteEntryNotFoundError):
        msg = f"file {path or '?'} not found in {repo_id} at revision {rev}"
    elif isinstance(e, (he.OfflineModeIsEnabled, he.LocalEntryNotFoundError)) and offline():
        msg = f"HF_HUB_OFFLINE is set and {where} is not in the cache ({cache_dir()}): {nothing}"
    elif isinstance(e, he.LocalEntryNotFoundError):
        msg = f"network unreachable ({endpoint()}) and {where} is not in the cache: {nothing}"
    elif isinstance(e, he.HfHubHTTPError) and status == 401:
        msg = f"the Hub rejected the token ({server_msg or '401 Unauthorized'}): check HF_TOKEN or run `hf auth login`"
    elif isinstance(e, he.HfHubHTTPError) and status == 403:
        msg = f"permission denied on {repo_id} ({server_msg or '403 Forbidden'}): use a token with write access to it"
    elif isinstance(e, he.HfHubHTTPError):
        msg = f"the Hub answered {status} for {where} ({server_msg or str(e).strip().splitlines()[0]}): {nothing}"
    elif isinstance(e, _network_error_types()) or (isinstance(e, OSError) and "Consistency check failed" in str(e)):
        verb = "uploading to" if action == "push" else "downloading"
        msg = f"connection to the Hub lost while {verb} {where} ({type(e).__name__}): {nothing}; run the command again"
    else:
        msg = f"{where}: {type(e).__name__}: {' '.join(str(e).split())}"
    return HubError(msg, **fields)


def _is_hub_exception(e: BaseException) -> bool:
    from huggingface_hub import errors as he

    return isinstance(e, (he.HfHubHTTPError, he.EntryNotFoundError, he.OfflineModeIsEnabled, *_network_error_types())) or (
        isinstance(e, OSError) and "Consistency check failed" in str(e)
    )


# ---- patches ---------------------------------------------------------------------------------------------
def _header_is_patch(path: Path) -> bool:
    from ..core.stfile import read_header

    try:
        return read_header(path).metadata.get("format") == FORMAT_NAME
    except Exception:
        return False


def _pick_patch(repo_id: str, revision: str | None, names: list[str], is_patch) -> str:
    candidates = sorted(n for n in names if n.endswith(".safetensors"))
    where = _where(repo_id, revision)
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
    commit = _cached_commit(repo_id, revision)
    snap = _storage_folder(repo_id) / "snapshots" / commit if commit else None
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
                    raise HubError(f"{why} and {_where(repo_id, revision)} is not in the cache ({cache_dir()}): nothing was written",
                                   repo_id=repo_id) from None
            else:
                api = _api(token)
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
        if not _is_hub_exception(e):
            raise
        raise _download_error(e, repo_id, revision, path, net_down and not is_offline) from None
    try:
        Patch.load(local)
    except PatchFormatError as e:
        evicted = _evict(local)
        raise PatchFormatError(
            f"{_where(repo_id, revision, path or local.name)}: {e.message.replace(str(local), 'the downloaded file')}"
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
    if revision and _COMMIT.match(revision):
        return revision
    if offline() or not reachable():
        commit = _cached_commit(repo_id, revision)
        if commit is None:
            why = "HF_HUB_OFFLINE is set" if offline() else f"network unreachable ({endpoint()})"
            raise HubError(f"{why} and the revision {revision or 'main'} of {repo_id} is not in the cache", repo_id=repo_id)
        RESOLVED[ref] = commit
        return commit
    try:
        sha = _api(token).model_info(repo_id, revision=revision, token=token).sha
    except Exception as e:
        if not _is_hub_exception(e):
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
            commit = _cached_commit(repo_id, revision)
            snap = _storage_folder(repo_id) / "snapshots" / (commit or "-")
            if (snap / "model.safetensors").exists():
                return ["model.safetensors"]
        if not _is_hub_exception(e):
            raise
        raise hub_error(e, repo_id, revision, INDEX_FILE) from None
    try:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except Exception:
        raise CheckpointError(f"{_where(repo_id, revision, INDEX_FILE)} is not a valid safetensors index (no weight_map)") from None
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
        if not _is_hub_exception(e):
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
    "parse_patch_ref", "parse_model_ref", "hub_error", "RESOLVED", "MODEL_METADATA_PATTERNS",
]
