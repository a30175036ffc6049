"""Shared fixtures: tiny MACRL configs and real Fashion-MNIST images (Debian's dataset-fashion-mnist)."""

import os

import pytest
import torch

# Tests only talk to Hub servers on loopback, and must not wait for an interactive trust_remote_code prompt.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRUST_REMOTE_CODE_TIMEOUT", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(
    image_size=28,
    patch_size=4,
    num_channels=1,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
    projection_dim=16,
    projector_hidden_size=32,
    predictor_hidden_size=32,
)


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
