"""TEST DOUBLE of the Hugging Face Hub HTTP API (model repos only). See the package docstring.

What it implements, with the routes ``huggingface_hub`` 2.4 uses (read from its source):

=====================================================  ==============================================
``POST /api/repos/create``                             ``HfApi.create_repo`` (409 when it exists)
``GET  /api/models/{id}[/revision/{rev}]``             ``repo_info`` / ``model_info`` (``sha``, ...)
``GET  /api/models/{id}/tree/{rev}[/{path}]``          ``list_repo_tree`` (Link-header pagination)
``POST /api/models/{id}/preupload/{rev}``              upload mode per file: ``lfs`` or ``regular``
``POST /{id}.git/info/lfs/objects/batch``              LFS batch API (``basic`` transfer)
``PUT  /_double/lfs-upload/{ticket}``                  stands in for the pre-signed S3 URL
``POST /{id}.git/info/lfs/objects/verify``             LFS verify action
``POST /api/models/{id}/commit/{branch}``              NDJSON commit (file, lfsFile, deletedFile, ...)
``POST /api/models/{id}/branch/{branch}``              ``create_branch`` (409 when it exists)
``POST /api/validate-yaml``                            model card metadata check before a commit
``HEAD|GET /{id}/resolve/{rev}/{path}``                file download (ETag, X-Repo-Commit, size)
``GET  /api/whoami-v2``                                ``whoami``
=====================================================  ==============================================

Auth follows the Hub: ``Authorization: Bearer <token>``; an unknown token is a 401 with
``Invalid credentials in Authorization header``; a private repo (or a missing one) read
without a token is a 401 ``RepoNotFound``, with a token that cannot read it a 404
``RepoNotFound`` (the Hub does not tell missing from private); gated files need a token
that was granted access (401/403 ``GatedRepo``); writes need a ``write`` token whose user
owns the namespace or belongs to the org. Errors carry ``X-Error-Code``/``X-Error-Message``
headers and a ``{"error": ...}`` body, which is what ``hf_raise_for_status`` maps to
``RepositoryNotFoundError``, ``GatedRepoError``, ``RevisionNotFoundError``, ...

Not implemented (the client would get a 404 naming the route): Xet storage, pull requests,
tags, datasets/spaces, multipart LFS, ``.gitignore`` handling.

Repos live in memory and on disk: file contents in ``ROOT/blobs/<sha256>``, each repo's
refs/commits/trees in ``ROOT/repos/<org>/<name>.json``. Token values are never logged:
:attr:`HubDouble.requests` records the user a request authenticated as, not the token.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

# The patterns of the .gitattributes the Hub writes into a new model repo (abridged):
# these paths, files of 10 MiB and more, and binary files are stored with LFS.
DEFAULT_LFS_PATTERNS = (
    "*.bin", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.npz", "*.onnx", "*.pt", "*.pth",
    "*.safetensors", "*.tar.gz", "*.zip", "*.zst", "*tfevents*",
)
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_LFS_PATTERNS).encode()
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_NAME = r"[A-Za-z0-9][\w.-]{0,95}"
_REPO = rf"(?P<org>{_NAME})/(?P<name>{_NAME})"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class FileEntry:
    sha256: str  # content address in the blob store
    size: int
    lfs: bool

    @property
    def oid(self) -> str:
        """Git oid: of the content for regular files, of the LFS pointer for LFS files."""
        if self.lfs:
            return git_blob_oid(lfs_pointer(self.sha256, self.size))
        return self._content_oid

    _content_oid: str = ""


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.refs:
            return self.commits[self.refs[rev]]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits:
            return self.commits[rev]
        return None


@dataclass
class Token:
    user: str
    orgs: tuple[str, ...] = ()
    role: str = "write"  # "read" or "write"


class HubError(Exception):
    """An error response in the Hub's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubStore:
    """Repos, commits and content-addressed blobs, on disk under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self._counter = 0

    # blobs --------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / sha
        if not path.exists():
            tmp = path.with_suffix(f".tmp-{secrets.token_hex(4)}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def has_blob(self, sha: str, size: int | None = None) -> bool:
        path = self.root / "blobs" / sha
        return path.is_file() and (size is None or path.stat().st_size == size)

    def blob(self, sha: str) -> bytes:
        return (self.root / "blobs" / sha).read_bytes()

    def entry(self, data: bytes, lfs: bool) -> FileEntry:
        return FileEntry(sha256=self.put_blob(data), size=len(data), lfs=lfs, _content_oid=git_blob_oid(data))

    # repos --------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool) -> Repo:
        with self.lock:
            repo = Repo(repo_id=repo_id, private=private, created_at=_now())
            self.repos[repo_id] = repo
            # Like the Hub: a new repo starts with one commit holding .gitattributes.
            self.commit(repo, "main", "initial commit", {".gitattributes": self.entry(GITATTRIBUTES, lfs=False)}, [])
            return repo

    def commit(self, repo: Repo, branch: str, title: str, adds: dict[str, FileEntry], deletes: list[str],
               delete_folders: list[str] = (), parent: str | None = None) -> Commit:
        with self.lock:
            head = repo.commits[repo.refs[branch]] if branch in repo.refs else None
            files = dict(head.files) if head else {}
            for path in deletes:
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            for folder in delete_folders:
                prefix = folder.rstrip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                for p in gone:
                    del files[p]
            files.update(adds)
            self._counter += 1
            body = json.dumps([repo.repo_id, head.oid if head else None, title, self._counter,
                               sorted((p, e.sha256, e.lfs) for p, e in files.items())])
            oid = hashlib.sha1(body.encode()).hexdigest()
            commit = Commit(oid=oid, parent=head.oid if head else None, title=title, date=_now(), files=files)
            repo.commits[oid] = commit
            repo.refs[branch] = oid
            self.save(repo)
            return commit

    def save(self, repo: Repo) -> None:
        org, name = repo.repo_id.split("/")
        path = self.root / "repos" / org / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(repo)
        data["granted"] = sorted(repo.granted)
        path.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


class HubDouble:
    """The loopback server. Use as a context manager, or call :meth:`start` / :meth:`stop`."""

    def __init__(self, root: str | Path, page_size: int = 1000):
        self.store = HubStore(Path(root))
        self.tokens: dict[str, Token] = {}
        self.page_size = page_size  # the Hub pages tree listings by 1000; tests may lower it
        self.requests: list[dict[str, Any]] = []  # (method, path, user, status): no token values
        self._tickets: dict[str, tuple[str, int]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> HubDouble:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubDouble:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "HubDouble is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # test-side administration (not part of the Hub API) -------------------------------------
    def add_token(self, token: str, user: str, orgs: tuple[str, ...] | list[str] = (), role: str = "write") -> None:
        self.tokens[token] = Token(user=user, orgs=tuple(orgs), role=role)

    def seed_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False,
                  granted: tuple[str, ...] = (), branch: str = "main") -> str:
        """Create ``repo_id`` holding ``files`` directly in the store; returns the commit sha."""
        with self.store.lock:
            repo = self.store.repos.get(repo_id) or self.store.create_repo(repo_id, private)
            repo.gated, repo.granted = gated, set(granted)
            adds = {p: self.store.entry(d, lfs=_is_lfs(p, len(d), d[:512])) for p, d in files.items()}
            return self.store.commit(repo, branch, "seed", adds, []).oid

    def set_gated(self, repo_id: str, gated: bool = True, granted: tuple[str, ...] = ()) -> None:
        repo = self.store.repos[repo_id]
        repo.gated, repo.granted = gated, set(granted)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Contents of every file of ``repo_id`` at ``revision``, as stored."""
        commit = self.store.repos[repo_id].resolve(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return {p: self.store.blob(e.sha256) for p, e in sorted(commit.files.items())}

    def head(self, repo_id: str, revision: str = "main") -> str:
        return self.store.repos[repo_id].refs[revision]

    def client_env(self, hf_home: str | Path, token: str | None = None, offline: bool = False,
                   base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a ``huggingface_hub`` client process that talks to this double only."""
        import os

        env = dict(os.environ if base is None else base)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
                    "TRANSFORMERS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER", "HF_OIDC_RESOURCE"):
            env.pop(key, None)
        env.update(HF_ENDPOINT=self.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="0")
        if token is not None:
            env["HF_TOKEN"] = token
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        return env

    # access rules ---------------------------------------------------------------------------
    def _user(self, headers) -> Token | None:
        auth = headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    @staticmethod
    def _may_read(repo: Repo, user: Token | None) -> bool:
        return not repo.private or (user is not None and repo.namespace in (user.user, *user.orgs))

    def _readable(self, repo_id: str, user: Token | None) -> Repo:
        repo = self.store.repos.get(repo_id)
        if repo is None or not self._may_read(repo, user):
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, user: Token | None) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        repo = self._readable(repo_id, user)
        self._check_write(repo.namespace, user)
        return repo

    @staticmethod
    def _check_write(namespace: str, user: Token) -> None:
        if user.role != "write":
            raise HubError(403, "This token has read access only: a write token is required")
        if namespace not in (user.user, *user.orgs):
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace}")

    @staticmethod
    def _commit_at(repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    name = path.rsplit("/", 1)[-1]
    return (size >= LFS_SIZE_THRESHOLD or b"\0" in sample
            or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in DEFAULT_LFS_PATTERNS))


class _Handler(BaseHTTPRequestHandler):
    hub: HubDouble
    protocol_version = "HTTP/1.1"  # keep-alive, like the client expects
    server_version = "HubDouble/1"

    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", "create_branch"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", r"/_double/lfs-upload/(?P<ticket>[0-9a-f]+)", "lfs_upload"),
        ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # plumbing -----------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    @property
    def base(self) -> str:
        return f"http://{self.headers.get('Host') or self.hub.url.removeprefix('http://')}"

    def _dispatch(self, method: str) -> None:
        self.body = self._read_body()
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        user_name = None
        status = 500
        try:
            self.user = self.hub._user(self.headers)
            user_name = self.user.user if self.user else None
            for verb, pattern, action in self.ROUTES:
                match = re.fullmatch(pattern, split.path)
                if verb == method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if "org" in args:
                        args["repo_id"] = f"{args.pop('org')}/{args.pop('name')}"
                    status = getattr(self, action)(**args)
                    break
            else:
                raise HubError(404, f"hub double: {method} {split.path} is not implemented")
        except HubError as err:
            status = err.status
            self._error(err)
        except Exception as exc:  # a bug in the double: say so instead of hanging the client
            status = 500
            self._error(HubError(500, f"hub double crashed: {type(exc).__name__}: {exc}"))
        self.hub.requests.append({"method": method, "path": split.path, "user": user_name, "status": status})

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", length: int | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        return status

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> int:
        return self._send(status, json.dumps(data).encode(), headers)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json({"error": err.message, **err.body}, err.status, headers)

    # routes -------------------------------------------------------------------------------
    def create_repo(self) -> int:
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        payload = json.loads(self.body or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "hub double: only model repos are implemented")
        name, org = payload.get("name"), payload.get("organization") or self.user.user
        repo_id = f"{org}/{name}"
        if not re.fullmatch(_REPO, repo_id):
            raise HubError(400, f"Invalid repo name: {repo_id}")
        self.hub._check_write(org, self.user)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub.store.lock:
            if repo_id in self.hub.store.repos:
                # The Hub's 409 carries the repo url: create_repo(exist_ok=True) returns it.
                raise HubError(409, "You already created this model repo", body={"url": f"{self.base}/{repo_id}"})
            self.hub.store.create_repo(repo_id, private)
        return self._json({"url": f"{self.base}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self) -> int:
        import yaml

        content = json.loads(self.body).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if not match:
            return self._json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            return self._json({"errors": [{"message": f"Invalid YAML: {exc}"}]}, 400)
        errors = []
        if not isinstance(meta, dict):
            errors.append({"message": "metadata must be a YAML mapping"})
        else:
            for key in ("tags", "base_model"):
                value = meta.get(key)
                if value is not None and not isinstance(value, (str, list)):
                    errors.append({"message": f'"{key}" must be a string or a list of strings'})
        return self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def whoami(self) -> int:
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self._json({"type": "user", "name": self.user.user, "orgs": [{"name": o} for o in self.user.orgs],
                           "auth": {"type": "access_token", "accessToken": {"role": self.user.role}}})

    def repo_info(self, repo_id: str, rev: str = "main") -> int:
        repo = self.hub._readable(repo_id, self.user)
        commit = self.hub._commit_at(repo, rev)
        return self._json({
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo.namespace, "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "gated": "manual" if repo.gated else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": None,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def tree(self, repo_id: str, rev: str, path: str = "") -> int:
        repo = self.hub._readable(repo_id, self.user)
        commit = self.hub._commit_at(repo, rev)
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for file_path, entry in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):].split("/")
            for depth in range(1, len(rest)):  # folders on the way
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder,
                                                "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(rest) == 1:
                item = {"type": "file", "path": file_path, "size": entry.size, "oid": entry.oid}
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size,
                                   "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
                entries[file_path] = item
        items = [entries[k] for k in sorted(entries)]
        start = int(self.query.get("cursor", 0))
        page = items[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(items):
            query = f"recursive={str(recursive).lower()}&expand=false&cursor={start + self.hub.page_size}"
            url = f"{self.base}/api/models/{repo_id}/tree/{quote(rev, safe='')}"
            url += f"/{quote(path, safe='')}" if path else ""
            headers["Link"] = f'<{url}?{query}>; rel="next"'
        return self._json(page, headers=headers)

    def preupload(self, repo_id: str, rev: str) -> int:
        repo = self.hub._writable(repo_id, self.user)
        if self.query.get("create_pr"):
            raise HubError(400, "hub double: pull requests are not implemented")
        head = repo.resolve(rev)  # a branch that does not exist yet has no remote files
        files = []
        for item in json.loads(self.body)["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = _is_lfs(item["path"], item["size"], sample)
            remote = head.files.get(item["path"]) if head else None
            oid = None
            if remote is not None:
                oid = remote.sha256 if remote.lfs else remote.oid
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        return self._json({"files": files, "commitOid": head.oid if head else None})

    def lfs_batch(self, repo_id: str) -> int:
        self.hub._writable(repo_id, self.user)
        payload = json.loads(self.body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "hub double: only the 'upload' operation with 'basic' transfer is implemented")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            if self.hub.store.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})  # already stored: no actions
                continue
            ticket = secrets.token_hex(16)
            self.hub._tickets[ticket] = (oid, size)
            objects.append({
                "oid": oid, "size": size, "authenticated": True,
                "actions": {
                    "upload": {"href": f"{self.base}/_double/lfs-upload/{ticket}", "expires_in": 900},
                    "verify": {"href": f"{self.base}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                },
            })
        return self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_upload(self, ticket: str) -> int:
        # Stands in for a pre-signed storage URL: the ticket is the credential, no Authorization.
        if ticket not in self.hub._tickets:
            raise HubError(403, "hub double: unknown or used upload ticket")
        oid, size = self.hub._tickets.pop(ticket)
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
        self.hub.store.put_blob(self.body)
        return self._send(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")

    def lfs_verify(self, repo_id: str) -> int:
        self.hub._writable(repo_id, self.user)
        payload = json.loads(self.body)
        if not self.hub.store.has_blob(payload["oid"], payload["size"]):
            raise HubError(404, f"LFS object {payload['oid']} was not uploaded")
        return self._json({"message": "ok"})

    def create_branch(self, repo_id: str, rev: str) -> int:
        repo = self.hub._writable(repo_id, self.user)
        payload = json.loads(self.body or b"{}")
        with self.hub.store.lock:
            if rev in repo.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{rev}")
            start = self.hub._commit_at(repo, payload.get("startingPoint") or "main")
            repo.refs[rev] = start.oid
            self.hub.store.save(repo)
        return self._json({"message": "ok"})

    def commit(self, repo_id: str, rev: str) -> int:
        repo = self.hub._writable(repo_id, self.user)
        if self.query.get("create_pr"):
            raise HubError(400, "hub double: pull requests are not implemented")
        if rev not in repo.refs:
            raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
        header, adds, deletes, delete_folders = None, {}, [], []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "file content must be base64-encoded")
                data = base64.b64decode(value["content"])
                adds[value["path"]] = self.hub.store.entry(data, lfs=False)
            elif key == "lfsFile":
                if not self.hub.store.has_blob(value["oid"], value.get("size")):
                    raise HubError(400, f"LFS file {value['path']} ({value['oid']}) was not uploaded")
                adds[value["path"]] = FileEntry(sha256=value["oid"], size=value["size"], lfs=True)
            elif key == "deletedFile":
                deletes.append(value["path"])
            elif key == "deletedFolder":
                delete_folders.append(value["path"])
            else:
                raise HubError(400, f"hub double: commit operation {key!r} is not implemented")
        if header is None or not header.get("summary"):
            raise HubError(400, "the commit needs a header with a summary")
        with self.hub.store.lock:
            parent = header.get("parentCommit")
            if parent and not repo.refs[rev].startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}: {rev} is at {repo.refs[rev]}")
            commit = self.hub.store.commit(repo, rev, header["summary"], adds, deletes, delete_folders)
        return self._json({"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                           "commitUrl": f"{self.base}/{repo_id}/commit/{commit.oid}"})

    def resolve(self, repo_id: str, rev: str, path: str) -> int:
        repo = self.hub._readable(repo_id, self.user)
        commit = self.hub._commit_at(repo, rev)
        if repo.gated and not (self.user and (repo.namespace in (self.user.user, *self.user.orgs)
                                              or self.user.user in repo.granted)):
            message = (f"Access to model {repo_id} is restricted. You must have access to it and be "
                       "authenticated to access it. Please log in.")
            raise HubError(401 if self.user is None else 403, message, "GatedRepo")
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        etag = entry.sha256 if entry.lfs else entry.oid
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        if self.command == "HEAD":
            return self._send(200, b"", headers, "application/octet-stream", length=entry.size)
        return self._send(200, self.hub.store.blob(entry.sha256), headers, "application/octet-stream")
