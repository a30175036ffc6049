"""Tests of `macrl-extract` (macrl/extract.py) on real images: Fashion-MNIST test images saved as PNG files in class
subfolders, plus JPEGs of other sizes, an RGBA PNG, a palette GIF and a 16-bit PNG, encoded by a tiny saved encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from macrl import MACRLConfig, MACRLImageProcessor, MACRLModel
from macrl.data import ImageFolderSource, load_fashion_mnist
from macrl.extract import main
from macrl.feature_extraction import ExtractionResult, extract_features, inference_precision, prepare_for_inference
from macrl.loading import load_encoder_and_processor
from macrl.precision import cpu_runs_bf16_fast, cpu_runs_fp16_fast
from tests.tiny_models import TINY, save_tiny_encoder

CLASSES = ["Trouser", "T-shirt_top", "Pullover"]  # folder names; sorted -> Pullover, T-shirt_top, Trouser
PER_CLASS = 4
BATCH = "5"  # does not divide the 17 images: the last batch is partial


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """12 Fashion-MNIST PNGs in 3 class folders + 5 files of other sizes and modes (17 images)."""
    root = tmp_path_factory.mktemp("images")
    images, _ = load_fashion_mnist("test")
    for class_index, name in enumerate(CLASSES):
        (root / name).mkdir()
        for k in range(PER_CLASS):
            Image.fromarray(images[class_index * PER_CLASS + k].numpy()).save(root / name / f"img_{k:02d}.png")
    garment = Image.fromarray(images[20].numpy())
    garment.convert("RGB").resize((40, 30)).save(root / "Pullover" / "wide.jpg", quality=90)
    garment.convert("RGB").resize((17, 50)).save(root / "Trouser" / "tall.JPG", quality=90)
    rgba = garment.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(garment.size))
    rgba.save(root / "T-shirt_top" / "alpha.png")
    palette = garment.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "Pullover" / "palette.gif")
    sixteen = (np.asarray(garment, dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "Trouser" / "deep.png")  # uint16 -> "I;16"
    stored = {}
    for name in ("Pullover/wide.jpg", "T-shirt_top/alpha.png", "Pullover/palette.gif", "Trouser/deep.png"):
        with Image.open(root / name) as image:
            stored[name] = image.mode
    assert list(stored.values()) == ["RGB", "RGBA", "P", "I;16"]  # the modes the data layer must convert
    return root


@pytest.fixture(scope="module")
def reference(tiny_encoder_folder, image_folder) -> tuple[list[str], list[int], torch.Tensor, torch.Tensor]:
    """Expected ids and labels (built from the files, not from macrl.feature_extraction) and the model's own outputs."""
    files = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*") if p.is_file())
    class_names = sorted(CLASSES)
    labels = [class_names.index(f.split("/")[0]) for f in files]
    model = MACRLModel.from_pretrained(tiny_encoder_folder).eval()
    processor = MACRLImageProcessor.from_pretrained(tiny_encoder_folder)
    images = [ImageFolderSource(image_folder, mode="L").load_image(i) for i in range(len(files))]
    with torch.inference_mode():
        output = model(processor(images=images, return_tensors="pt")["pixel_values"])
    return files, labels, output.last_hidden_state, output.pooler_output


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _only_output_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- outputs


