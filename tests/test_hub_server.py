"""End-to-end tests of the test Hub server (tests/hub_server.py) through the real huggingface_hub client."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from macrl.hub import HTTP

from tests.hub_server import GITATTRIBUTES, git_oid, serve_hub

REPO = "org/tiny-model"
FILES = {
    "config.json": b'{"hidden_size": 8}\n',
    "README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n",
    "model.bin": bytes(range(256)) * 4 + b"\x00\xff" * 100,  # binary, incl. NUL bytes
    "sub/nested/notes.txt": "héllo wörld\n".encode(),
    "sub/empty.txt": b"",
    "sub/ünï côde #1.txt": b"quoted path",
}


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _tree_bytes(root: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


@pytest.fixture
def repo(hub_server, tmp_path):
    """A repo with FILES uploaded in one commit; returns (api, first commit sha)."""
    api = HfApi()  # no explicit endpoint: relies on the fixture's patching of constants.ENDPOINT
    api.create_repo(REPO)
    info = api.upload_folder(folder_path=_write_folder(tmp_path / "src", FILES), repo_id=REPO, commit_message="v1")
    return api, info.oid


def test_create_repo_conflict_and_exist_ok(hub_server):
    api = HfApi()
    url = api.create_repo("org/a", private=False)
    assert url == f"{hub_server.url}/org/a" and url.repo_id == "org/a"
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("org/a")
    assert excinfo.value.response.status_code == 409
    assert api.create_repo("org/a", exist_ok=True).repo_id == "org/a"
    assert api.list_repo_files("org/a") == [".gitattributes"]  # like the real Hub: one initial commit
    with pytest.raises(HfHubHTTPError) as excinfo:  # writes need a token
        api.create_repo("org/b", token=False)
    assert excinfo.value.response.status_code == 401


@pytest.mark.parametrize("xet_installed", [True, False], ids=["pipelined-upload", "legacy-create-commit"])
def test_upload_folder_then_download_bit_identical(hub_server, tmp_path, monkeypatch, xet_installed):
    # With hf_xet installed, upload_folder goes through _upload_pipeline; otherwise through create_commit.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet_installed)
    api = HfApi()
    api.create_repo(REPO)
    info = api.upload_folder(folder_path=_write_folder(tmp_path / "src", FILES), repo_id=REPO)
    assert len(info.oid) == 40 and info.oid == api.model_info(REPO).sha
    assert info.repo_url.repo_id == REPO

    for rel, data in FILES.items():
        assert Path(hf_hub_download(REPO, rel)).read_bytes() == data
    snapshot = snapshot_download(REPO, cache_dir=tmp_path / "other_cache")
    assert Path(snapshot).name == info.oid
    assert _tree_bytes(snapshot) == {**FILES, ".gitattributes": GITATTRIBUTES}
    assert ("POST", "/api/models/org/tiny-model/commit/main") in hub_server.requests
    if not xet_installed:  # create_commit validates README.md metadata first
        assert ("POST", "/api/validate-yaml") in hub_server.requests


def test_second_commit_new_sha_and_revision_pinning(repo, tmp_path):
    api, first = repo
    second = api.upload_file(path_or_fileobj=b'{"hidden_size": 16}\n', path_in_repo="config.json", repo_id=REPO)
    assert second.oid != first and api.repo_info(REPO).sha == second.oid

    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == b'{"hidden_size": 16}\n'
    old = hf_hub_download(REPO, "config.json", revision=first)
    assert Path(old).read_bytes() == FILES["config.json"] and f"/snapshots/{first}/" in Path(old).as_posix()
    pinned = snapshot_download(REPO, revision=first, cache_dir=tmp_path / "pinned")
    assert Path(pinned, "config.json").read_bytes() == FILES["config.json"]
    assert api.model_info(REPO, revision=first).sha == first

    third = api.create_commit(REPO, operations=[CommitOperationDelete("sub/")], commit_message="rm sub")
    assert api.list_repo_files(REPO) == [".gitattributes", "README.md", "config.json", "model.bin"]
    assert "sub/nested/notes.txt" in api.list_repo_files(REPO, revision=first)
    assert not api.file_exists(REPO, "sub/empty.txt") and api.file_exists(REPO, "sub/empty.txt", revision=first)

    # Unchanged content: the preupload "oid" lets the client skip the commit entirely (no new sha).
    same = api.create_commit(REPO, [CommitOperationAdd("model.bin", FILES["model.bin"])], commit_message="noop")
    assert same.oid == third.oid


def test_list_repo_tree_files_and_file_exists(repo):
    api, _ = repo
    assert api.list_repo_files(REPO) == sorted([".gitattributes", *FILES])
    top = {(type(e).__name__, e.path) for e in api.list_repo_tree(REPO)}
    assert ("RepoFolder", "sub") in top and ("RepoFile", "model.bin") in top and len(top) == 5
    sub = {e.path: e for e in api.list_repo_tree(REPO, path_in_repo="sub")}
    assert set(sub) == {"sub/nested", "sub/empty.txt", "sub/ünï côde #1.txt"} and sub["sub/empty.txt"].size == 0
    assert sub["sub/empty.txt"].blob_id == git_oid(b"")
    assert api.file_exists(REPO, "sub/nested/notes.txt") and not api.file_exists(REPO, "nope.txt")
    assert not api.file_exists("org/missing", "config.json")
    siblings = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert siblings["model.bin"].size == len(FILES["model.bin"])
    assert huggingface_hub.model_info(REPO).id == REPO  # module-level helpers are patched too


def test_missing_repo_file_and_revision_raise_specific_errors(repo):
    api, _ = repo
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing 日本.bin")
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="no/such/dir"))
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):  # datasets are not served
        api.dataset_info("org/tiny-model")


def test_resolve_headers_and_range_requests(repo):
    _, sha = repo
    url = f"{constants.ENDPOINT}/{REPO}/resolve/main/model.bin"
    data = FILES["model.bin"]
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
        assert r.status == 200 and r.read() == b""
        assert r.headers["ETag"] == f'"{git_oid(data)}"' and r.headers["X-Repo-Commit"] == sha
        assert int(r.headers["Content-Length"]) == len(data)
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-"})) as r:
        assert r.status == 206 and r.read() == data[10:]
        assert r.headers["Content-Range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=-5"})) as r:
        assert r.read() == data[-5:]
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={len(data)}-"}))
    assert excinfo.value.code == 416
    excinfo.value.close()


def test_private_repo_needs_token(hub_server, tmp_path):
    api = HfApi()
    api.create_repo("org/secret", private=True)
    api.upload_file(path_or_fileobj=b"s3cr3t", path_in_repo="weights.bin", repo_id="org/secret")
    assert api.model_info("org/secret").private is True

    with pytest.raises(RepositoryNotFoundError) as excinfo:
        api.model_info("org/secret", token=False)
    assert excinfo.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/secret", "weights.bin", token=False, cache_dir=tmp_path / "anon")
    assert not api.file_exists("org/secret", "weights.bin", token=False)
    assert Path(hf_hub_download("org/secret", "weights.bin", cache_dir=tmp_path / "auth")).read_bytes() == b"s3cr3t"


def test_explicit_endpoint_and_restricted_tokens(tmp_path):
    """Without the fixture: pass endpoint= explicitly; only tokens in `tokens` are accepted."""
    with serve_hub(tokens={"good"}) as hub:
        good, bad = HfApi(endpoint=hub.url, token="good"), HfApi(endpoint=hub.url, token="bad")
        assert good.whoami()["name"] == "tester"
        with pytest.raises(HfHubHTTPError) as excinfo:
            bad.whoami()
        assert excinfo.value.response.status_code == 401
        good.create_repo("org/p", private=True)
        good.upload_file(path_or_fileobj=b"x", path_in_repo="f.txt", repo_id="org/p")
        with pytest.raises(HfHubHTTPError) as excinfo:  # invalid token is an auth error, not "repo not found"
            bad.model_info("org/p")
        assert excinfo.value.response.status_code == 401 and not isinstance(excinfo.value, RepositoryNotFoundError)
        path = hf_hub_download("org/p", "f.txt", endpoint=hub.url, token="good", cache_dir=tmp_path)
        assert Path(path).read_bytes() == b"x"


def test_fault_injection_and_recovery(repo, hub_server):
    api, sha = repo
    # model_info does not retry: one injected 500 fails the call, the next one succeeds.
    hub_server.fail_next(1, status=500, path_contains="/api/models/")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.model_info(REPO)
    assert excinfo.value.response.status_code == 500
    assert api.model_info(REPO).sha == sha

    # The file GET is not retried on 5xx either (HEAD is fine, GET fails) -> error, then success.
    hub_server.fail_next(1, status=503, path_contains="/resolve/main/model.bin", method="GET")
    with pytest.raises(HfHubHTTPError) as excinfo:
        hf_hub_download(REPO, "model.bin")
    assert excinfo.value.response.status_code == 503
    assert Path(hf_hub_download(REPO, "model.bin")).read_bytes() == FILES["model.bin"]

    # A failed metadata HEAD is retried once more by hf_hub_download (no sleep before the first retry).
    hub_server.fail_next(1, status=500, path_contains="/resolve/main/config.json")
    before = len(hub_server.requests)
    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == FILES["config.json"]
    heads = [r for r in hub_server.requests[before:] if r[0] == "HEAD"]
    assert len(heads) == 2

    # Hub gone: calls fail with a connection error, cached files are still served from the cache.
    hub_server.stop()
    with pytest.raises(HTTP.ConnectError):
        api.model_info(REPO)
    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == FILES["config.json"]
    assert os.environ["HF_ENDPOINT"] == hub_server.url
