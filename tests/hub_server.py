"""A small, real, Hugging-Face-Hub-compatible HTTP server for tests (standard library only).

It speaks the part of the Hub protocol that ``huggingface_hub`` 2.x uses for model repos, so the real
client (HfApi, hf_hub_download, snapshot_download, transformers' push_to_hub / from_pretrained) runs end
to end on loopback. Repo ids are always ``namespace/name``. Storage is in memory: per repo, a dict of
commits (a full snapshot path -> bytes each) and branch refs (``main`` to start with).

Routes ({repo} = namespace/name; {rev} = branch or 40-hex commit sha, URL-quoted):
    GET      /api/whoami-v2                         401 without a valid bearer token
    POST     /api/repos/create                      json {name, organization, type, visibility|private}; 409 if taken
    DELETE   /api/repos/delete                      json {name, organization, type}
    POST     /api/validate-yaml                     always {"warnings": [], "errors": []}
    GET      /api/models/{repo}[/revision/{rev}]    ModelInfo json (?blobs=true adds size/blobId to siblings)
    GET      /api/models/{repo}/tree/{rev}[/{path}] [{"type": "file"|"directory", "oid", "size", "path"}]
    GET      /api/models/{repo}/refs                {"branches": [...], "tags": [], "converts": []}
    POST     /api/models/{repo}/branch/{branch}     json {startingPoint}; 409 if it exists
    POST     /api/models/{repo}/preupload/{rev}     every file -> uploadMode "regular" (never LFS/Xet) + remote oid
    POST     /api/models/{repo}/commit/{rev}        NDJSON: header, file (base64), deletedFile, deletedFolder
    HEAD|GET /{repo}/resolve/{rev}/{path}           bytes, ETag (git blob sha1), X-Repo-Commit; Range -> 206
Anything else is 404; /api/datasets|spaces|kernels/... and /datasets|spaces/... are 404 RepoNotFound.

Hub semantics: errors carry ``X-Error-Code`` RepoNotFound / RevisionNotFound / EntryNotFound and a json
``{"error": ...}`` body; the client turns them into RepositoryNotFoundError / RevisionNotFoundError /
RemoteEntryNotFoundError. New repos start with a commit holding ``.gitattributes``. Writes need a valid
token; private repos answer 401 + RepoNotFound without one; a token that is not accepted gets 401
"Invalid credentials in Authorization header" (HfHubHTTPError). Any non-empty token is accepted unless
``tokens=`` is given. Not supported: LFS/Xet uploads, create_pr, pagination, tree ``expand``, chunked
request bodies. Responses close the connection (HTTP/1.0), so after ``stop()`` the hub is really gone.

Endpoint configuration. ``HF_ENDPOINT`` is read once, at import time, into ``huggingface_hub.constants.ENDPOINT``
and ``HUGGINGFACE_CO_URL_TEMPLATE``. The module-level functions (``huggingface_hub.upload_folder``,
``model_info``...) are methods of ``huggingface_hub.hf_api.api``, an HfApi built at import time, and
transformers caches its own HfApi in ``transformers.utils.hub._hf_api``. Setting the env var inside a test
therefore changes nothing. Either pass ``endpoint=hub.url`` (``HfApi(endpoint=...)``,
``hf_hub_download(..., endpoint=...)``, ``snapshot_download(..., endpoint=...)``) or call
``patch_hf_client(monkeypatch, hub.url, cache_dir)``, which patches all of them (the ``hub_server`` fixture does).

Fault injection vs. client retries (huggingface_hub 2.4): calls made with ``get_session()`` are not retried
(model_info/repo_info, create_repo, whoami, create_commit's POST). Calls made with ``http_backoff``
(preupload, tree listing, upload_folder's pipelined commit) retry 408/429/5xx up to 5 times and sleep
1, 2, 4, 8, 8 s between tries, so inject at most one fault there. hf_hub_download retries a failed HEAD once
at once and then backs off; a 5xx on the file GET is not retried.

    with serve_hub() as hub:        # hub.url == "http://127.0.0.1:<free port>"
        hub.fail_next(1, status=500, path_contains="/api/models/", method="GET")
        hub.stop()                  # later connections are refused
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import itertools
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

try:  # only the fixture at the bottom needs pytest; the server itself is standard library only
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

USER = "tester"
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_oid(data: bytes) -> str:
    """Git blob sha1, as the Hub uses for ETag / oid of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    title: str
    date: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


