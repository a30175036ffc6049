"""Pushing a saved model folder to the Hugging Face Hub (timm's `push_to_hf_hub` pattern).

`push_folder` uploads a folder as it is (weights, config, code files, image processor, README.md), with two guards:
pickled weights are never uploaded, and a README.md already in the repository is never replaced unless asked, so a
card edited on the Hub survives a re-push. `push_encoder_to_hub` checks first that the folder is a saved MACRL model.
Hub failures become a `HubPushError` that says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open

from .errors import MACRLError

# the HTTP client huggingface_hub talks through: httpx2 from its 2.x, httpx in 1.x (where httpx2 may be installed too,
# by something else, so what is importable does not say which one the Hub calls raise from)
from huggingface_hub.utils import _http as _hub_http

HTTP = getattr(_hub_http, "httpx2", None) or _hub_http.httpx
TransportError = HTTP.TransportError

REQUIRED_FILES = ("config.json", "model.safetensors")
# pickled checkpoints can run code when loaded: whatever else the folder holds, they stay local
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]
LOCAL_CACHE_PATTERNS = ["__pycache__/*", "*.pyc"]


class HubPushError(MACRLError, RuntimeError):
    """A push to the Hub failed; the message names the repository and what to do, `__cause__` is the Hub error."""


def validate_model_folder(folder: str | Path) -> Path:
    """Check that `folder` holds a config.json and safetensors weights (`model.safetensors`).

    Raises `FileNotFoundError` naming the folder and the missing file. Returns the folder as a `Path`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory: save the model there with save_pretrained() first")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} has no {name}: save the model with save_pretrained() "
                "(safetensors weights, never pickles) before pushing"
            )
    return folder


def validate_encoder_folder(folder: str | Path) -> Path:
    """Check that `folder` is a saved MACRL model: config.json with model_type "macrl" and model.safetensors.

    Raises `FileNotFoundError` for a missing folder or file and `ValueError` for a wrong or unreadable one, each
    naming the folder and the file. Returns the folder as a `Path`.
    """
    folder = validate_model_folder(folder)
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{folder / 'config.json'} is not a JSON object: {error}") from error
    if model_type != "macrl":
        raise ValueError(f"{folder / 'config.json'} has model_type {model_type!r}, expected 'macrl'")
    try:  # reads only the header: catches a truncated or non-safetensors file before uploading it
        with safe_open(folder / "model.safetensors", framework="pt") as weights:
            weights.keys()
    except Exception as error:
        raise ValueError(f"{folder / 'model.safetensors'} is not a readable safetensors file: {error}") from error
    return folder


def _explain(error: Exception, repo_id: str, endpoint: str, revision: str | None) -> str:
    """A message for a failed push of `repo_id` that says what went wrong and what to do about it."""
    if isinstance(error, OfflineModeIsEnabled):
        return f"Cannot push {repo_id}: HF_HUB_OFFLINE is set. Unset it to reach the Hub at {endpoint}."
    if isinstance(error, (TransportError, ConnectionError, TimeoutError)):
        return (
            f"Cannot reach the Hub at {endpoint} to push {repo_id} ({type(error).__name__}: {error}). Check the "
            "network, or set HF_ENDPOINT to the Hub's URL (huggingface_hub reads it when it is imported)."
        )
    if isinstance(error, LocalTokenNotFoundError):
        return f"No Hub token to push {repo_id}: log in with `hf auth login` or set HF_TOKEN."
    if isinstance(error, RevisionNotFoundError):
        return (
            f"Branch {revision!r} does not exist in {repo_id} on {endpoint}: create it with "
            f"HfApi().create_branch({repo_id!r}, branch={revision!r}), or push without `revision`."
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"Repository {repo_id} was not found on {endpoint}, or your token cannot see it: check the repo id and "
            "that HF_TOKEN (or `hf auth login`) holds a token with write access to its namespace."
        )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return (
            f"The Hub at {endpoint} refused to let you push {repo_id} (HTTP {status}): the token is missing, "
            "invalid or has no write access to the namespace. Log in with `hf auth login` or set HF_TOKEN to a "
            "write token."
        )
    return f"Pushing {repo_id} to {endpoint} failed: {error}"


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload model",
    overwrite_readme: bool = False,
    create_pr: bool = False,
) -> str:
    """Upload a saved model folder (config.json + model.safetensors) to the Hub repository `repo_id` (created if
    needed); local files are only read, pickles are left out.

    Args:
        folder: a `save_pretrained` folder.
        repo_id: `namespace/name` of the model repository.
        private: create the repository as private (an existing repository keeps its visibility).
        token: a Hub token; by default HF_TOKEN or the one saved by `hf auth login`.
        revision: the branch to commit to (it must exist); the default branch if None.
        commit_message: the commit title.
        overwrite_readme: replace a README.md that the repository already has. Otherwise the local README.md
            is uploaded only to a repository without one.
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        The URL of the commit (or of the pull request with `create_pr=True`).

    Raises:
        FileNotFoundError: the folder is not a saved model (checked before any network call).
        HubPushError: the Hub could not be reached or refused the push; the Hub error is its `__cause__`.
    """
    folder = validate_model_folder(folder)
    validate_repo_id(repo_id)  # a malformed id fails here, not as a puzzling HTTP error
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
        ignore_patterns = PICKLE_PATTERNS + LOCAL_CACHE_PATTERNS
        if not overwrite_readme and api.file_exists(repo_id, "README.md", revision=revision, token=token):
            ignore_patterns.append("README.md")  # the card on the Hub may have been edited there: keep it
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            ignore_patterns=ignore_patterns,
            token=token,
        )
    except (HfHubHTTPError, LocalTokenNotFoundError, TransportError, ConnectionError, TimeoutError) as error:
        raise HubPushError(_explain(error, repo_id, api.endpoint, revision)) from error
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url


def push_encoder_to_hub(folder: str | Path, repo_id: str, *, commit_message: str = "Upload MACRL encoder", **kwargs) -> str:
    """`push_folder` of a saved MACRL encoder folder, checked first with `validate_encoder_folder` (`ValueError` for
    a folder of another model or unreadable weights); the keyword arguments are `push_folder`'s."""
    return push_folder(validate_encoder_folder(folder), repo_id, commit_message=commit_message, **kwargs)


def repo_has_readme(repo_id: str, *, token: str | None = None, revision: str | None = None) -> bool:
    """Whether the Hub repository `repo_id` exists and has a README.md (a missing repository has none)."""
    api = HfApi(token=token)
    try:
        return api.file_exists(repo_id, "README.md", revision=revision, token=token)
    except (HfHubHTTPError, LocalTokenNotFoundError, TransportError, ConnectionError, TimeoutError) as error:
        raise HubPushError(_explain(error, repo_id, api.endpoint, revision)) from error


__all__ = [
    "HubPushError",
    "push_encoder_to_hub",
    "push_folder",
    "repo_has_readme",
    "validate_encoder_folder",
    "validate_model_folder",
]
