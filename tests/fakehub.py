"""A small in-memory Hugging Face Hub for tests: stdlib only, listens on 127.0.0.1 only.

It implements the endpoints that the real `huggingface_hub` client (2.x, tested with 2.4.0) calls for
`create_repo`, `create_branch`, `model_info`/`repo_info`, `list_repo_files`/`list_repo_tree`,
`create_commit` (pre-upload + NDJSON commit, regular base64 uploads only: pre-upload always answers
`uploadMode: regular`, so the client never tries LFS or Xet), `hf_hub_download` and
`snapshot_download` (HEAD/GET on `/{repo}/resolve/{rev}/{path}`, ranged GETs included).

Storage: repos -> commits (full file maps, like git trees) -> files (bytes). Files whose name ends in
`.safetensors` are reported as LFS files (sha256 oid, `X-Linked-Etag`, `lfs` in tree listings), as the
real Hub does through `.gitattributes`; all other files as regular git blobs (git sha1 oid).

Error simulation, per test:
- unknown repo                 -> 404 X-Error-Code: RepoNotFound
- gated repo (`gated=True`)    -> 403 X-Error-Code: GatedRepo (for every read and write)
- private repo without a valid token -> 401 X-Error-Code: RepoNotFound (what the Hub answers)
- a token the server does not know   -> 401 X-Error-Message: Invalid credentials in Authorization header
- unknown revision             -> 404 X-Error-Code: RevisionNotFound
- unknown file                 -> 404 X-Error-Code: EntryNotFound (with X-Repo-Commit)
- `fail_download(repo, path, mode, after)`: the next GET of that file sends the headers and `after`
  bytes of the body, then the server drops the connection: `mode="reset"` sends a TCP RST (the client
  sees a read error, which it does not retry), `mode="close"` closes cleanly (the client sees an
  incomplete body and resumes with a `Range` request).

Every request is recorded in `hub.requests` (method, path, query, range, whether a token was sent).
"""

from __future__ import annotations

import base64
import io
import hashlib
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY = 64 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    parent: str | None
    title: str
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch / tag / refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.refs:
            return self.commits[self.refs[rev]]
        if len(rev) == 40 and rev in self.commits:
            return self.commits[rev]
        return None

    def history(self, branch: str = "main") -> list[Commit]:
        out, oid = [], self.refs.get(branch)
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Request:
    method: str
    path: str
    query: dict
    range: str | None
    token: str | None


