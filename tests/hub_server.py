"""A tiny loopback Hugging Face Hub: the subset of the Hub HTTP API that huggingface_hub 2.x calls to create a
repo, commit files and download them, recording everything it receives.

Point a client at it with ``HF_ENDPOINT=http://127.0.0.1:PORT`` (set before huggingface_hub is imported, or
set ``huggingface_hub.constants.ENDPOINT`` too) and ``HF_HUB_DISABLE_XET=1``: uploads then take the plain
HTTP paths, base64 "regular" files inside the NDJSON commit and LFS "basic" transfers (one PUT per object)
for ``*.safetensors``, as on the real Hub.

**Why Xet stays disabled for uploads.** With ``hf_xet`` installed (a dependency of huggingface_hub 2.x),
huggingface_hub uploads every file through Xet and has no fallback: it asks
``/api/models/{repo}/xet-write-token/{rev}`` for a token and a CAS server URL, and ``hf_xet`` (Rust) then
chunks, deduplicates and uploads "xorbs" and "shards" in Xet's own binary formats to that CAS server. Serving
that would mean re-implementing the CAS protocol, which is far beyond a test server, so tests that upload set
``HF_HUB_DISABLE_XET=1`` — the same switch a user behind a proxy that blocks the CAS host sets, and the path
huggingface_hub documents as the fallback. Downloads need no such switch: this server's answers carry no
``X-Xet-Hash`` header, so huggingface_hub downloads plain HTTP with Xet enabled too (a test loads that way).

**Authorization, as the real Hub.** Requests may carry ``Authorization: Bearer <token>``; `LocalHub.token`
(``hf_loopback_only``) is the one valid token and owns every repo. A wrong token is refused (401) on every
route; writes (create a repo, preupload, commit, branch, LFS) need the valid token (401 otherwise); a
private repo is invisible without it: 401 with ``X-Error-Code: RepoNotFound``, which huggingface_hub turns
into ``RepositoryNotFoundError``, exactly as the Hub answers for a private repo to an anonymous client.

Served (``{repo}`` is ``namespace/name``, revisions are branch names, tags or commit oids):

* ``POST /api/repos/create`` (409 + url when it exists), ``POST /api/validate-yaml``
* ``POST /api/models/{repo}/preupload/{rev}``, ``POST /api/models/{repo}/commit/{rev}`` (NDJSON),
  ``POST /api/models/{repo}/branch/{branch}``
* ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT /lfs-objects/{oid}``
* ``GET /api/models/{repo}[/revision/{rev}]``, ``GET /api/models/{repo}/tree/{rev}[/{path}]``
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``

Errors carry the ``X-Error-Code`` header the client maps to its exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_NAMESPACE = "local-user"
DEFAULT_TOKEN = "hf_loopback_only"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
_YAML_BLOCK = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    summary: str
    description: str
    files: dict[str, bytes]  # the whole tree after this commit
    added: dict[str, bytes]  # what this commit added or changed
    lfs_paths: list[str]  # of `added`, those sent as LFS pointers (content PUT separately)
    deleted: list[str]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[Commit]:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class LocalHub:
    """The server and its state. Use as a context manager, or call `start` / `stop`."""

    def __init__(self, token: str = DEFAULT_TOKEN) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[dict[str, Any]] = []  # method, path, query, authorization, body size
        self.created: list[dict[str, Any]] = []  # create_repo payloads
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ state helpers (for tests)
    def commit(
        self, repo_id: str, files: dict[str, bytes], revision: str = "main", summary: str = "seed", lfs_paths=(),
        private: bool = False,
    ) -> str:
        """Add a commit directly (to seed a repo); creates the repo (``private`` then) and the branch if needed."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private))
            return self._commit(repo, revision, summary, "", dict(files), [], list(lfs_paths))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"{repo_id} has no revision {revision!r}"
        return dict(commit.files)

    def commits_of(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits.values()) if repo_id in self.repos else []

    def _commit(self, repo, revision, summary, description, added, deleted, lfs_paths) -> str:
        parent = repo.branches.get(revision)
        files = dict(repo.commits[parent].files) if parent else {}
        for path in deleted:
            files = {p: c for p, c in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        files.update(added)
        seed = json.dumps([parent, summary, sorted((p, hashlib.sha256(c).hexdigest()) for p, c in files.items())])
        oid = hashlib.sha1(f"{seed}{len(repo.commits)}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, summary, description, files, added, lfs_paths, deleted)
        repo.branches[revision] = oid
        return oid


class _Handler(BaseHTTPRequestHandler):
    state: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any = None, *, headers: Optional[dict] = None, raw: Optional[bytes] = None):
        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: Optional[str], message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers=headers)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        parts = split.path.strip("/").split("/")
        body = self._body() if self.command in ("POST", "PUT") else b""
        with self.state._lock:
            self.state.requests.append(
                {
                    "method": self.command,
                    "path": split.path,
                    "query": split.query,
                    "authorization": self.headers.get("Authorization"),
                    "bytes": len(body),
                }
            )
        try:
            if self._authorized(parts):
                self._route(parts, body)
        except Exception as exc:  # a bug here should surface as a 500 with the reason, not a hang
            self._error(500, None, f"{type(exc).__name__}: {exc}")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # ------------------------------------------------------------------ authorization
    def _authorized(self, parts: list[str]) -> bool:
        """Answer 401 (and return False) unless the request may proceed: see the module docstring."""
        header = self.headers.get("Authorization")
        if header is not None and header != f"Bearer {self.state.token}":
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        if header is not None:
            return True
        # the LFS upload URL stands for a pre-signed storage URL, which carries no Authorization header
        if self.command in ("POST", "PUT") and parts[:2] != ["api", "validate-yaml"] and parts[0] != "lfs-objects":
            self._error(401, None, "You must be authenticated to write to the Hub")
            return False
        repo = self.state.repos.get(self._repo_id_of(parts) or "")
        if repo is not None and repo.private:
            self._error(401, "RepoNotFound", "Repository Not Found")
            return False
        return True

    @staticmethod
    def _repo_id_of(parts: list[str]) -> Optional[str]:
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return f"{parts[2]}/{parts[3]}"
        if len(parts) >= 3 and parts[2] == "resolve":
            return f"{parts[0]}/{parts[1]}"
        return None

    def _repo(self, repo_id: str) -> Optional[Repo]:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return repo

    def _resolved_commit(self, repo_id: str, revision: str) -> Optional[Commit]:
        """The commit a revision names, or None after answering 404 (unknown repo or revision)."""
        repo = self._repo(repo_id)
        if repo is None:
            return None
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # ------------------------------------------------------------------ routes
    def _route(self, parts: list[str], body: bytes) -> None:
        method = self.command
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = f"{parts[2]}/{parts[3]}"
            action, rest = (parts[4], parts[5:]) if len(parts) > 4 else ("info", [])
            if action == "info" and method == "GET":
                return self._model_info(repo_id, "main")
            if action == "revision" and method == "GET":
                return self._model_info(repo_id, unquote(rest[0]))
            if action == "tree" and method == "GET":
                return self._tree(repo_id, unquote(rest[0]), "/".join(rest[1:]))
            if action == "preupload" and method == "POST":
                return self._preupload(repo_id, unquote(rest[0]), json.loads(body))
            if action == "commit" and method == "POST":
                return self._commit(repo_id, unquote(rest[0]), body)
            if action == "branch" and method == "POST":
                return self._create_branch(repo_id, unquote("/".join(rest)), json.loads(body or b"{}"))
        if len(parts) >= 5 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if parts[0] == "lfs-objects" and method == "PUT":
            return self._lfs_put(parts[1], body)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])))
        self._error(404, None, f"not served by the local hub: {method} /{'/'.join(parts)}")

    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{payload['name']}"
        with self.state._lock:
            self.state.created.append(dict(payload))
            url = f"{self.state.url}/{repo_id}"
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            repo = self.state.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
            self.state._commit(repo, "main", "initial commit", "", {".gitattributes": b"*.safetensors filter=lfs\n"}, [], [])
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        match = _YAML_BLOCK.match(payload.get("content", ""))
        errors = []
        if match is None:
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            data, errors = None, [{"message": f"invalid YAML: {exc}"}]
        if not errors and not isinstance(data, dict):
            errors = [{"message": "metadata must be a YAML mapping"}]
        if not errors:
            for key in ("tags", "base_model"):
                value = data.get(key)
                if value is not None and not isinstance(value, (str, list)):
                    errors.append({"message": f'"{key}" must be a string or a list of strings'})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _model_info(self, repo_id: str, revision: str) -> None:
        commit = self._resolved_commit(repo_id, revision)
        if commit is None:
            return
        self._send(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit.oid,
                "private": self.state.repos[repo_id].private,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            },
        )

    def _tree(self, repo_id: str, revision: str, path: str) -> None:
        commit = self._resolved_commit(repo_id, revision)
        if commit is None:
            return
        prefix = f"{path.rstrip('/')}/" if path else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for file_path, content in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            tail = file_path[len(prefix):].split("/")
            if len(tail) > 1 and not recursive:
                directory = prefix + tail[0]
                entries[directory] = {"type": "directory", "path": directory, "oid": "0" * 40, "size": 0}
                continue
            entries[file_path] = {
                "type": "file", "path": file_path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()
            }
        if path and not entries:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        self._send(200, list(entries.values()))

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        if self._repo(repo_id) is None:
            return
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) and f["size"] > 0 else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in payload["files"]
        ]
        self._send(200, {"files": files, "commitOid": self.state.repos[repo_id].branches.get(revision)})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        if self._repo(repo_id) is None:
            return
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.state.url}/lfs-objects/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, None, f"content does not match oid {oid}")
        with self.state._lock:
            self.state.lfs_objects[oid] = body
        self._send(200, {})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added: dict[str, bytes] = {}
        lfs_paths: list[str] = []
        deleted: list[str] = []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                content = self.state.lfs_objects.get(value["oid"])
                if content is None or len(content) != value["size"]:
                    return self._error(400, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                added[value["path"]] = content
                lfs_paths.append(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            elif key != "header":
                return self._error(400, None, f"unsupported commit operation {key!r}")
        if revision not in repo.branches and repo.resolve(revision) is not None:
            return self._error(400, None, f"cannot commit on {revision}: not a branch")
        if revision not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        with self.state._lock:
            oid = self.state._commit(
                repo, revision, header.get("summary", ""), header.get("description", ""), added, deleted, lfs_paths
            )
        self._send(
            200,
            {"commitUrl": f"{self.state.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
        )

    def _create_branch(self, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, None, f"Reference already exists: {branch}")
        start = repo.resolve(payload.get("startingPoint") or "main")
        if start is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {payload.get('startingPoint')}")
        with self.state._lock:
            repo.branches[branch] = start.oid
        self._send(200, {})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        commit = self._resolved_commit(repo_id, revision)
        if commit is None:
            return
        if path not in commit.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        content = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
        self._send(200, raw=content, headers=headers)
