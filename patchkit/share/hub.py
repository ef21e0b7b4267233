"""The Hugging Face Hub connection: references, the environment, and errors.

`patchkit.share.download` reads from the Hub and `patchkit.share.push` writes to it, both through
what is here, always with the `huggingface_hub` client (the usual HF cache, `HF_HUB_OFFLINE`,
`HF_TOKEN`). Only modules of patchkit.share reach the network (`tests/test_boundaries.py` checks
that nothing else imports huggingface_hub); the rest of patchkit gets remote patches and models
through `patchkit.share.sources`.

References (parsed here; `patchkit.share.sources.parse_model` tells a model reference from a folder):
- patch:  `hf://OWNER/REPO[/PATH][@REVISION]` (PATH defaults to the repo's only patchkit patch)
- model:  `OWNER/NAME[@REVISION]` or `hf://OWNER/NAME[@REVISION]`

Environment (read at each call, so that a changed environment is honoured inside one process):
`HF_ENDPOINT`, `HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN` (through the client).

Every failure is a `patchkit.errors.HubError` with a one-line message (`hub_error`).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import HubError

COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
PROBE_TIMEOUT = 5.0


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
    check_repo_id(repo_id, ref)
    path = "/".join(parts[2:]) or None
    if path is not None and any(p in ("", ".", "..") for p in parts[2:]):
        raise HubError(f"{ref}: invalid path {path!r} in the repository")
    return repo_id, path, revision


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """`OWNER/NAME[@REVISION]` -> (repo_id, revision or None)."""
    repo_id, _, revision = ref.partition("@")
    check_repo_id(repo_id, ref)
    if "@" in ref and not revision:
        raise HubError(f"{ref}: empty revision after '@'")
    return repo_id, revision or None


def check_repo_id(repo_id: str, ref: str) -> None:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", "-", ".")):
        raise HubError(f"{ref}: {repo_id!r} is not a valid Hub repository id (OWNER/NAME)")


def location(repo_id: str, revision: str | None, path: str | None = None) -> str:
    return f"hf://{repo_id}" + (f"/{path}" if path else "") + (f"@{revision}" if revision else "")


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


def hub_api(token=None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


def storage_folder(repo_id: str) -> Path:
    return Path(cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def cached_commit(repo_id: str, revision: str | None) -> str | None:
    rev = revision or "main"
    if COMMIT_HASH.match(rev):
        return rev
    ref = storage_folder(repo_id) / "refs" / rev
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
    where = location(repo_id, revision, path)
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


def is_hub_exception(e: BaseException) -> bool:
    from huggingface_hub import errors as he

    return isinstance(e, (he.HfHubHTTPError, he.EntryNotFoundError, he.OfflineModeIsEnabled, *_network_error_types())) or (
        isinstance(e, OSError) and "Consistency check failed" in str(e)
    )


__all__ = [
    "parse_patch_ref", "parse_model_ref", "check_repo_id", "location", "endpoint", "cache_dir", "offline", "reachable", "hub_api",
    "hub_error", "is_hub_exception",
]
