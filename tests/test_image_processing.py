"""`MACRLImageProcessor` with the checks of transformers' `ImageProcessingTestMixin`: serialisation round trips,
a processor saved on its own reloaded through `AutoImageProcessor`, and the class name left to the model's
`auto_map` in a folder that carries the code (whichever of model and processor is saved first)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from macrl import MACRLImageProcessor, MACRLModel


@pytest.fixture
def processor():
    return MACRLImageProcessor(size={"height": 28, "width": 28}, num_channels=1, image_mean=[0.3], image_std=[0.4])


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(2)]


def test_dict_and_json_round_trips(processor, tmp_path):
    assert processor.to_dict()["image_processor_type"] == "MACRLImageProcessor"
    assert MACRLImageProcessor.from_dict(processor.to_dict()).to_dict() == processor.to_dict()
    assert json.loads(processor.to_json_string())["num_channels"] == 1
    processor.to_json_file(tmp_path / "processor.json")
    assert MACRLImageProcessor.from_json_file(tmp_path / "processor.json").to_dict() == processor.to_dict()
    assert MACRLImageProcessor().to_dict()["num_channels"] == 3  # builds without arguments


def test_processor_saved_on_its_own_reloads_through_auto_image_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preprocessor_config.json"]
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "MACRLImageProcessor" and "auto_map" not in saved
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MACRLImageProcessor and loaded.to_dict() == processor.to_dict()
    expected = processor(_images(), return_tensors="pt")["pixel_values"]
    assert expected.shape == (2, 1, 28, 28)
    assert torch.equal(loaded(_images(), return_tensors="pt")["pixel_values"], expected)


@pytest.mark.parametrize("processor_first", [False, True], ids=["model-first", "processor-first"])
def test_model_folder_leaves_the_class_to_the_auto_map(processor, tmp_path, tiny_config, processor_first):
    """A folder with the code and `auto_map` (what `trust_remote_code=True` loads where macrl is absent, see
    test_save_and_auto.py) gets no `image_processor_type`, and still loads the processor with macrl imported."""
    if processor_first:
        processor.save_pretrained(tmp_path)
    MACRLModel(tiny_config()).save_pretrained(tmp_path)
    if not processor_first:
        processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert "image_processor_type" not in saved and "auto_map" not in saved
    assert "AutoImageProcessor" in json.loads((tmp_path / "config.json").read_text())["auto_map"]
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MACRLImageProcessor and loaded.to_dict() == processor.to_dict()
