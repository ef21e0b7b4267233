"""Upload to the Hugging Face Hub: a patch with its model card, or a patched checkpoint (only the
files the repo does not hold yet). One commit per push, through `HfApi.create_commit`.

Every failure is a `patchkit.errors.HubError` with a one-line message, raised before anything is
committed: the checks (repo id, `HF_HUB_OFFLINE`, network) come first, and a commit is atomic.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..core.fsutil import sha256_file
from ..core.patchfile import Patch
from ..core.plan import load_patch
from ..errors import CheckpointError, HubError
from .hub import check_repo_id, endpoint, hub_api, hub_error, is_hub_exception, location, offline, reachable


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _prepare_push(repo_id: str) -> None:
    check_repo_id(repo_id, repo_id)
    if offline():
        raise HubError("HF_HUB_OFFLINE is set: cannot push; unset it to reach the Hub", repo_id=repo_id)
    if not reachable():
        raise HubError(f"network unreachable ({endpoint()}): nothing was pushed", repo_id=repo_id)


@contextmanager
def _pushing(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn what the Hub client raises into one HubError naming the repo."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        if not is_hub_exception(e):
            raise
        raise hub_error(e, repo_id, revision, action="push") from None


def _ensure_repo(api, repo_id: str, revision: str | None, private: bool, create_pr: bool, token) -> None:
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    if revision and revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)


def _remote_files(api, repo_id: str, revision: str | None, token) -> dict:
    """path -> RepoFile at `revision` ({} when the branch does not exist yet)."""
    from huggingface_hub import errors as he
    from huggingface_hub.hf_api import RepoFile

    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=revision, token=token)
                if isinstance(f, RepoFile)}
    except he.RevisionNotFoundError:
        return {}


def push_patch(patch_path, repo_id: str, revision: str | None = None, private: bool = False,
               create_pr: bool = False, token=None, path_in_repo: str | None = None,
               commit_message: str | None = None) -> dict:
    """Upload a patch and its model card to the model repo `repo_id`, in one commit.

    Creates the repo when missing (private if asked; an existing repo keeps its visibility) and the
    branch `revision` when missing. Uploads exactly two files: the patch (as `path_in_repo`, default its
    file name) and `README.md` rendered by `card.render_card`. Returns
    `{"repo", "revision", "commit", "url", "path", "id", "pr_url"}`.
    """
    from huggingface_hub import CommitOperationAdd

    from .card import render_card

    patch_path = Path(patch_path)
    patch = Patch.load(patch_path)
    name = path_in_repo or (patch_path.name if patch_path.suffix == ".safetensors" else f"{patch_path.stem}.safetensors")
    if not name.endswith(".safetensors") or name.startswith("/") or ".." in name.split("/"):
        raise HubError(f"cannot store the patch as {name!r}: give a relative path ending in .safetensors")
    _prepare_push(repo_id)
    api = hub_api(token)
    target = None if create_pr else revision
    with _pushing(repo_id, revision):
        _ensure_repo(api, repo_id, revision, private, create_pr, token)
        remote = _remote_files(api, repo_id, revision, token)
        others = [p for p in remote if p.endswith(".safetensors") and p != name]
        card = render_card(patch, repo_id, name, target, explicit_path=bool(others))
        ops = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(patch_path)),
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")),
        ]
        info = api.create_commit(
            repo_id, ops, commit_message=commit_message or f"patchkit: add patch {patch.id[:12]}",
            commit_description=f"patch id {patch.id}", revision=revision, create_pr=create_pr, token=token,
        )
    ref_rev = target
    if info.pr_url:  # until the PR is merged, the patch is only at refs/pr/N
        ref_rev = f"refs/pr/{info.pr_url.rstrip('/').rsplit('/', 1)[-1]}"
    return {
        "repo": repo_id, "revision": revision or "main", "commit": info.oid, "url": info.commit_url,
        "pr_url": info.pr_url, "path": name, "id": patch.id,
        "ref": location(repo_id, ref_rev if ref_rev != "main" else None, name if others else None),
    }


def _checkpoint_files(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .patchkit state, .cache, .git...
        for f in sorted(files):
            if not f.startswith("."):
                out.append(str((Path(root) / f).relative_to(folder)).replace(os.sep, "/"))
    return out


def _held_by_repo(path: Path, remote_file) -> bool:
    """Does the repo already hold this file's bytes (same LFS sha256, or same git blob id)?"""
    if remote_file is None or remote_file.size != path.stat().st_size:
        return False
    if remote_file.lfs is not None:
        return remote_file.lfs.sha256 == sha256_file(path)
    return remote_file.blob_id == _git_sha1(path.read_bytes())


def push_checkpoint(checkpoint, repo_id: str, patches=(), revision: str | None = None, private: bool = False,
                    create_pr: bool = False, token=None, base_model: str | None = None,
                    base_revision: str | None = None, commit_message: str | None = None,
                    include: list[str] | None = None) -> dict:
    """Upload a patched checkpoint folder to `repo_id` in one commit, sending only what changed.

    Files whose content the repo already holds at `revision` (same sha256 / LFS oid for weights, same
    git blob id for the rest) are not uploaded: when the repo holds the base, only the shards the
    patches touched (and the model card) go up. Hidden files and folders (`.patchkit/`) are skipped;
    `include` (glob patterns) restricts the files considered. Files of the repo absent locally are left
    as they are. Returns `{"repo", "revision", "commit", "url", "uploaded", "unchanged"}`.
    """
    from huggingface_hub import CommitOperationAdd

    from .card import render_checkpoint_card

    folder = Path(checkpoint)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    patches = [load_patch(p) for p in patches]
    local = [f for f in _checkpoint_files(folder) if f != "README.md"]
    if include is not None:
        local = [f for f in local if any(fnmatch.fnmatch(f, pat) for pat in include)]
    _prepare_push(repo_id)
    api = hub_api(token)
    with _pushing(repo_id, revision):
        _ensure_repo(api, repo_id, revision, private, create_pr, token)
        remote = _remote_files(api, repo_id, revision, token)
        held = {rel for rel in local if _held_by_repo(folder / rel, remote.get(rel))}
        unchanged = [rel for rel in local if rel in held]
        uploaded = [rel for rel in local if rel not in held]
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in uploaded]
        card = render_checkpoint_card(patches, repo_id, base_model, base_revision)
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        ids = ", ".join(p.id[:12] for p in patches) or "no patch"
        info = api.create_commit(
            repo_id, ops, commit_message=commit_message or f"patchkit: checkpoint with {ids}",
            revision=revision, create_pr=create_pr, token=token,
        )
    return {
        "repo": repo_id, "revision": revision or "main", "commit": info.oid, "url": info.commit_url,
        "pr_url": info.pr_url, "uploaded": uploaded + ["README.md"], "unchanged": unchanged,
    }


__all__ = ["push_patch", "push_checkpoint"]
