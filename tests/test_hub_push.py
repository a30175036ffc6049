"""Pushing encoder folders with `macrl.hub.push_encoder_to_hub`, against the loopback Hub of tests/hub_server.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

from macrl.hub import HTTP, HubPushError, push_encoder_to_hub

from tests.hub_server import patch_hf_client, serve_hub
from tests.tiny_models import save_tiny_encoder

REPO_ID = "tester/macrl-encoder"
PICKLE = "optimizer.pt"  # a pickled training state lying in the folder: it must never be uploaded


def _tree_bytes(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _tree_state(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file: what "local files stay untouched" compares."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def encoder_folder(tmp_path, tiny_config) -> Path:
    """A saved tiny encoder with its image processor, model card and a stray pickle."""
    folder = tmp_path / "encoder"
    save_tiny_encoder(folder, card_repo_id=REPO_ID)
    torch.save({"step": 1}, folder / PICKLE)
    return folder


def test_push_then_download_is_byte_identical(hub_server, encoder_folder):
    before = _tree_state(encoder_folder)
    url = push_encoder_to_hub(encoder_folder, REPO_ID)
    assert url.startswith(f"{hub_server.url}/{REPO_ID}/commit/")
    downloaded = _tree_bytes(snapshot_download(REPO_ID))
    local = {path: data for path, (data, _) in before.items() if path != PICKLE}
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json"} <= set(local)
    assert {path: data for path, data in downloaded.items() if path != ".gitattributes"} == local
    assert _tree_state(encoder_folder) == before


def test_second_push_keeps_a_readme_edited_on_the_hub(hub_server, encoder_folder):
    api = HfApi()
    first = push_encoder_to_hub(encoder_folder, REPO_ID)
    edited = b"---\nlicense: apache-2.0\n---\n# Edited on the Hub\n"
    api.upload_file(path_or_fileobj=edited, path_in_repo="README.md", repo_id=REPO_ID)
    (encoder_folder / "notes.txt").write_text("second push")  # shows that the second push did commit
    (encoder_folder / "README.md").write_text("# regenerated locally\n")
    before = _tree_state(encoder_folder)

    second = push_encoder_to_hub(encoder_folder, REPO_ID, commit_message="Second push")
    assert second != first and second.rsplit("/", 1)[1] == api.model_info(REPO_ID).sha
    assert Path(hf_hub_download(REPO_ID, "README.md")).read_bytes() == edited
    assert Path(hf_hub_download(REPO_ID, "notes.txt")).read_text() == "second push"

    push_encoder_to_hub(encoder_folder, REPO_ID, overwrite_readme=True)
    assert Path(hf_hub_download(REPO_ID, "README.md")).read_text() == "# regenerated locally\n"
    assert _tree_state(encoder_folder) == before


def test_invalid_folders_fail_before_any_network_call(hub_server, encoder_folder, tmp_path):
    before = _tree_state(encoder_folder)
    (encoder_folder / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"{encoder_folder}.*model\.safetensors"):
        push_encoder_to_hub(encoder_folder, REPO_ID)
    (tmp_path / "weights.safetensors").rename(encoder_folder / "model.safetensors")

    config = json.loads((encoder_folder / "config.json").read_text())
    (encoder_folder / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(ValueError, match=r"config\.json has model_type 'vit', expected 'macrl'"):
        push_encoder_to_hub(encoder_folder, REPO_ID)
    (encoder_folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{encoder_folder} has no config\.json"):
        push_encoder_to_hub(encoder_folder, REPO_ID)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        push_encoder_to_hub(tmp_path / "missing", REPO_ID)

    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "config.json").write_text(json.dumps(config))
    (tmp_path / "truncated" / "model.safetensors").write_bytes(before["model.safetensors"][0][:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        push_encoder_to_hub(tmp_path / "truncated", REPO_ID)
    assert hub_server.requests == [] and hub_server.repos == {}


def test_unreachable_hub_names_the_endpoint(hub_server, encoder_folder):
    before = _tree_state(encoder_folder)
    hub_server.stop()
    with pytest.raises(HubPushError, match="HF_ENDPOINT") as failure:
        push_encoder_to_hub(encoder_folder, REPO_ID)
    assert f"Cannot reach the Hub at {hub_server.url} to push {REPO_ID}" in str(failure.value)
    assert isinstance(failure.value.__cause__, HTTP.TransportError)
    assert _tree_state(encoder_folder) == before


def test_private_repo_needs_the_token(hub_server, encoder_folder, tmp_path):
    push_encoder_to_hub(encoder_folder, REPO_ID, private=True)
    assert HfApi().model_info(REPO_ID).private is True
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO_ID, token=False, cache_dir=tmp_path / "anonymous")
    folder = snapshot_download(REPO_ID, cache_dir=tmp_path / "with_token")  # HF_TOKEN, set by the fixture
    assert Path(folder, "model.safetensors").read_bytes() == (encoder_folder / "model.safetensors").read_bytes()


def test_rejected_token_says_how_to_log_in(monkeypatch, encoder_folder, tmp_path):
    with serve_hub(tokens={"hf_writer"}) as hub:
        patch_hf_client(monkeypatch, hub.url, tmp_path / "cache")  # sends HF_TOKEN=hf_test_token: not accepted
        with pytest.raises(HubPushError, match=r"HTTP 401.*`hf auth login`.*HF_TOKEN") as failure:
            push_encoder_to_hub(encoder_folder, REPO_ID)
        assert REPO_ID in str(failure.value) and failure.value.__cause__.response.status_code == 401
        assert push_encoder_to_hub(encoder_folder, REPO_ID, token="hf_writer").startswith(hub.url)


def test_missing_branch_and_deleted_repo_are_explained(hub_server, encoder_folder, monkeypatch):
    push_encoder_to_hub(encoder_folder, REPO_ID)
    with pytest.raises(HubPushError, match=r"Branch 'no-such-branch' does not exist.*create_branch"):
        push_encoder_to_hub(encoder_folder, REPO_ID, revision="no-such-branch")

    create_repo = HfApi.create_repo

    def create_then_lose_the_repo(self, repo_id, **kwargs):  # as if someone deleted it in between
        url = create_repo(self, repo_id, **kwargs)
        self.delete_repo(repo_id)
        return url

    monkeypatch.setattr(HfApi, "create_repo", create_then_lose_the_repo)
    with pytest.raises(HubPushError, match=rf"Repository {REPO_ID} was not found on {hub_server.url}") as failure:
        push_encoder_to_hub(encoder_folder, REPO_ID)
    assert isinstance(failure.value.__cause__, RepositoryNotFoundError)