class FakeHub:
    """The state of the fake Hub, plus helpers for tests to seed and inspect it."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {"hf_fake_token": "me"})  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.failures: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.lock = threading.RLock()
        self._counter = 0
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # ---- seeding and inspection (tests) ---------------------------------------------------------
    def create(self, repo_id: str, *, private=False, gated=False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private=private, gated=gated)
            self.repos[repo_id] = repo
            self._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit")
            return repo

    def add_files(self, repo_id: str, files: dict[str, bytes], *, branch="main", title="add files", tag=None) -> str:
        with self.lock:
            repo = self.repos.get(repo_id) or self.create(repo_id)
            if branch not in repo.refs:
                repo.refs[branch] = repo.refs["main"]
            commit = self._commit(repo, branch, dict(files), [], title)
            if tag:
                repo.refs[tag] = commit.oid
            return commit.oid

    def tamper(self, repo_id: str, path: str, data: bytes, branch="main") -> None:
        """Change a stored file behind git's back (bit rot, a broken mirror): no new commit."""
        with self.lock:
            self.repos[repo_id].resolve(branch).files[path] = data

    def fail_download(self, repo_id: str, path: str, mode: str = "reset", after: int = 64, times: int = 1) -> None:
        assert mode in ("reset", "close")
        with self.lock:
            self.failures.setdefault((repo_id, path), []).extend([(mode, after)] * times)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].resolve(rev).files)

    def downloads(self, repo_id: str | None = None, ranged: bool = False) -> list[str]:
        """Paths fetched with GET on /resolve/, in order; ranged GETs (header reads, resumes) only if `ranged`."""
        out = []
        for r in self.requests:
            if r.method == "GET" and "/resolve/" in r.path and (ranged or r.range is None):
                repo, _, rest = r.path.lstrip("/").partition("/resolve/")
                if repo_id is None or repo == repo_id:
                    out.append(unquote(rest.split("/", 1)[1]))
        return out

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()

    # ---- internals --------------------------------------------------------------------------------
    def _commit(self, repo: Repo, branch: str, add: dict[str, bytes], delete: list[str], title: str) -> Commit:
        self._counter += 1
        parent = repo.refs.get(branch)
        files = dict(repo.commits[parent].files) if parent else {}
        for p in delete:
            files.pop(p, None)
        files.update(add)
        oid = hashlib.sha1(f"{repo.repo_id}:{self._counter}:{title}:{time.time()}".encode()).hexdigest()
        commit = Commit(oid, files, parent, title, added=sorted(add), deleted=sorted(delete))
        repo.commits[oid] = commit
        repo.refs[branch] = oid
        return commit

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- life cycle -------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub
    timeout = 10  # seconds a client may stay silent on a connection: bounded

    def log_message(self, fmt, *args):  # quiet
        pass

    # ---- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
                if len(data) > MAX_BODY:
                    raise HubError(413, "request body too large")
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise HubError(413, "request body too large")
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _user(self) -> str | None:
        tok = self._token()
        if tok is None:
            return None
        user = self.hub.tokens.get(tok)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and user is None:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        if repo.private and repo_id.split("/")[0] != user:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.gated:
            raise HubError(403, f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in.", "GatedRepo")
        if write and (user is None or repo_id.split("/")[0] != user):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_of(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _dispatch(self):
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with self.hub.lock:
            self.hub.requests.append(Request(self.command, split.path, query, self.headers.get("Range"), self._token()))
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            self._route(segs, query)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message}, headers)

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = lambda self: self._dispatch()

    # ---- routes -----------------------------------------------------------------------------------
    def _route(self, s: list[str], q: dict):
        m = self.command
        if m == "POST" and s == ["api", "validate-yaml"]:
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        if m == "POST" and s == ["api", "repos", "create"]:
            return self._create_repo(json.loads(self._body() or b"{}"))
        if m == "GET" and s[:2] == ["api", "whoami-v2"]:
            user = self._user()
            if user is None:
                raise HubError(401, "Invalid username or password.")
            return self._json(200, {"type": "user", "name": user})
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            if m == "GET" and not rest:
                return self._model_info(repo_id, "main", q)
            if m == "GET" and rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1], q)
            if m == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), q)
            if m == "POST" and rest[0] == "preupload" and len(rest) == 2:
                return self._preupload(repo_id, rest[1], json.loads(self._body() or b"{}"))
            if m == "POST" and rest[0] == "commit" and len(rest) == 2:
                return self._commit(repo_id, rest[1], q, self._body())
            if m == "POST" and rest[0] == "branch" and len(rest) >= 2:
                return self._branch(repo_id, "/".join(rest[1:]), json.loads(self._body() or b"{}"))
        if len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        raise HubError(404, f"no route for {m} {self.path}")

    def _create_repo(self, payload: dict):
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        name, org = payload.get("name"), payload.get("organization") or user
        repo_id = f"{org}/{name}"
        if org != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace \"{org}\"")
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            private = payload.get("private") or payload.get("visibility") == "private"
            self.hub.create(repo_id, private=bool(private))
        return self._json(200, {"url": url, "name": repo_id})

    def _model_info(self, repo_id: str, rev: str, q: dict):
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, rev)
        siblings = []
        for path, data in sorted(commit.files.items()):
            sib = {"rfilename": path}
            if q.get("blobs") in ("True", "true", "1"):
                sib.update(size=len(data), blobId=git_sha1(data))
                if is_lfs(path):
                    sib["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(sib)
        self._json(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": commit.oid, "private": repo.private, "gated": False,
            "disabled": False, "tags": [], "siblings": siblings, "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
        })

    def _tree(self, repo_id: str, rev: str, path: str, q: dict):
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, rev)
        recursive = q.get("recursive") in ("True", "true", "1")
        prefix = path.rstrip("/") + "/" if path else ""
        entries, folders = [], set()
        for p, data in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            if "/" in rel:
                parts = rel.split("/")
                for i in range(1, len(parts) if recursive else 2):
                    folders.add(prefix + "/".join(parts[:i]))
                if not recursive:
                    continue
            e = {"type": "file", "oid": git_sha1(data), "size": len(data), "path": p}
            if is_lfs(p):
                e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(e)
        if path and not entries and not folders:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        entries += [{"type": "directory", "oid": git_sha1(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        self._json(200, entries)

    def _preupload(self, repo_id: str, rev: str, payload: dict):
        repo = self._repo(repo_id, write=True)
        commit = repo.resolve(rev)
        files = commit.files if commit is not None else {}
        out = []
        for f in payload.get("files", []):
            existing = files.get(f["path"])
            out.append({
                "path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                "oid": git_sha1(existing) if existing is not None else None,
            })
        self._json(200, {"files": out, "commitOid": commit.oid if commit else None})

    def _commit(self, repo_id: str, rev: str, q: dict, body: bytes):
        repo = self._repo(repo_id, write=True)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the commit header")
        header = lines[0]["value"]
        add, delete = {}, []
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file contents are supported")
                add[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                delete.append(value["path"])
            else:  # lfsFile: this fake Hub has no LFS storage (pre-upload never asks for it)
                raise HubError(400, f"unsupported commit operation {key}")
        with self.hub.lock:
            if q.get("create_pr") == "1":
                base = self._commit_of(repo, rev)
                repo.prs += 1
                branch = f"refs/pr/{repo.prs}"
                repo.refs[branch] = base.oid
            else:
                branch = rev
                if branch not in repo.refs:
                    raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent and parent != repo.refs[branch]:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            commit = self.hub._commit(repo, branch, add, delete, header.get("summary", ""))
        out = {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}"}
        if q.get("create_pr") == "1":
            out["pullRequestUrl"] = f"{self.hub.url}/{repo_id}/discussions/{repo.prs}"
        self._json(200, out)

    def _branch(self, repo_id: str, branch: str, payload: dict):
        repo = self._repo(repo_id, write=True)
        with self.hub.lock:
            if branch in repo.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._commit_of(repo, payload.get("startingPoint") or "main")
            repo.refs[branch] = start.oid
        self._json(200, {})

    def _resolve(self, repo_id: str, rev: str, path: str):
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, rev)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes", "ETag": f'"{git_sha1(data)}"'}
        if is_lfs(path):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        status, body = 200, data
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start = int(start_s)
            end = int(end_s) if end_s else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        failure = None
        if self.command == "GET":
            with self.hub.lock:
                queue = self.hub.failures.get((repo_id, path))
                if queue:
                    failure = queue.pop(0)
        if failure is None:
            return self._send(status, body, headers, content_type="application/octet-stream")
        mode, after = failure
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[: min(after, max(len(body) - 1, 0))])
        self.wfile.flush()
        self.close_connection = True
        if mode == "reset":
            time.sleep(0.05)  # let the client read the headers, then reset the connection under it
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.wfile.close()
            self.connection.close()
            self.rfile, self.wfile = io.BytesIO(), io.BytesIO()  # for the server's own flush/close afterwards