def test_cli_subprocess_writes_pooler_output_ids_and_labels(tiny_encoder_folder, image_folder, reference, tmp_path):
    files, labels, _, pooler_output = reference
    output = tmp_path / "feats.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "macrl.extract", "--model", tiny_encoder_folder, "--data", image_folder,
         "--output", output, "--batch-size", BATCH, "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "Wrote 17 features [17, 32]" in completed.stdout
    tensors = load_file(output)
    assert tensors["features"].dtype == torch.float32 and tensors["features"].shape == (17, 32)
    torch.testing.assert_close(tensors["features"], pooler_output, rtol=1e-4, atol=1e-5)
    assert tensors["labels"].dtype == torch.int64 and tensors["labels"].tolist() == labels
    metadata = _metadata(output)
    assert json.loads(metadata["ids"]) == files  # sorted relative POSIX paths
    assert metadata["pool"] == "cls" and metadata["dtype"] == "fp32" and metadata["count"] == "17"
    assert metadata["model"] == str(tiny_encoder_folder.resolve())
    assert json.loads(metadata["class_names"]) == sorted(CLASSES)
    assert json.loads(metadata["skipped"]) == []
    assert _only_output_files(tmp_path) == ["feats.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("pool", ["mean", "none"])
def test_pool_variants_match_the_tokens(pool, tiny_encoder_folder, image_folder, reference, tmp_path, capsys):
    _, _, tokens, _ = reference
    output = tmp_path / "feats.safetensors"
    code, _, err = _run(capsys, "--model", tiny_encoder_folder, "--data", image_folder, "--output", output,
                        "--pool", pool, "--batch-size", BATCH)
    assert code == 0, err
    features = load_file(output)["features"]
    expected = tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens
    assert features.dtype == torch.float32 and features.shape == expected.shape
    assert features.shape == ((17, 32) if pool == "mean" else (17, 1 + 49, 32))
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert _metadata(output)["pool"] == pool


def test_default_pool_is_the_config_pooling(image_folder, tmp_path, capsys):
    config = MACRLConfig(**{**TINY, "pooling": "mean"})
    model = save_tiny_encoder(tmp_path / "model", config)
    output = tmp_path / "feats.safetensors"
    code, _, err = _run(capsys, "--model", tmp_path / "model", "--data", image_folder, "--output", output)
    assert code == 0, err
    assert _metadata(output)["pool"] == "mean"
    source = ImageFolderSource(image_folder, mode="L")
    processor = MACRLImageProcessor.from_model_config(config)
    with torch.inference_mode():
        pixels = processor(images=[source.load_image(i) for i in range(len(source))], return_tensors="pt")
        expected = model(pixels["pixel_values"]).pooler_output
    torch.testing.assert_close(load_file(output)["features"], expected, rtol=1e-4, atol=1e-5)


def test_npy_and_sidecar_with_workers(tiny_encoder_folder, image_folder, reference, tmp_path, capsys):
    files, labels, _, pooler_output = reference
    output = tmp_path / "feats.npy"
    code, _, err = _run(capsys, "--model", tiny_encoder_folder, "--data", image_folder, "--output", output,
                        "--batch-size", BATCH, "--num-workers", "2")
    assert code == 0, err
    features = np.load(output)
    assert features.dtype == np.float32 and features.shape == (17, 32)
    np.testing.assert_allclose(features, pooler_output.numpy(), rtol=1e-4, atol=1e-5)  # same order with workers
    sidecar = json.loads((tmp_path / "feats.ids.json").read_text())
    assert sidecar["ids"] == files and sidecar["labels"] == labels and sidecar["skipped"] == []
    assert sidecar["pool"] == "cls" and sidecar["count"] == 17
    assert _only_output_files(tmp_path) == ["feats.ids.json", "feats.npy"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_features_are_close_to_fp32(tiny_encoder_folder, image_folder, reference, tmp_path, capsys, dtype):
    _, _, _, pooler_output = reference
    output = tmp_path / f"{dtype}.safetensors"
    code, _, err = _run(capsys, "--model", tiny_encoder_folder, "--data", image_folder, "--output", output, "--dtype", dtype)
    assert code == 0, err
    features = load_file(output)["features"]
    assert features.dtype == torch.float32  # saved as float32 whatever the compute dtype
    assert _metadata(output)["dtype"] == dtype
    cosine = F.cosine_similarity(features, pooler_output, dim=1)
    print(f"{dtype} vs fp32 cosine similarity: min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    assert cosine.min() >= 0.99
    assert not torch.equal(features, pooler_output)  # it really ran in half precision
    # on a CPU without kernels for the dtype (bf16: AVX2, like CI's; fp16: most CPUs) the run says it is the slow one
    fast = cpu_runs_bf16_fast() if dtype == "bf16" else cpu_runs_fp16_fast()
    assert (f"macrl-extract: warning: --dtype {dtype}: this CPU" in err) == (not fast), err
    assert "fp32: this CPU" not in err


def test_bf16_casts_the_weights_once_where_the_cpu_has_kernels(tiny_encoder_folder, image_folder, reference):
    _, _, _, pooler_output = reference
    model, processor = load_encoder_and_processor(str(tiny_encoder_folder))
    result = extract_features(model, processor, ImageFolderSource(image_folder, mode="L"), batch_size=5, dtype="bf16")
    assert result.features.dtype == torch.float32 and result.features.shape == pooler_output.shape
    assert F.cosine_similarity(result.features, pooler_output, dim=1).min() >= 0.99
    # bf16 weights with bf16 kernels (the final norm's stay float32); float32 weights under autocast (as before) on
    # a CPU without them
    weights = {parameter.dtype for name, parameter in model.named_parameters() if not name.startswith("norm.")}
    assert weights == ({torch.bfloat16} if cpu_runs_bf16_fast() else {torch.float32})
    assert model.norm.weight.dtype == torch.float32
    assert inference_precision("cpu", "bf16").autocast == (None if cpu_runs_bf16_fast() else torch.bfloat16)
    assert inference_precision("cpu", "fp32") == inference_precision("cpu", "fp32").__class__(torch.float32, None)


def test_pipeline_with_bf16_weights_matches_fp32(tiny_encoder_folder, image_folder, reference):
    from transformers import pipeline

    _, _, _, pooler_output = reference
    source = ImageFolderSource(image_folder, mode="L")
    images = [source.load_image(i) for i in range(len(source))]
    extractor = pipeline("image-feature-extraction", model=str(tiny_encoder_folder), dtype=torch.bfloat16, device="cpu")
    assert extractor.model.dtype == torch.bfloat16
    pooled = torch.stack([row[0] for row in extractor(images, pool=True, return_tensors=True, batch_size=5)])
    assert F.cosine_similarity(pooled.float(), pooler_output, dim=1).min() >= 0.99


@pytest.mark.slow  # torch.compile: tens of seconds
def test_compiled_run_with_a_ragged_last_batch_compiles_once(tiny_encoder_folder, image_folder, reference):
    from torch._dynamo.utils import counters

    files, _, _, pooler_output = reference
    source = ImageFolderSource(image_folder, mode="L")
    model, processor = load_encoder_and_processor(str(tiny_encoder_folder))
    torch._dynamo.reset()
    counters.clear()
    first = extract_features(model, processor, source, batch_size=5, compile=True)  # 17 images: 5, 5, 5, 2
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    again = extract_features(model, processor, source, batch_size=5, compile=True, pool="mean")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the second run compiles nothing
    assert first.ids == files and first.features.shape == (17, 32) and again.features.shape == (17, 32)
    torch.testing.assert_close(first.features, pooler_output, rtol=1e-4, atol=1e-4)  # padded rows dropped


@pytest.mark.slow  # torch.compile: tens of seconds
def test_pipeline_takes_a_model_prepared_with_bf16_and_compile(tiny_encoder_folder, image_folder, reference):
    from transformers import pipeline

    _, _, _, pooler_output = reference
    model, processor = load_encoder_and_processor(str(tiny_encoder_folder))
    prepared = prepare_for_inference(model, "cpu", "bf16", compile=True)
    assert isinstance(prepared, MACRLModel) and prepared is model  # compiled in place: still the transformers model
    extractor = pipeline("image-feature-extraction", model=prepared, image_processor=processor, device="cpu")
    source = ImageFolderSource(image_folder, mode="L")
    images = [source.load_image(i) for i in range(len(source))]
    pooled = torch.stack([row[0] for row in extractor(images, pool=True, return_tensors=True, batch_size=5)])
    assert F.cosine_similarity(pooled.float(), pooler_output, dim=1).min() >= 0.99


@pytest.mark.slow  # torch.compile in a real process
def test_cli_compile_prints_its_compile_time(tiny_encoder_folder, image_folder, reference, tmp_path):
    _, _, _, pooler_output = reference
    output = tmp_path / "feats.safetensors"
    completed = subprocess.run(
        [sys.executable, "-m", "macrl.extract", "--model", tiny_encoder_folder, "--data", image_folder, "--output", output,
         "--batch-size", BATCH, "--device", "cpu", "--dtype", "bf16", "--compile"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr
    assert "torch.compile: compiled for batches of 5 in" in completed.stderr, completed.stderr
    features = load_file(output)["features"]
    assert features.dtype == torch.float32 and F.cosine_similarity(features, pooler_output, dim=1).min() >= 0.99
    assert _metadata(output)["compile"] == "true"


def test_hf_dataset_ids_are_indices(tiny_encoder_folder, tmp_path, capsys):
    import datasets  # the [test] extra installs it
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    table = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image.numpy()) for image in load_fashion_mnist("test")[0][:5]],
         "label": [0, 1, 1, 0, 1]},
        features=features,
    )
    table.save_to_disk(str(tmp_path / "saved"))
    output = tmp_path / "feats.safetensors"
    code, _, err = _run(capsys, "--model", tiny_encoder_folder, "--data", tmp_path / "saved", "--output", output)
    assert code == 0, err
    assert json.loads(_metadata(output)["ids"]) == [0, 1, 2, 3, 4]
    assert load_file(output)["labels"].tolist() == [0, 1, 1, 0, 1]
    assert json.loads(_metadata(output)["class_names"]) == ["a", "b"]


def test_python_api(tiny_encoder_folder, image_folder, reference):
    files, labels, _, pooler_output = reference
    model = MACRLModel.from_pretrained(tiny_encoder_folder)
    processor = MACRLImageProcessor.from_pretrained(tiny_encoder_folder)
    result = extract_features(model, processor, ImageFolderSource(image_folder, mode="L"), batch_size=7, progress=False)
    assert isinstance(result, ExtractionResult)
    assert result.ids == files and result.labels.tolist() == labels and result.skipped == []
    torch.testing.assert_close(result.features, pooler_output, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        extract_features(model, processor, ImageFolderSource(image_folder, mode="L"), pool="max")


# --------------------------------------------------------------------------- unreadable files, atomic writes


@pytest.fixture
def folder_with_corrupt_file(image_folder, tmp_path) -> tuple[Path, Path]:
    """A copy of the image folder plus a truncated PNG."""
    root = tmp_path / "images"
    for path in image_folder.rglob("*"):
        if path.is_file():
            (root / path.relative_to(image_folder)).parent.mkdir(parents=True, exist_ok=True)
            (root / path.relative_to(image_folder)).write_bytes(path.read_bytes())
    whole = (image_folder / "Trouser" / "img_00.png").read_bytes()
    broken = root / "Pullover" / "broken.png"
    broken.write_bytes(whole[: len(whole) // 2])
    return root, broken


def test_corrupt_file_stops_the_run_and_writes_nothing(tiny_encoder_folder, folder_with_corrupt_file, tmp_path, capsys):
    root, broken = folder_with_corrupt_file
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = out_dir / "old.safetensors"
    previous.write_bytes(b"previous run")
    for name in ("feats.safetensors", "old.safetensors"):
        code, _, err = _run(capsys, "--model", tiny_encoder_folder, "--data", root, "--output", out_dir / name)
        assert code == 1
        assert str(broken) in err and "--skip-unreadable" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert _only_output_files(out_dir) == ["old.safetensors"]  # nothing new, no temp file
    assert previous.read_bytes() == b"previous run"  # an existing output survives a failed run


def test_skip_unreadable_counts_and_lists_the_file(tiny_encoder_folder, folder_with_corrupt_file, reference, tmp_path, capsys):
    files, labels, _, pooler_output = reference
    root, _ = folder_with_corrupt_file
    output = tmp_path / "feats.safetensors"
    code, out, err = _run(capsys, "--model", tiny_encoder_folder, "--data", root, "--output", output,
                          "--skip-unreadable", "--batch-size", BATCH)
    assert code == 0, err
    assert "Skipped 1 unreadable image(s)" in err and "Pullover/broken.png" in err and "(1 skipped)" in out
    skipped = json.loads(_metadata(output)["skipped"])
    assert [entry["id"] for entry in skipped] == ["Pullover/broken.png"] and skipped[0]["reason"]
    assert json.loads(_metadata(output)["ids"]) == files and _metadata(output)["count"] == "17"
    assert load_file(output)["labels"].tolist() == labels  # class indices unchanged by the skipped file
    torch.testing.assert_close(load_file(output)["features"], pooler_output, rtol=1e-4, atol=1e-5)


def test_interrupted_write_leaves_no_output(tiny_encoder_folder, image_folder, tmp_path, capsys, monkeypatch):
    def write_half_then_interrupt(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("macrl.feature_files.save_file", write_half_then_interrupt)
    code, _, err = _run(capsys, "--model", tiny_encoder_folder, "--data", image_folder, "--output", tmp_path / "f.safetensors")
    assert code == 130 and "no output written" in err
    assert _only_output_files(tmp_path) == []


# --------------------------------------------------------------------------- usage errors


def _not_macrl_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty data folder", "No image files found"),
        ("missing data folder", "folder not found"),
        ("missing model folder", "model folder not found"),
        ("folder without config.json", "no config.json"),
        ("not a MACRL model", "not a MACRL model"),
        ("bad extension", "unsupported extension '.csv'"),
        ("unwritable output folder", "is not a folder"),
        ("unknown pool", "invalid choice: 'max'"),
        ("unknown dtype", "invalid choice: 'fp8'"),
        ("zero batch size", "must be >= 1"),
    ],
)
def test_usage_errors_exit_2_with_one_line(case, message, tiny_encoder_folder, image_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    args = {"--model": tiny_encoder_folder, "--data": image_folder, "--output": tmp_path / "feats.safetensors"}
    extra: list[str] = []
    if case == "empty data folder":
        args["--data"] = tmp_path / "empty"
    elif case == "missing data folder":
        args["--data"] = tmp_path / "nope"
    elif case == "missing model folder":
        args["--model"] = tmp_path / "no_such_model"
    elif case == "folder without config.json":
        args["--model"] = tmp_path / "empty"
    elif case == "not a MACRL model":
        args["--model"] = _not_macrl_folder(tmp_path)
    elif case == "bad extension":
        args["--output"] = tmp_path / "feats.csv"
    elif case == "unwritable output folder":
        args["--output"] = tmp_path / "a_file" / "feats.safetensors"  # its "folder" is a file
    elif case == "unknown pool":
        extra = ["--pool", "max"]
    elif case == "unknown dtype":
        extra = ["--dtype", "fp8"]
    elif case == "zero batch size":
        extra = ["--batch-size", "0"]
    code, _, err = _run(capsys, *[str(x) for pair in args.items() for x in pair], *extra)
    assert code == 2
    assert message in err and err.startswith("macrl-extract: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "feats.safetensors").exists()


def test_cli_error_in_a_real_process_has_no_traceback(tiny_encoder_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    completed = subprocess.run(
        [sys.executable, "-m", "macrl.extract", "--model", tiny_encoder_folder, "--data", tmp_path / "empty",
         "--output", tmp_path / "f.safetensors"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("macrl-extract: error: --data")
    assert "No image files found" in completed.stderr and "Traceback" not in completed.stderr


def test_help_documents_every_flag_with_its_default(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for flag in ("--model", "--revision", "--data", "--split", "--image-column", "--label-column", "--output",
                 "--pool", "--batch-size", "--device", "--dtype", "--num-workers", "--skip-unreadable"):
        assert flag in text, flag
    for default in ("(default: 64)", "(default: auto)", "(default: fp32)", "(default: 0)", "(default: train)",
                    "default: the model's config.pooling"):
        assert default in text, default
