"""A real, offline Hugging Face Hub mirror for tests: `olah`_ serving local git repos.

.. _olah: https://pypi.org/project/olah/

Tests that call ``hf_hub_download``, ``snapshot_download``, ``from_pretrained`` or
``pipeline(...)`` exercise the real HTTP download path of ``huggingface_hub`` against
an olah server listening on ``127.0.0.1``.  olah runs in *offline* mode and only
serves the git repositories this module builds, so nothing ever reaches
huggingface.co.

Quick use
---------
As pytest fixtures (import them into ``tests/conftest.py``)::

    from tests.olah_mirror import olah_server, hf_mirror  # noqa: F401
    # (a test module that imports them instead gets its own session server --
    # harmless, ~1 s)

    def test_download(hf_mirror, tmp_path):
        (tmp_path / "config.json").write_text("{}")
        sha = hf_mirror.add_repo("acme/tiny", tmp_path)      # folder or {path: bytes}
        path = huggingface_hub.hf_hub_download("acme/tiny", "config.json")

* ``olah_server`` (session scope) builds/finds olah, starts ONE server for the whole
  session and yields an :class:`OlahServer`.  Repos can be added at any time: olah
  reads the git mirrors at request time.
* ``hf_mirror`` (function scope) additionally points this process's
  ``huggingface_hub``/``transformers`` at the server (see *Endpoint* below) and gives
  the test a fresh, empty HF cache; it yields the same :class:`OlahServer`.

Without pytest::

    with olah_mirror({"acme/tiny": "/path/to/folder"}) as server:
        print(server.url)   # e.g. http://127.0.0.1:41234

Installing olah
---------------
olah (0.5.4) pins ``psutil==5.9.8`` and ``pydantic-settings>=2.15``: installing it into
the project's interpreter would downgrade psutil (an accelerate dependency).  So
:func:`ensure_olah` keeps it in its own venv, ``$MACRL_OLAH_VENV`` or
``${XDG_CACHE_HOME:-~/.cache}/macrl-test-olah-venv``, created on first use with
``python -m venv DIR && DIR/bin/pip install olah==0.5.4`` (13-23 s measured, PyPI;
guarded by a file lock so parallel workers build it once).  ``$MACRL_OLAH_SPEC``
overrides the pip requirement.  The server runs as ``DIR/bin/python -m olah.server``.

What is written on disk
-----------------------
Under the server's root directory (a temp dir by default)::

    mirrors/models/<org>/<name>/.git   git repos (olah's ``mirrors-path`` layout:
                                       <mirrors>/<repo_type plural>/<org>/<name>)
    cache/                             olah ``repos-path`` (its proxy cache; see seeding)
    olah.toml  olah.log  logs/

The config (``olah.toml``)::

    [basic]
    host = "127.0.0.1"
    port = <free port>
    repos-path = "<root>/cache"
    mirrors-path = ["<root>/mirrors"]
    hf-scheme = "http"
    hf-netloc = "127.0.0.1:9"        # upstream = a closed local port: even a code path
    hf-lfs-netloc = "127.0.0.1:9"    # that ignored `offline` could not reach the Hub
    mirror-netloc = "127.0.0.1:<port>"
    mirror-lfs-netloc = "127.0.0.1:<port>"
    metadata-cache-ttl = 0
    [accessibility]
    offline = true

Git repos: files are stored with ``git hash-object -w --no-filters`` and committed
with plumbing (``update-index``/``write-tree``/``commit-tree``) under a fixed author
and fixed dates (2024-01-01T00:00:00Z + one second per commit), with the user's
global/system git config disabled.  So binary files (``.safetensors``...) are plain
git blobs -- olah serves them byte for byte, no git-lfs needed (olah *can* also read
LFS pointers + ``.git/lfs/objects``, we do not use that) -- and the commit SHAs are
deterministic.  A ``.gitattributes`` with ``filter=lfs`` in a source folder is
committed as an ordinary file and has no effect.  The work tree of each repo is
left empty; olah only reads the object database.

Workaround: metadata seeding (olah 0.5.4, offline mode)
-------------------------------------------------------
For a local mirror olah answers from git directly when the URL names a revision
git can resolve (``/api/models/o/n/revision/<rev>``, ``/api/models/o/n/tree/<rev>/``,
``/o/n/resolve/<rev>/<existing file>``).  But two offline code paths ignore the
mirror and look only in olah's proxy cache (``repos-path``), which is empty:

* ``GET /api/models/o/n`` (no revision: ``HfApi().model_info(repo)``) -> 401
  ``RepoNotFound``;
* ``HEAD /o/n/resolve/<branch>/<missing file>`` -> 401 ``RepoNotFound`` instead of
  404 ``EntryNotFound``, so ``hf_hub_download`` raised ``RepositoryNotFoundError``
  and transformers, which probes optional files, failed: without the seeding
  ``pipeline("image-feature-extraction", model=...)`` dies with ``OSError: acme/vit-pipe
  is not a local folder and is not a valid model identifier`` after a 401 on
  ``resolve/main/processor_config.json`` (with a full 40-hex SHA as revision the
  missing-file answer is a correct 404 even without seeding).

So after each commit :meth:`OlahServer.add_repo` writes, for that repo, the entries
olah's offline lookups read: ``cache/api/<type>/<o>/<n>/revision/<ref>/resolved_commit.json``
(+``.body`` = the SHA) for every branch and tag, and
``cache/api/<type>/<o>/<n>/revision/<sha of default branch>/meta_head.json``
(``{"sha", "lastModified"}``).  With that, both paths above behave like the Hub.
Commit to the mirror repos only through ``add_repo`` (or re-run ``_seed_metadata``),
otherwise branch names keep resolving to the seeded SHAs.

Known olah limitations that remain (see tests/test_olah_mirror.py):

* ``GET`` (not ``HEAD``) of a missing file -> HTTP 500 (olah's ``get_file`` indexes
  the tree before checking the path).  huggingface_hub always sends ``HEAD`` first,
  so clients see the correct ``EntryNotFoundError``.
* A missing repo answers 401 ``RepoNotFound`` (like the Hub for anonymous users) ->
  ``RepositoryNotFoundError``; an unknown revision of an existing repo also answers
  401 ``RepoNotFound`` (the Hub says 404 ``RevisionNotFound``) -> also
  ``RepositoryNotFoundError``, never ``RevisionNotFoundError``.
* olah's HTML index ``/`` is a 500 (its TemplateResponse call does not match
  starlette 1.x); the readiness probe therefore polls an API route.
* ETags of files are git blob SHA-1s (the Hub uses the sha256 for LFS files); the
  client only uses them as cache keys.

Endpoint: pointing clients at the server
----------------------------------------
``huggingface_hub.constants`` reads ``HF_ENDPOINT`` once, at import time, into
``ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE``; the module-level ``HfApi`` behind
``huggingface_hub.model_info``/``list_repo_files``... copies ``ENDPOINT`` when
huggingface_hub is imported; ``HF_HUB_CACHE``/``HF_HUB_OFFLINE`` are also read at
import.  transformers has no copy of its own: it calls ``hf_hub_download`` and
``constants`` at call time.  Two correct ways:

1. a subprocess started with ``HF_ENDPOINT=<url>`` (and ``HF_HUB_CACHE``, no
   ``HF_HUB_OFFLINE``) in its environment: :meth:`OlahServer.client_env` builds it;
2. in-process, *after* import: :func:`use_endpoint` patches
   ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``,
   ``constants.HF_HUB_OFFLINE=False``, ``constants.HF_HUB_CACHE``,
   ``huggingface_hub.hf_api.api.endpoint`` and sets the env vars
   (``HF_ENDPOINT``..., ``NO_PROXY`` += 127.0.0.1) for children; with a pytest
   ``monkeypatch`` everything is undone after the test.  Setting only the env var
   after import does NOT work.  ``HfApi`` objects created earlier keep their
   endpoint; pass ``endpoint=server.url`` to them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping, Union

import pytest

OLAH_SPEC = os.environ.get("MACRL_OLAH_SPEC", "olah==0.5.4")

GIT_AUTHOR = ("macrl-tests", "macrl-tests@example.invalid")
#: 2024-01-01T00:00:00Z; commit n of a repo is dated BASE + n seconds.
GIT_BASE_EPOCH = 1704067200

_REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}

FileSource = Union[bytes, str, "os.PathLike[str]"]
RepoFiles = Union["os.PathLike[str]", str, Mapping[str, FileSource]]

__all__ = [
    "OLAH_SPEC",
    "OlahServer",
    "default_venv_dir",
    "ensure_olah",
    "hf_mirror",
    "olah_mirror",
    "olah_server",
    "use_endpoint",
]


# --------------------------------------------------------------------------- olah venv


def default_venv_dir() -> Path:
    """``$MACRL_OLAH_VENV`` or ``${XDG_CACHE_HOME:-~/.cache}/macrl-test-olah-venv``."""
    env = os.environ.get("MACRL_OLAH_VENV")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "macrl-test-olah-venv"


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_olah(venv: Union[str, os.PathLike[str], None] = None, *, spec: str = OLAH_SPEC) -> Path:
    """Return a Python interpreter that can ``-m olah.server``; build its venv if needed.

    The venv is reused when its marker file records the same ``spec``.  Creation
    (``python -m venv`` + ``pip install <spec>``, ~15 s) runs under a file lock.
    Raises ``RuntimeError`` with pip's output if the install fails.
    """
    venv = Path(venv) if venv is not None else default_venv_dir()
    python = _venv_python(venv)
    marker = venv / ".macrl-olah-spec"

    def ready() -> bool:
        return python.exists() and marker.exists() and marker.read_text().strip() == spec

    if ready():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if ready():
                return python
            if not python.exists():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            proc = subprocess.run(
                [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", spec],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"pip install {spec} into {venv} failed:\n{proc.stdout[-4000:]}")
            check = subprocess.run(
                [str(python), "-c", "import olah.server"], capture_output=True, text=True
            )
            if check.returncode != 0:
                raise RuntimeError(f"olah installed in {venv} but does not import:\n{check.stderr[-4000:]}")
            marker.write_text(spec + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return python


# --------------------------------------------------------------------------- git


def _git_env(commit_index: int = 0) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GIT_")  # e.g. GIT_DIR/GIT_INDEX_FILE of an outer repo
    }
    date = f"@{GIT_BASE_EPOCH + commit_index} +0000"
    env.update(
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        LC_ALL="C",
        GIT_AUTHOR_NAME=GIT_AUTHOR[0],
        GIT_AUTHOR_EMAIL=GIT_AUTHOR[1],
        GIT_COMMITTER_NAME=GIT_AUTHOR[0],
        GIT_COMMITTER_EMAIL=GIT_AUTHOR[1],
        GIT_AUTHOR_DATE=date,
        GIT_COMMITTER_DATE=date,
    )
    return env


def _git(repo: Path, *args: str, input: bytes | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=input,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env if env is not None else _git_env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode().strip()


def _collect_files(files: RepoFiles, staging: Path) -> dict[str, Path]:
    """Map repo paths -> local files (mapping values are written into ``staging``)."""
    out: dict[str, Path] = {}
    if isinstance(files, Mapping):
        for i, (rel, src) in enumerate(files.items()):
            rel = Path(rel).as_posix().strip("/")
            if not rel or rel.startswith("../") or "/../" in rel:
                raise ValueError(f"bad repo path {rel!r}")
            if isinstance(src, (bytes, bytearray, str)):
                path = staging / f"blob{i}"
                path.write_bytes(src.encode("utf-8") if isinstance(src, str) else bytes(src))
            else:
                path = Path(src)
                if not path.is_file():
                    raise ValueError(f"{src!r} is not a file")
            out[rel] = path
        return out
    root = Path(files)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if ".git" in rel.parts or not path.is_file():
            continue
        out[rel.as_posix()] = path
    return out


# --------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM olah if the test process dies without calling ``stop``."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class OlahServer:
    """An olah process serving git mirrors from ``<root>/mirrors`` on 127.0.0.1.

    ``root`` defaults to a fresh temp dir (removed by :meth:`stop`).  Repos can be
    added before or after :meth:`start`.
    """

    def __init__(self, root: Union[str, os.PathLike[str], None] = None, *, python: Union[str, os.PathLike[str], None] = None):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="macrl-olah-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.mirrors_dir = self.root / "mirrors"
        self.cache_dir = self.root / "cache"
        self.config_path = self.root / "olah.toml"
        self.log_path = self.root / "olah.log"
        self.mirrors_dir.mkdir(exist_ok=True)
        self.cache_dir.mkdir(exist_ok=True)
        self._python = Path(python) if python is not None else None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.port: int | None = None

    # -- repos ---------------------------------------------------------------------

    def repo_path(self, repo_id: str, repo_type: str = "model") -> Path:
        """The git mirror folder olah reads for ``repo_id``."""
        if repo_type not in _REPO_TYPES:
            raise ValueError(f"repo_type must be one of {sorted(_REPO_TYPES)}")
        parts = repo_id.split("/")
        if len(parts) not in (1, 2) or not all(parts):
            raise ValueError(f"bad repo_id {repo_id!r}")
        return self.mirrors_dir.joinpath(_REPO_TYPES[repo_type], *parts)

    def add_repo(
        self,
        repo_id: str,
        files: RepoFiles,
        *,
        branch: str = "main",
        message: str | None = None,
        tag: str | None = None,
        repo_type: str = "model",
    ) -> str:
        """Commit ``files`` as the full content of ``branch`` of ``repo_id``; return the SHA.

        ``files`` is a folder (copied recursively, ``.git`` skipped) or a mapping
        ``{"path/in/repo": bytes | str (UTF-8 text) | pathlib.Path (a local file)}``.  The
        first call creates the repo with ``branch`` as default branch; later calls
        add a commit on ``branch`` (a new branch forks from the default branch's
        tip).  The commit replaces the whole tree.  ``tag`` adds a lightweight tag.
        """
        repo = self.repo_path(repo_id, repo_type)
        if not (repo / ".git").exists():
            repo.mkdir(parents=True, exist_ok=True)
            _git(repo, "init", "-q", f"--initial-branch={branch}")
        n_commits = int(_git(repo, "rev-list", "--all", "--count") or 0)
        env = _git_env(n_commits)
        with tempfile.TemporaryDirectory(prefix="macrl-olah-stage-") as stage:
            stage = Path(stage)
            mapping = _collect_files(files, stage)
            if not mapping:
                raise ValueError("a commit needs at least one file")
            names = list(mapping)
            paths = "\n".join(str(mapping[n].resolve()) for n in names) + "\n"
            blobs = _git(repo, "hash-object", "-w", "--no-filters", "--stdin-paths", input=paths.encode(), env=env).split()
            index_info = "".join(f"100644 {sha}\t{name}\n" for sha, name in zip(blobs, names))
            env_idx = dict(env, GIT_INDEX_FILE=str(stage / "index"))
            _git(repo, "update-index", "--add", "--index-info", input=index_info.encode(), env=env_idx)
            tree = _git(repo, "write-tree", env=env_idx)
        parent = self._resolve(repo, f"refs/heads/{branch}") or self._resolve(repo, "HEAD")
        args = ["commit-tree", tree, "-m", message or f"{repo_id}: commit {n_commits + 1}"]
        if parent:
            args += ["-p", parent]
        sha = _git(repo, *args, env=env)
        _git(repo, "update-ref", f"refs/heads/{branch}", sha, env=env)
        if tag:
            _git(repo, "tag", "-f", tag, sha, env=env)
        self._seed_metadata(repo_id, repo_type)
        return sha

    def add_repos(self, repos: Mapping[str, RepoFiles]) -> dict[str, str]:
        """``add_repo`` for each ``{"org/name": files}``; returns ``{repo_id: sha}``."""
        return {repo_id: self.add_repo(repo_id, files) for repo_id, files in repos.items()}

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        """``{"main": sha, "v1": sha, ...}`` for branches and tags of a mirror repo."""
        repo = self.repo_path(repo_id, repo_type)
        out = _git(repo, "for-each-ref", "--format=%(refname)%00%(objectname)%00%(*objectname)", "refs/heads", "refs/tags")
        refs: dict[str, str] = {}
        for line in out.splitlines():
            name, obj, peeled = line.split("\0")
            short = name.split("/", 2)[2]
            refs[short] = peeled or obj
        return refs

    @staticmethod
    def _resolve(repo: Path, rev: str) -> str | None:
        proc = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "-q", "--verify", rev + "^{commit}"],
            capture_output=True, env=_git_env(),
        )
        return proc.stdout.decode().strip() or None

    def _seed_metadata(self, repo_id: str, repo_type: str) -> None:
        """Write olah's offline lookups (see module docstring, *metadata seeding*)."""
        repo = self.repo_path(repo_id, repo_type)
        base = self.cache_dir.joinpath("api", _REPO_TYPES[repo_type], *repo_id.split("/"))
        shutil.rmtree(base, ignore_errors=True)
        now = time.time()
        for ref, sha in self.refs(repo_id, repo_type).items():
            path = base / "revision" / ref / "resolved_commit.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"status_code": 200, "headers": {}, "cached_at": now}))
            Path(str(path) + ".body").write_bytes(sha.encode("ascii"))
        head = self._resolve(repo, "HEAD")
        if head:
            stamp = _git(repo, "show", "-s", "--format=%ct", head)
            last_modified = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(int(stamp)))
            path = base / "revision" / head / "meta_head.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"sha": head, "lastModified": last_modified}))

    # -- process ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("olah server not started")
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, port: int) -> Path:
        netloc = f"127.0.0.1:{port}"
        self.config_path.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f"repos-path = {_toml_str(str(self.cache_dir))}\n"
            f"mirrors-path = [{_toml_str(str(self.mirrors_dir))}]\n"
            'hf-scheme = "http"\n'
            'hf-netloc = "127.0.0.1:9"\n'
            'hf-lfs-netloc = "127.0.0.1:9"\n'
            f'mirror-netloc = "{netloc}"\n'
            f'mirror-lfs-netloc = "{netloc}"\n'
            "metadata-cache-ttl = 0\n"
            "\n[accessibility]\n"
            "offline = true\n"
        )
        return self.config_path

    def start(self, timeout: float = 60.0) -> str:
        """Start olah (building its venv if needed), wait until it answers; return the URL."""
        if self._proc is not None:
            return self.url
        python = self._python or ensure_olah()
        last_error = ""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            port = _free_port()
            self.write_config(port)
            self._log = open(self.log_path, "ab")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OLAH_"))}
            env["PYTHONUNBUFFERED"] = "1"
            self._proc = subprocess.Popen(
                [str(python), "-m", "olah.server", "--config", str(self.config_path),
                 "--log-path", str(self.root / "logs")],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            self.port = port
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if self._answers():
                    return self.url
                time.sleep(0.1)
            last_error = self.log_tail()
            self.stop(remove_root=False)
        raise RuntimeError(f"olah did not start; log:\n{last_error}")

    def _answers(self) -> bool:
        # olah's "/" page is broken with starlette 1.x (TemplateResponse TypeError ->
        # 500), so probe an API route: any HTTP answer (here 401 RepoNotFound) = up.
        try:
            with _NO_PROXY_OPENER.open(f"{self.url}/api/models/macrl-olah/readiness-probe/revision/main", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, remove_root: bool | None = None) -> None:
        """Terminate olah (SIGTERM, then SIGKILL after 10 s); remove an owned temp root."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self.port = None
        if remove_root if remove_root is not None else self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "OlahServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------

    def client_env(self, cache_dir: Union[str, os.PathLike[str]], base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a *subprocess* client (HF_ENDPOINT is read at import)."""
        env = dict(os.environ if base is None else base)
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            env.pop(key, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HUB_CACHE=str(cache_dir),
            HF_HUB_DISABLE_TELEMETRY="1",
            NO_PROXY=_no_proxy(env.get("NO_PROXY")),
            no_proxy=_no_proxy(env.get("no_proxy")),
        )
        return env


def _no_proxy(current: str | None) -> str:
    hosts = [h for h in (current or "").split(",") if h]
    for host in ("127.0.0.1", "localhost"):
        if host not in hosts:
            hosts.append(host)
    return ",".join(hosts)


def use_endpoint(url: str, cache_dir: Union[str, os.PathLike[str]], monkeypatch: "pytest.MonkeyPatch | None" = None) -> None:
    """Point the already-imported huggingface_hub (and so transformers) at ``url``.

    Patches the import-time constants listed in the module docstring.  With a
    ``monkeypatch`` all changes are undone at teardown; without one they stay.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api

    mp = monkeypatch
    setattr_ = mp.setattr if mp is not None else setattr

    def setenv(key: str, value: str) -> None:
        if mp is not None:
            mp.setenv(key, value)
        else:
            os.environ[key] = value

    url = url.rstrip("/")
    setattr_(constants, "ENDPOINT", url)
    setattr_(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    setattr_(constants, "HF_HUB_OFFLINE", False)
    setattr_(constants, "HF_HUB_CACHE", str(cache_dir))
    setattr_(hf_api.api, "endpoint", url)
    setenv("HF_ENDPOINT", url)
    setenv("HF_HUB_CACHE", str(cache_dir))
    setenv("NO_PROXY", _no_proxy(os.environ.get("NO_PROXY")))
    setenv("no_proxy", _no_proxy(os.environ.get("no_proxy")))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if mp is not None:
            mp.delenv(key, raising=False)
        else:
            os.environ.pop(key, None)


@contextlib.contextmanager
def olah_mirror(
    repos: Mapping[str, RepoFiles] | None = None,
    root: Union[str, os.PathLike[str], None] = None,
) -> Iterator[OlahServer]:
    """Build git mirrors for ``{"org/name": folder_or_mapping}``, run olah, yield the server.

    ``server.url`` is the endpoint; ``server.add_repo`` adds more repos later.
    """
    server = OlahServer(root)
    try:
        if repos:
            server.add_repos(repos)
        server.start()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def olah_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OlahServer]:
    """One olah server for the session (empty; tests add repos with ``add_repo``)."""
    with olah_mirror(root=tmp_path_factory.mktemp("olah")) as server:
        yield server


@pytest.fixture
def hf_mirror(olah_server: OlahServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[OlahServer]:
    """``olah_server`` + this process's huggingface_hub pointed at it, fresh HF cache."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    use_endpoint(olah_server.url, cache, monkeypatch)
    yield olah_server
