"""Saving and loading: safetensors round trips, Auto classes, timm, the pipeline, and trust_remote_code."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    pipeline,
)

from macrl import MACRLConfig, MACRLForImageClassification, MACRLForPreTraining, MACRLImageProcessor, MACRLModel


@pytest.fixture
def pretraining_folder(tmp_path, tiny_config):
    torch.manual_seed(0)
    config = tiny_config(queue_size=8)
    model = MACRLForPreTraining(config)
    model.update_momentum_branch(0.0)  # momentum branch != main branch, so the round trip checks both
    model.save_pretrained(tmp_path / "pretrain")
    MACRLImageProcessor.from_model_config(config).save_pretrained(tmp_path / "pretrain")
    return model, tmp_path / "pretrain"


def test_pretraining_roundtrip_is_bit_identical(pretraining_folder, fashion_images):
    model, folder = pretraining_folder
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    loaded = MACRLForPreTraining.from_pretrained(folder)
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    pixels, _ = fashion_images
    noise = torch.rand(4, 49)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(pixels[:4], noise=noise).loss, model(pixels[:4], noise=noise).loss, rtol=0, atol=0)


def test_encoder_loads_from_pretraining_folder(pretraining_folder, fashion_images, caplog):
    model, folder = pretraining_folder
    encoder = MACRLModel.from_pretrained(folder).eval()
    for name, tensor in model.macrl.state_dict().items():
        assert torch.equal(tensor, encoder.state_dict()[name]), name
    pixels, _ = fashion_images
    torch.testing.assert_close(encoder(pixels[:4]).pooler_output, model.macrl.eval()(pixels[:4]).pooler_output)
    # AutoModel picks the encoder after `import macrl`
    assert type(AutoModel.from_pretrained(folder)) is MACRLModel


def test_auto_classes_resolve_after_import(pretraining_folder):
    _, folder = pretraining_folder
    assert type(AutoConfig.from_pretrained(folder)) is MACRLConfig
    assert type(AutoModelForPreTraining.from_pretrained(folder)) is MACRLForPreTraining
    assert type(AutoModelForImageClassification.from_pretrained(folder, num_labels=3)) is MACRLForImageClassification
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor) is MACRLImageProcessor and processor.num_channels == 1
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_macrl.MACRLModel"
    assert auto_map["AutoImageProcessor"] == "image_processing_macrl.MACRLImageProcessor"
    assert auto_map["AutoBackbone"] == "modeling_macrl_backbone.MACRLBackbone"
    for code in (
        "configuration_macrl.py",
        "modeling_macrl.py",
        "contrastive_loss.py",
        "image_processing_macrl.py",
        "modeling_macrl_backbone.py",
    ):
        assert (folder / code).exists(), code


def test_classifier_roundtrip(tmp_path, tiny_config, fashion_images):
    model = MACRLForImageClassification(tiny_config(num_labels=10)).eval()
    model.save_pretrained(tmp_path)
    loaded = MACRLForImageClassification.from_pretrained(tmp_path).eval()
    pixels, _ = fashion_images
    assert torch.equal(model(pixels[:4]).logits, loaded(pixels[:4]).logits)


def test_encoder_weights_load_into_timm_unchanged(tmp_path, tiny_config, fashion_images):
    import timm

    config = tiny_config()
    encoder = MACRLModel(config).eval()
    encoder.save_pretrained(tmp_path)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=0,
    ).eval()
    missing, unexpected = vit.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    pixels, _ = fashion_images
    with torch.no_grad():
        torch.testing.assert_close(vit(pixels[:4]), encoder(pixels[:4]).pooler_output, rtol=1e-5, atol=1e-5)


def _mixed_images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    palette = rgb.convert("P")
    sixteen = Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16))
    return [rgb, gray, rgba, palette, sixteen]


@pytest.mark.parametrize("channels", [1, 3])
def test_image_processor_converts_every_mode(channels):
    processor = MACRLImageProcessor(size={"height": 28, "width": 28}, num_channels=channels)
    batch = processor(_mixed_images(), return_tensors="pt")["pixel_values"]
    assert batch.shape == (5, channels, 28, 28) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all() and batch.std() > 0.1  # 16-bit images are scaled, not clipped to white


def test_pipeline_pooled_features_match_the_model(pretraining_folder):
    model, folder = pretraining_folder
    images = _mixed_images()[:2]
    extractor = pipeline("image-feature-extraction", model=str(folder))
    pooled = torch.tensor([f[0] for f in extractor(images, pool=True)])
    tokens = extractor(images[0])
    assert np.array(tokens).shape == (1, 50, 32)
    pixels = MACRLImageProcessor.from_pretrained(folder)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(pooled, model.macrl.eval()(pixels).pooler_output, rtol=1e-4, atol=1e-5)


def test_trust_remote_code_without_macrl(pretraining_folder, tmp_path):
    """Loads the saved folder in a fresh interpreter in which `import macrl` fails."""
    model, folder = pretraining_folder
    torch.save(model.macrl.eval()(torch.zeros(2, 1, 28, 28)).pooler_output.detach(), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["macrl"] = None  # any `import macrl` raises ImportError
        import torch
        from PIL import Image
        from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForPreTraining, pipeline
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "MACRLModel" and "transformers_modules" in type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        torch.testing.assert_close(model(torch.zeros(2, 1, 28, 28)).pooler_output, expected)
        assert type(AutoModelForPreTraining.from_pretrained({str(folder)!r}, trust_remote_code=True)).__name__ == (
            "MACRLForPreTraining"
        )
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "MACRLImageProcessor"
        # (AutoBackbone.from_pretrained asks the Hub about any local path in transformers 5.24: from_config here)
        config = AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True, out_indices=[1, 2])
        backbone_class = type(AutoBackbone.from_config(config, trust_remote_code=True))
        backbone = backbone_class.from_pretrained({str(folder)!r}, config=config)
        assert type(backbone).__name__ == "MACRLBackbone"
        assert [tuple(f.shape) for f in backbone(torch.zeros(2, 1, 28, 28)).feature_maps] == [(2, 32, 7, 7)] * 2
        extractor = pipeline("image-feature-extraction", model={str(folder)!r}, trust_remote_code=True)
        print(len(extractor(Image.new("RGB", (30, 30)), pool=True)[0]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "32"
