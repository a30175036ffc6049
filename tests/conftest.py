"""Shared fixtures: tiny MACRL configs and real Fashion-MNIST images (Debian's dataset-fashion-mnist)."""

import os
import tempfile

# Tests only talk to Hub servers on loopback, and must not wait for an interactive trust_remote_code prompt
# (set before huggingface_hub is imported, which reads them once).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRUST_REMOTE_CODE_TIMEOUT", "0")
# what the package keeps between runs (the raw-pixel floor) goes to a folder of this test session, not the user's
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="macrl-tests-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from macrl.presets import PRESETS  # noqa: E402
torch.set_num_threads(min(2, torch.get_num_threads()))

# the "tiny" preset: a model of a few thousand parameters that runs in milliseconds
TINY = PRESETS["tiny"]


@pytest.fixture
def tiny_config():
    from macrl import MACRLConfig

    def make(**overrides):
        return MACRLConfig(**{**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def fashion_images():
    """The first 64 Fashion-MNIST training images as normalised `[64, 1, 28, 28]` floats, with their labels."""
    from macrl.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    pixels = images[:64].float().div(255).sub(0.5).div(0.5).unsqueeze(1)
    return pixels, labels[:64]


# real Hub servers on loopback: the upload-capable test server, and olah (a read-only mirror) for downloads
from hub_server import hub_server_fixture  # noqa: E402,F401
