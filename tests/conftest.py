"""Shared fixtures: tiny MACRL configs, a saved tiny encoder, real Fashion-MNIST images (Debian's
dataset-fashion-mnist) and a Hub server on loopback. What tests/ holds: tests/__init__.py."""

import os
import subprocess
import tempfile

# Tests only talk to Hub servers on loopback, and must not wait for an interactive trust_remote_code prompt
# (set before huggingface_hub is imported, which reads them once).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRUST_REMOTE_CODE_TIMEOUT", "0")
# what the package keeps between runs (the raw-pixel floor) goes to a folder of this test session, not the user's
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="macrl-tests-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import TINY, save_tiny_encoder  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_config():
    """`tiny_config(**overrides)`: a `MACRLConfig` of the tiny preset, with `overrides`."""
    from macrl import MACRLConfig

    def make(**overrides):
        return MACRLConfig(**{**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_encoder_folder(tmp_path_factory):
    """A random tiny encoder (seed 0) saved with its image processor, as `encoder/` of a run holds it; shared by the
    whole session, so a test that changes it works on a copy (`shutil.copytree`)."""
    folder = tmp_path_factory.mktemp("tiny-encoder")
    save_tiny_encoder(folder)
    return folder


@pytest.fixture(scope="session")
def fashion_images():
    """The first 64 Fashion-MNIST training images as normalised `[64, 1, 28, 28]` floats, with their labels."""
    from macrl.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    pixels = images[:64].float().div(255).sub(0.5).div(0.5).unsqueeze(1)
    return pixels, labels[:64]


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """`uninterrupted_run(steps)`: the output folder of a `tests.pretrain_runs.run_command` run of `steps` steps never
    interrupted (made once per session and length), which killed, stopped and resumed runs must end like."""
    from tests.pretrain_runs import ENV, run_command

    made = {}

    def make(steps: int):
        if steps not in made:
            out = tmp_path_factory.mktemp(f"uninterrupted_{steps}")
            done = subprocess.run(run_command(out, steps), env=ENV, capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, done.stderr[-3000:]
            made[steps] = out
        return made[steps]

    return make


# real Hub servers on loopback: the upload-capable test server (`hub_server`), for every test
from tests.hub_server import hub_server_fixture  # noqa: E402,F401
