"""Hub faults: a push that meets HTTP 500s or a Hub that dies, and downloads cut off in the middle of a file.

The loopback Hub of tests/hub_server.py, with two test-only additions made here (a subclass, not an edit): clearing
the injected faults, and cutting the body of file downloads short. huggingface_hub's retry sleeps (1, 2, 4, 8, 8 s)
are recorded instead of slept, so the tests are fast and report how long a user would have waited.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from macrl import MACRLModel
from macrl.hub import HTTP, HubPushError, push_encoder_to_hub

from tests import hub_server
from tests.tiny_models import save_tiny_encoder

REPO_ID = "tester/macrl-faults"
MAX_SECONDS = 20  # a failing push must give up within this (sleeps included)


class _CuttingHandler(hub_server._Handler):
    """Sends only part of a file download's body (with the full Content-Length), then closes the connection."""

    def _send(self, status, body, headers):
        fraction = self.server.take_cut(self.command, self.path) if status in (200, 206) else None
        if fraction is None:
            return super()._send(status, body, headers)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: int(len(body) * fraction)])
        self.wfile.flush()
        self.close_connection = True


class FaultyHub(hub_server.HubServer):
    def __init__(self, port: int = 0):
        super().__init__(port=port)
        self.RequestHandlerClass = _CuttingHandler
        self._cuts: list[list] = []  # [remaining, fraction, path_contains]

    def cut_downloads(self, n: int, fraction: float, path_contains: str = "/resolve/") -> None:
        """The next `n` GETs of a file send only `fraction` of the bytes they announce."""
        with self.lock:
            self._cuts.append([n, fraction, path_contains])

    def take_cut(self, method: str, path: str) -> float | None:
        if method != "GET" or "/resolve/" not in path:
            return None
        with self.lock:
            for cut in self._cuts:
                if cut[0] > 0 and cut[2] in path:
                    cut[0] -= 1
                    return cut[1]
        return None

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()
            self._cuts.clear()

    def count(self, method: str, path_contains: str) -> int:
        return sum(1 for m, p in self.requests if m == method and path_contains in p)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """huggingface_hub's retry sleeps, recorded instead of slept."""
    slept: list[float] = []
    fake = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    fake.sleep = slept.append
    from huggingface_hub import file_download, hf_api
    from huggingface_hub.utils import _http

    for module in (_http, file_download, hf_api):
        monkeypatch.setattr(module, "time", fake)
    return slept


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = FaultyHub().start()
    hub_server.patch_hf_client(monkeypatch, server.url, tmp_path / "hf_cache")
    yield server
    server.stop()
    module = sys.modules.get("transformers.utils.hub")  # don't leak an HfApi that points at this server
    if getattr(getattr(module, "_hf_api", None), "endpoint", None) == server.url:
        module._hf_api = None


@pytest.fixture
def encoder_folder(tmp_path) -> Path:
    """A tiny encoder with its model card, which the test may change."""
    save_tiny_encoder(tmp_path / "encoder", card_repo_id=REPO_ID)
    return tmp_path / "encoder"


