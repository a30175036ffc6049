"""Looking inside an encoder: the CLS attention maps and feature PCA (`macrl.visualization`), `macrl-visualize` on
folders of real images (a photo among them), and the pictures a `macrl-pretrain` run adds."""

import copy
import shutil
from pathlib import Path

import matplotlib.cbook
import pytest
import torch
from PIL import Image

from tests.image_folders import write_class_folders
from macrl import MACRLBackbone, MACRLForImageClassification, MACRLForPreTraining, MACRLImageProcessor, MACRLModel
from macrl.visualization import (
    ATTENTION_MAPS_FILE,
    FEATURE_PCA_FILE,
    encoder_maps,
    encoder_pictures,
    feature_pca,
    grid_figure_size,
)
from macrl.visualize import main

# matplotlib ships this photo (sample_data): a real 512x600 RGB JPEG, nothing downloaded
GRACE_HOPPER = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _pair(config, first: str, second: str):
    torch.manual_seed(0)
    a = MACRLModel._from_config(copy.deepcopy(config), attn_implementation=first).eval()
    b = MACRLModel._from_config(copy.deepcopy(config), attn_implementation=second).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def test_maps_are_the_same_under_eager_and_sdpa(tiny_config, fashion_images):
    eager, sdpa = _pair(tiny_config(), "eager", "sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    pixels = fashion_images[0][:4]
    a, b = encoder_maps(eager, pixels), encoder_maps(sdpa, pixels)
    torch.testing.assert_close(a.attention, b.attention, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens, rtol=1e-5, atol=1e-5)
    # the patch tokens are the model's own output under sdpa (no attention weights asked for)
    with torch.no_grad():
        tokens = sdpa(pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(b.patch_tokens.reshape(4, 49, -1), tokens, rtol=1e-5, atol=1e-5)


def test_maps_are_the_cls_row_of_the_last_block_over_the_patches(tiny_config, fashion_images):
    model = MACRLModel(tiny_config()).eval()
    pixels = fashion_images[0][:3]
    maps = encoder_maps(model, pixels)
    with torch.no_grad():
        weights = model(pixels, output_attentions=True).attentions[-1]  # [N, heads, 1 + 49, 1 + 49]
    assert maps.attention.shape == (3, 2, 7, 7) and maps.patch_tokens.shape == (3, 7, 7, 32) and maps.block == 2
    torch.testing.assert_close(maps.attention.reshape(3, 2, 49), weights[:, :, 0, 1:])
    # a softmax row: what CLS gives the patches is what it does not give itself
    torch.testing.assert_close(maps.attention.sum((2, 3)) + weights[:, :, 0, 0], torch.ones(3, 2))
    assert encoder_maps(model, pixels, block=0).block == 1
    assert model.training is False
    # registers sit between CLS and the patches (timm's order) and are left out with it
    with_registers = MACRLModel(tiny_config(num_register_tokens=2)).eval()
    maps = encoder_maps(with_registers, pixels)
    with torch.no_grad():
        weights = with_registers(pixels, output_attentions=True).attentions[-1]  # [N, heads, 3 + 49, 3 + 49]
    assert maps.attention.shape == (3, 2, 7, 7) and maps.patch_tokens.shape == (3, 7, 7, 32)
    torch.testing.assert_close(maps.attention.reshape(3, 2, 49), weights[:, :, 0, 3:])


def test_functions_work_on_model_backbone_and_pretraining_model_alike(tiny_config, fashion_images, tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    pretraining = MACRLForPreTraining(config).eval()
    folder = tmp_path / "run"
    pretraining.save_pretrained(folder)
    models = {
        "MACRLModel": MACRLModel.from_pretrained(folder),
        "MACRLBackbone": MACRLBackbone.from_pretrained(folder, out_indices=[1]),
        "MACRLForPreTraining": pretraining,
        "MACRLForImageClassification": MACRLForImageClassification.from_pretrained(folder),
    }
    pixels = fashion_images[0][:2]
    expected = encoder_maps(pretraining.macrl, pixels)
    for name, model in models.items():
        maps = encoder_maps(model, pixels)
        torch.testing.assert_close(maps.attention, expected.attention, msg=name)
        torch.testing.assert_close(maps.patch_tokens, expected.patch_tokens, msg=name)
    written = encoder_pictures(models["MACRLBackbone"], pixels, [0.5], [0.5], tmp_path / "pictures")
    assert [path.name for path in written] == [ATTENTION_MAPS_FILE, FEATURE_PCA_FILE]
    with pytest.raises(TypeError, match="expected a MACRL model"):
        encoder_maps(torch.nn.Linear(2, 2), pixels)


def test_feature_pca_finds_the_foreground_and_colours_it():
    """Patch tokens of two kinds: the inner 4x4 patches of a 6x6 grid hold one pattern, the ring around it another;
    each image's first component tells them apart (inner side positive), however much the two images differ; the
    background is black, the colours span [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 6, 6, 16, generator=generator) * 0.05
    inner = torch.zeros(6, 6, dtype=torch.bool)
    inner[1:5, 1:5] = True
    tokens[:, inner, 0] += 3.0  # the object
    tokens[:, inner, 1:4] += torch.randn(2, 16, 3, generator=generator)  # parts of it
    tokens[:, ~inner, 5] -= 1.0  # the background
    tokens[1, ..., 6] += 20.0  # the second image differs from the first everywhere: not a foreground
    pca = feature_pca(tokens)
    assert torch.equal(pca.foreground, inner.expand(2, -1, -1))
    assert (pca.first_component[:, inner] > 0).all() and (pca.first_component[:, ~inner] < 0).all()
    assert (pca.rgb[:, ~inner] == 0).all() and pca.rgb.min() == 0 and pca.rgb.max() == 1
    for channel in range(3):  # each colour is spread over the foreground, not one flat value
        assert pca.rgb[:, inner, channel].std() > 0.1
    # the sign follows the border, whatever the sign SVD gave: the negated tokens give the same picture
    flipped = feature_pca(-tokens)
    assert torch.equal(flipped.foreground, pca.foreground)
    # without a threshold every patch is coloured
    assert feature_pca(tokens, threshold=None).foreground.all()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """RGB images of several sizes (a real photo, Fashion-MNIST images at 28 and 45 px) and a grayscale one."""
    root = tmp_path_factory.mktemp("photos")
    shutil.copy(GRACE_HOPPER, root / "grace_hopper.jpg")
    write_class_folders(root / "small", 2, mode="RGB", labelled=False)
    write_class_folders(root / "large", 2, start=2, mode="RGB", size=45, labelled=False)
    write_class_folders(root / "gray", 1, start=4, labelled=False)
    return root


def _encoder_folder(tmp_path: Path, config, pretraining: bool = False) -> Path:
    torch.manual_seed(0)
    model = (MACRLForPreTraining if pretraining else MACRLModel)(config)
    folder = tmp_path / ("run" if pretraining else "encoder")
    model.save_pretrained(folder)
    if not pretraining:
        MACRLImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


def test_command_draws_an_rgb_encoder_on_images_of_several_sizes(image_folder, tiny_config, tmp_path, capsys):
    encoder = _encoder_folder(tmp_path, tiny_config(num_channels=3))
    out = tmp_path / "pictures"
    assert main(["--model", str(encoder), "--images", str(image_folder), "--output-dir", str(out), "--num-images", "6",
                 "--no-progress"]) == 0
    assert sorted(path.name for path in out.iterdir()) == [ATTENTION_MAPS_FILE, FEATURE_PCA_FILE]
    assert f"wrote {out / ATTENTION_MAPS_FILE}" in capsys.readouterr().out
    with Image.open(out / ATTENTION_MAPS_FILE) as picture:
        assert picture.format == "PNG" and picture.size == grid_figure_size(6, 3)  # 6 images x (image, 2 heads)
    with Image.open(out / FEATURE_PCA_FILE) as picture:
        assert picture.size == grid_figure_size(3, 6)  # image, 1st component, RGB; one column per image


def test_command_on_a_pretraining_folder_adds_the_reconstructions(image_folder, tiny_config, tmp_path, capsys):
    run = _encoder_folder(tmp_path, tiny_config(), pretraining=True)
    # a macrl-pretrain OUTPUT_DIR keeps its image processor in encoder/: used, no warning that there is none
    processor = MACRLImageProcessor(size={"height": 28, "width": 28}, num_channels=1, image_mean=[0.25], image_std=[0.4])
    processor.save_pretrained(run / "encoder")
    out = tmp_path / "pictures"
    assert main(["--model", str(run), "--images", str(image_folder), "--output-dir", str(out), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == [ATTENTION_MAPS_FILE, FEATURE_PCA_FILE, "reconstructions.png"]
    with Image.open(out / "reconstructions.png") as picture:
        assert picture.size == grid_figure_size(3, 4)  # original, masked, reconstruction of the 4 images


def test_command_errors_are_one_line(image_folder, tiny_config, tmp_path, capsys):
    encoder = _encoder_folder(tmp_path, tiny_config())
    capsys.readouterr()  # the saving's progress bars

    def error(*argv) -> tuple[int, str]:
        code = main(["--no-progress", *argv])
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return code, lines[0]

    missing = tmp_path / "nowhere"
    assert error("--model", str(encoder), "--images", str(missing)) == (
        2, f"macrl-visualize: error: --images {missing}: folder not found"
    )
    assert error("--model", str(missing), "--images", str(image_folder)) == (
        2, f"macrl-visualize: error: --model {missing}: model folder not found"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    code, line = error("--model", str(encoder), "--images", str(empty))
    assert code == 2 and line.startswith(f"macrl-visualize: error: --images {empty}: No image files found")

    broken = tmp_path / "broken"
    shutil.copytree(image_folder, broken)
    (broken / "gray" / "00004.png").write_bytes(b"not a png")
    out = tmp_path / "pictures"
    code, line = error("--model", str(encoder), "--images", str(broken), "--num-images", "6", "--output-dir", str(out))
    assert code == 1 and f"{broken / 'gray' / '00004.png'}" in line and "--skip-unreadable" in line
    assert not out.exists()
    code, line = error("--model", str(encoder), "--images", str(broken), "--num-images", "6", "--output-dir", str(out),
                       "--skip-unreadable")
    assert code == 0 and line.startswith("macrl-visualize: warning: skipping") and "00004.png" in line
    assert (out / ATTENTION_MAPS_FILE).is_file()


def test_pretraining_run_adds_the_encoder_pictures(tmp_path):
    from macrl.pretrain import main as pretrain

    out = tmp_path / "run"
    assert pretrain(["--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--max-steps", "2", "--no-knn",
                     "--limit-images", "32", "--eval-images", "8", "--output-dir", str(out)]) == 0
    for name, size in ((ATTENTION_MAPS_FILE, grid_figure_size(8, 3)), (FEATURE_PCA_FILE, grid_figure_size(3, 8))):
        with Image.open(out / "pictures" / name) as picture:
            assert picture.size == size, name  # the 8 images of reconstructions.png; the tiny preset's 2 heads
