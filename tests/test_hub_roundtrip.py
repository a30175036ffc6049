"""Released encoders through real Hub servers on loopback: olah (a read-only mirror) for downloads, the test Hub
server for push + download round trips, and the errors a user meets (missing repo, revision, server, token)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import snapshot_download
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, pipeline

from macrl import MACRLImageProcessor, MACRLModel
from macrl.extract import main as extract_main
from macrl.hub import push_encoder_to_hub
from tests.olah_mirror import hf_mirror, olah_server  # noqa: F401  (fixtures)


def _images():
    from macrl.data import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    return [Image.fromarray(images[i].numpy()) for i in range(4)] + [Image.new("RGB", (40, 30), (200, 10, 10))]


def _reference_features(folder, images):
    model = MACRLModel.from_pretrained(folder).eval()
    pixels = MACRLImageProcessor.from_pretrained(folder)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixels).pooler_output


def test_from_pretrained_pipeline_and_snapshot_through_olah(hf_mirror, tiny_encoder_folder):
    sha = hf_mirror.add_repo("acme/macrl-tiny", tiny_encoder_folder)
    images = _images()
    expected = _reference_features(tiny_encoder_folder, images)

    model = AutoModel.from_pretrained("acme/macrl-tiny").eval()
    assert type(model) is MACRLModel
    processor = AutoImageProcessor.from_pretrained("acme/macrl-tiny")
    with torch.no_grad():
        features = model(processor(images, return_tensors="pt")["pixel_values"]).pooler_output
    torch.testing.assert_close(features, expected)

    extractor = pipeline("image-feature-extraction", model="acme/macrl-tiny", revision=sha)
    pooled = torch.tensor(np.array([f[0] for f in extractor(images, pool=True)]), dtype=torch.float32)
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)

    local = snapshot_download("acme/macrl-tiny", revision=sha)
    assert load_file(f"{local}/model.safetensors").keys() == load_file(tiny_encoder_folder / "model.safetensors").keys()
    assert (tiny_encoder_folder / "model.safetensors").read_bytes() == open(f"{local}/model.safetensors", "rb").read()


def test_trust_remote_code_through_olah_without_macrl(hf_mirror, tiny_encoder_folder, tmp_path):
    hf_mirror.add_repo("acme/macrl-remote", tiny_encoder_folder)
    script = textwrap.dedent(
        """
        import sys
        sys.modules["macrl"] = None
        from PIL import Image
        from transformers import pipeline
        extractor = pipeline("image-feature-extraction", model="acme/macrl-remote", trust_remote_code=True)
        print(type(extractor.model).__module__, len(extractor(Image.new("L", (28, 28)), pool=True)[0]))
        """
    )
    env = hf_mirror.client_env(tmp_path / "cache")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, width = result.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and width == "32"


def test_push_then_load_gives_identical_weights_and_features(hub_server, tiny_encoder_folder):
    push_encoder_to_hub(tiny_encoder_folder, "tester/macrl-roundtrip")
    images = _images()
    loaded = MACRLModel.from_pretrained("tester/macrl-roundtrip")
    original = load_file(tiny_encoder_folder / "model.safetensors")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    pixels = AutoImageProcessor.from_pretrained("tester/macrl-roundtrip")(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(pixels).pooler_output, _reference_features(tiny_encoder_folder, images))


def test_hub_errors_name_the_repo_and_what_to_do(hub_server, tiny_encoder_folder, tmp_path, capsys, monkeypatch):
    # huggingface_hub backs off 1+2+4+8+8 s between retries of an unreachable server; the retries still happen
    sleeps = []
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", sleeps.append)
    with pytest.raises(OSError, match="tester/does-not-exist"):
        MACRLModel.from_pretrained("tester/does-not-exist")
    push_encoder_to_hub(tiny_encoder_folder, "tester/macrl-errors")
    with pytest.raises(OSError, match="no-such-branch"):
        MACRLModel.from_pretrained("tester/macrl-errors", revision="no-such-branch")
    push_encoder_to_hub(tiny_encoder_folder, "tester/macrl-private", private=True)
    with pytest.raises(OSError, match="tester/macrl-private"):
        MACRLModel.from_pretrained("tester/macrl-private", token=False)
    assert MACRLModel.from_pretrained("tester/macrl-private") is not None  # with the token

    # the command-line tools turn these into one line, exit code 2
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (28, 28)).save(images / "a.png")
    out = tmp_path / "f.safetensors"
    assert extract_main(["--model", "tester/does-not-exist", "--data", str(images), "--output", str(out)]) == 2
    assert "tester/does-not-exist" in capsys.readouterr().err
    hub_server.stop()
    with pytest.raises(OSError):
        MACRLModel.from_pretrained("tester/never-downloaded")
    assert extract_main(["--model", "tester/never-downloaded", "--data", str(images), "--output", str(out)]) == 2
    assert "tester/never-downloaded" in capsys.readouterr().err
    assert not out.exists()
    assert len(sleeps) > 0  # the client did retry before giving up