def _repo_not_found(repo_id: str, status: int = 404) -> HubError:
    return HubError(status, f"Repository Not Found: {repo_id}", "RepoNotFound")


class HubServer(ThreadingHTTPServer):
    """In-memory Hub. ``url``, ``repos`` and ``requests`` (list of (method, path)) are public."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tokens: set[str] | None = None):
        super().__init__((host, port), _Handler)
        self.url = f"http://{host}:{self.server_address[1]}"
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._faults: list[list] = []  # [remaining, status, path_contains, method]
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    # -- lifecycle / fault injection --------------------------------------------------------------
    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent): later requests get 'connection refused'."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def fail_next(self, n: int = 1, status: int = 500, path_contains: str = "", method: str | None = None) -> None:
        """Make the next ``n`` requests matching ``path_contains`` (and ``method``, if given) answer ``status``."""
        with self.lock:
            self._faults.append([n, status, path_contains, method])

    def _take_fault(self, method: str, path: str) -> int | None:
        with self.lock:
            for fault in self._faults:
                if fault[0] > 0 and fault[2] in path and fault[3] in (None, method):
                    fault[0] -= 1
                    return fault[1]
        return None

    # -- storage ----------------------------------------------------------------------------------
    def add_commit(self, repo: Repo, branch: str, files: dict[str, bytes], title: str) -> Commit:
        parent = repo.refs.get(branch)
        digest = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{title}\0{next(self._counter)}".encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{git_oid(files[path])}".encode())
        commit = Commit(digest.hexdigest(), files, title, _now(), parent)
        repo.commits[commit.sha] = commit
        repo.refs[branch] = commit.sha
        return commit


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    server_version = "TestHub/1.0"

    def log_message(self, format, *args):  # keep pytest output quiet
        pass

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_DELETE = do_PUT = do_GET

    # -- plumbing ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        hub = self.server
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        hub.requests.append((self.command, url.path))
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            self.body = gzip.decompress(self.body)
        try:
            status = hub._take_fault(self.command, self.path)
            if status is not None:
                raise HubError(status, f"Injected fault ({status})")
            self._route([unquote(p) for p in url.path.split("/")[1:]])
        except HubError as e:
            message = e.message.encode("ascii", "backslashreplace").decode()  # headers must be latin-1
            headers = {"X-Error-Message": message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            self._json({"error": e.message, **e.body}, e.status, headers)
        except Exception as e:  # a bug in the test server: surface it as a 500 with the reason
            self._json({"error": f"{type(e).__name__}: {e}"}, 500)

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))  # for HEAD too: the size of the GET body
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[0].lower() in ("1", "true")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not token:
            return None
        if self.server.tokens is not None and token not in self.server.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        authed = self._token() is not None
        repo = self.server.repos.get(repo_id)
        if repo is None:
            raise _repo_not_found(repo_id)
        if (repo.private or write) and not authed:
            raise _repo_not_found(repo_id, 401)
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        sha = repo.refs.get(rev.removeprefix("refs/heads/"), rev)
        if sha not in repo.commits:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    # -- routing ----------------------------------------------------------------------------------
    def _route(self, parts: list[str]) -> None:
        m, hub = self.command, self.server
        with hub.lock:
            if parts[:1] == ["api"]:
                if parts[1:] == ["whoami-v2"] and m == "GET":
                    return self._whoami()
                if parts[1:] == ["repos", "create"] and m == "POST":
                    return self._create_repo(json.loads(self.body or b"{}"))
                if parts[1:] == ["repos", "delete"] and m == "DELETE":
                    payload = json.loads(self.body or b"{}")
                    repo = self._repo(f"{payload.get('organization') or USER}/{payload['name']}", write=True)
                    del hub.repos[repo.repo_id]
                    return self._json({})
                if parts[1:] == ["validate-yaml"] and m == "POST":
                    return self._json({"warnings": [], "errors": []})
                if len(parts) >= 4 and parts[1] in ("datasets", "spaces", "kernels"):
                    raise _repo_not_found("/".join(parts[2:4]))
                if len(parts) >= 4 and parts[1] == "models":
                    return self._model_api(f"{parts[2]}/{parts[3]}", parts[4:])
            elif parts[:1] in (["datasets"], ["spaces"]):
                raise _repo_not_found("/".join(parts[1:3]))
            elif len(parts) >= 5 and parts[2] == "resolve" and m in ("GET", "HEAD"):
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"Not Found: {m} {self.path}")

    def _model_api(self, repo_id: str, rest: list[str]) -> None:
        m = self.command
        if m == "GET" and (not rest or rest[0] == "revision"):
            return self._model_info(repo_id, "/".join(rest[1:]) or "main")
        if m == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            return self._tree(repo_id, rest[1], "/".join(rest[2:]).strip("/"))
        if m == "GET" and rest == ["refs"]:
            repo = self._repo(repo_id)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.refs.items()]
            return self._json({"branches": branches, "tags": [], "converts": []})
        if m == "POST" and rest[:1] == ["branch"] and len(rest) >= 2:
            repo, branch = self._repo(repo_id, write=True), "/".join(rest[1:])
            if branch in repo.refs:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            start = json.loads(self.body or b"{}").get("startingPoint") or "main"
            repo.refs[branch] = self._commit(repo, start).sha
            return self._json({})
        if m == "POST" and rest[:1] in (["preupload"], ["commit"]) and len(rest) >= 2:
            if self._flag("create_pr"):
                raise HubError(400, "create_pr is not supported by the test hub")
            repo = self._repo(repo_id, write=True)
            commit = self._commit(repo, "/".join(rest[1:]))
            if rest[0] == "preupload":
                return self._preupload(commit, json.loads(self.body))
            return self._create_commit(repo, "/".join(rest[1:]), commit)
        raise HubError(404, f"Not Found: {m} {self.path}")

    # -- handlers ---------------------------------------------------------------------------------
    def _whoami(self) -> None:
        if self._token() is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        auth = {"type": "access_token", "accessToken": {"displayName": "test-token", "role": "write"}}
        self._json({"type": "user", "id": "0" * 24, "name": USER, "fullname": "Test User",
                    "email": "tester@example.com", "emailVerified": True, "orgs": [], "auth": auth})

    def _create_repo(self, payload: dict) -> None:
        if self._token() is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "Only model repos are supported by the test hub")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.server.repos:
            raise HubError(409, "You already created this model repo", url=url)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.server.repos[repo_id] = Repo(repo_id, private)
        self.server.add_commit(repo, "main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, rev)
        blobs = self._flag("blobs")
        siblings = [{"rfilename": p, **({"size": len(d), "blobId": git_oid(d)} if blobs else {})}
                    for p, d in sorted(commit.files.items())]
        self._json({"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                    "author": repo_id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
                    "createdAt": repo.created, "private": repo.private, "gated": False, "disabled": False,
                    "downloads": 0, "likes": 0, "tags": [], "siblings": siblings})

    def _tree(self, repo_id: str, rev: str, path: str) -> None:
        commit = self._commit(self._repo(repo_id), rev)
        prefix, recursive, entries = f"{path}/" if path else "", self._flag("recursive"), {}
        for file_path, data in commit.files.items():
            if not file_path.startswith(prefix):
                continue
            segments = file_path[len(prefix):].split("/")
            for depth in range(1, len(segments) if recursive else min(2, len(segments))):
                dir_path = prefix + "/".join(segments[:depth])
                oid = hashlib.sha1(f"{commit.sha}:{dir_path}".encode()).hexdigest()
                entries[dir_path] = {"type": "directory", "oid": oid, "size": 0, "path": dir_path}
            if recursive or len(segments) == 1:
                entries[file_path] = {"type": "file", "oid": git_oid(data), "size": len(data), "path": file_path}
        if path and not entries:
            raise HubError(404, f"{path} not found on {rev}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        self._json([entries[k] for k in sorted(entries)])

    def _preupload(self, commit: Commit, payload: dict) -> None:
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_oid(commit.files[f["path"]]) if f["path"] in commit.files else None}
                 for f in payload.get("files", [])]
        self._json({"files": files, "commitOid": commit.sha})

    def _create_commit(self, repo: Repo, branch: str, head: Commit) -> None:
        if branch not in repo.refs:
            raise HubError(400, f"Can only commit to a branch, got {branch}")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First NDJSON line must be the commit header")
        header, files = lines[0]["value"], dict(head.files)
        if header.get("parentCommit") not in (None, head.sha):
            raise HubError(412, f"A commit has happened since {header['parentCommit']}")
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value", {})
            path = value.get("path", "")
            if key == "file":
                content = value["content"]
                files[path] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            elif key == "deletedFile" and path in files:
                del files[path]
            elif key == "deletedFolder" and any(p.startswith(path.rstrip("/") + "/") for p in files):
                files = {p: d for p, d in files.items() if not p.startswith(path.rstrip("/") + "/")}
            elif key in ("deletedFile", "deletedFolder"):
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            else:
                raise HubError(400, f"Unsupported commit operation {key!r} (the test hub has no LFS/Xet)")
        commit = self.server.add_commit(repo, branch, files, header.get("summary", ""))
        url = f"{self.server.url}/{repo.repo_id}/commit/{commit.sha}"
        self._json({"commitUrl": url, "commitOid": commit.sha, "pullRequestUrl": None, "success": True})

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        commit = self._commit(self._repo(repo_id), rev)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{git_oid(data)}"',
                   "X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if self.command == "HEAD" or not match or match.groups() == ("", ""):
            return self._send(200, data, headers)
        first, last = match.groups()
        start = max(len(data) - int(last), 0) if first == "" else int(first)
        end = len(data) if first == "" or last == "" else min(int(last) + 1, len(data))
        if start >= end:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
        self._send(206, data[start:end], {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})


@contextlib.contextmanager
def serve_hub(tokens: set[str] | None = None):
    """Run a :class:`HubServer` on 127.0.0.1 (OS-chosen free port) in a background thread."""
    hub = HubServer(tokens=tokens).start()
    try:
        yield hub
    finally:
        hub.stop()


def patch_hf_client(monkeypatch, url: str, cache_dir) -> None:
    """Point huggingface_hub (and transformers, if imported) at ``url`` for the duration of a test.

    Also isolates the cache (HF_HUB_CACHE), disables telemetry and offline mode, and sets HF_TOKEN to a fake
    token, so the user's real token is never read or sent and writes are authorised (pass ``token=False``
    to make an anonymous call).
    """
    from huggingface_hub import constants, hf_api

    env = {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(cache_dir), "HF_TOKEN": "hf_test_token",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)  # would take precedence over HF_TOKEN
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    patched = {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": template, "HF_HUB_CACHE": str(cache_dir),
               "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_OFFLINE": False}
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", url)  # backs huggingface_hub.upload_folder(), model_info(), ...
    if "transformers.utils.hub" in sys.modules:  # transformers caches an HfApi built with the old endpoint
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)


if pytest is not None:

    @pytest.fixture(name="hub_server")
    def hub_server_fixture(tmp_path, monkeypatch):
        """Pytest fixture ``hub_server``: a running :class:`HubServer`, with the HF client pointed at it.

        tests/conftest.py imports it (``from tests.hub_server import hub_server_fixture``), which registers it
        for every test.
        """
        with serve_hub() as hub:
            patch_hf_client(monkeypatch, hub.url, tmp_path / "hf_cache")
            yield hub
            module = sys.modules.get("transformers.utils.hub")  # imported during the test: don't leak its HfApi
            if getattr(getattr(module, "_hf_api", None), "endpoint", None) == hub.url:
                module._hf_api = None