def _state(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _hub_files(hub: FaultyHub) -> dict[str, bytes] | None:
    repo = hub.repos.get(REPO_ID)
    return None if repo is None else dict(repo.commits[repo.refs["main"]].files)


def _assert_pushed(folder: Path, cache: Path) -> None:
    downloaded = Path(snapshot_download(REPO_ID, cache_dir=cache))
    for path in folder.rglob("*"):
        if path.is_file():
            assert (downloaded / path.relative_to(folder)).read_bytes() == path.read_bytes(), path


@pytest.mark.parametrize(
    "method, path, retried",
    [
        ("POST", "/api/repos/create", False),  # create_repo: not retried
        ("HEAD", "/resolve/main/README.md", False),  # is there a card on the Hub already? not retried
        ("POST", "/preupload/", True),  # upload_folder's first step: retried 5 times
        ("POST", "/commit/", True),  # the commit (one request: all files or none): retried 5 times
    ],
)
def test_push_meeting_500s_fails_cleanly_and_a_later_push_succeeds(
    hub, sleeps, encoder_folder, tmp_path, method, path, retried
):
    push_encoder_to_hub(encoder_folder, REPO_ID)  # a first, good version on the Hub
    (encoder_folder / "notes.txt").write_text("second version")
    local, on_hub = _state(encoder_folder), _hub_files(hub)

    hub.fail_next(1000, status=500, path_contains=path, method=method)
    before = hub.count(method, path)
    started = time.monotonic()
    with pytest.raises(HubPushError, match=rf"Pushing {REPO_ID} to {hub.url} failed.*500") as failure:
        push_encoder_to_hub(encoder_folder, REPO_ID)
    elapsed = time.monotonic() - started
    attempts = hub.count(method, path) - before
    print(f"500 on {method} {path}: HubPushError after {attempts} attempts, {elapsed:.2f} s here "
          f"+ {sum(sleeps):.0f} s of retry sleeps {sleeps}")
    assert isinstance(failure.value.__cause__, HfHubHTTPError), repr(failure.value.__cause__)
    assert (attempts == 6 and sleeps == [1, 2, 4, 8, 8]) if retried else (attempts == 1 and sleeps == [])
    assert elapsed + sum(sleeps) < MAX_SECONDS + 10 and elapsed < MAX_SECONDS
    assert _state(encoder_folder) == local  # local files only read
    assert _hub_files(hub) == on_hub  # no partial commit: the Hub still has the first version, whole

    hub.clear_faults()
    push_encoder_to_hub(encoder_folder, REPO_ID)
    _assert_pushed(encoder_folder, tmp_path / "download")


def test_hub_dying_mid_push_then_coming_back(hub, sleeps, encoder_folder, tmp_path, monkeypatch):
    """The Hub goes away after the repo was created (between create_repo and the upload); it comes back later on
    the same address with the same repos, and the push is simply run again."""
    local = _state(encoder_folder)
    upload_folder = HfApi.upload_folder

    def die_then_upload(self, *args, **kwargs):
        hub.stop()
        return upload_folder(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "upload_folder", die_then_upload)
    started = time.monotonic()
    with pytest.raises(HubPushError, match=rf"Cannot reach the Hub at {hub.url} to push {REPO_ID}"):
        push_encoder_to_hub(encoder_folder, REPO_ID)
    elapsed = time.monotonic() - started
    print(f"Hub gone mid-push: HubPushError after {elapsed:.2f} s here + {sum(sleeps):.0f} s of retry sleeps {sleeps}")
    assert elapsed < MAX_SECONDS and sum(sleeps) <= 23  # bounded: 5 retries at most
    assert _state(encoder_folder) == local
    assert list(hub.repos[REPO_ID].commits.values())[-1].title == "initial commit"  # nothing half-committed

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    port = int(hub.url.rsplit(":", 1)[1])
    revived = FaultyHub(port=port)
    revived.repos = hub.repos  # the same Hub, back on the same address
    revived.start()
    try:
        url = push_encoder_to_hub(encoder_folder, REPO_ID)
        assert url.startswith(f"{hub.url}/{REPO_ID}/commit/")
        _assert_pushed(encoder_folder, tmp_path / "download")
    finally:
        revived.stop()


@pytest.fixture
def pushed(hub, encoder_folder) -> Path:
    push_encoder_to_hub(encoder_folder, REPO_ID)
    return encoder_folder


def test_download_cut_mid_file_is_resumed_with_the_right_bytes(hub, sleeps, pushed, tmp_path):
    expected = (pushed / "model.safetensors").read_bytes()
    hub.cut_downloads(1, fraction=0.5, path_contains="model.safetensors")
    path = hf_hub_download(REPO_ID, "model.safetensors", cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == expected
    assert hub.count("GET", "model.safetensors") == 2  # the cut GET, then one that resumed where it stopped


@pytest.mark.parametrize("fault", ["cut", "500"])
def test_failed_download_leaves_nothing_a_later_load_would_use(hub, sleeps, pushed, tmp_path, fault):
    cache = tmp_path / "cache"
    if fault == "cut":  # every GET of the weights stops after 0 bytes: the resumes make no progress either
        hub.cut_downloads(1000, fraction=0.0, path_contains="model.safetensors")
        failure_types = (HTTP.RemoteProtocolError,)  # a body cut short, after 5 resumes without progress
    else:
        hub.fail_next(1000, status=500, path_contains="model.safetensors", method="GET")
        failure_types = (HfHubHTTPError,)
    started = time.monotonic()
    with pytest.raises(Exception) as failure:
        hf_hub_download(REPO_ID, "model.safetensors", cache_dir=cache)
    elapsed = time.monotonic() - started
    print(f"download ({fault}) failed with {type(failure.value).__name__} after "
          f"{hub.count('GET', 'model.safetensors')} GETs, {elapsed:.2f} s + {sum(sleeps):.0f} s of sleeps")
    assert isinstance(failure.value, failure_types), repr(failure.value)
    assert elapsed < MAX_SECONDS
    with pytest.raises(LocalEntryNotFoundError):  # nothing usable in the cache: no snapshot file, no blob
        hf_hub_download(REPO_ID, "model.safetensors", cache_dir=cache, local_files_only=True)
    assert not [p for p in cache.rglob("model.safetensors")]

    hub.clear_faults()
    loaded = MACRLModel.from_pretrained(REPO_ID, cache_dir=cache)
    original = MACRLModel.from_pretrained(pushed)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    cached = hf_hub_download(REPO_ID, "model.safetensors", cache_dir=cache, local_files_only=True)
    assert Path(cached).read_bytes() == (pushed / "model.safetensors").read_bytes()
