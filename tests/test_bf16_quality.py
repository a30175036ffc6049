"""Every fast extraction path (bf16 autocast, bf16 weights, torch.compile in fp32 and with bf16 weights) keeps the
features of fp32 eager on real Fashion-MNIST images, and `benchmarks/speed.py --quick` prints its table (no timing is
asserted: the speeds depend on the machine and its load)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from macrl import MACRLForPreTraining, MACRLModel
from macrl.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from macrl.evaluation.knn import knn_accuracy
from macrl.feature_extraction import inference_precision, prepare_for_inference
from macrl.precision import cpu_runs_bf16_fast
from macrl.presets import load_config

REPO = Path(__file__).resolve().parents[1]
# From the test split: a kNN memory bank, then the queries. 2000 queries, not 500: on 500 a single changed prediction
# is already 0.2 points, and the neighbour ranking of a briefly trained encoder is so flat (the 20th and 21st
# neighbours of a query differ by ~1e-4 in cosine) that ANY perturbation of bf16's size (~0.1-0.6% of a feature's
# norm; a random one in fp32 does the same) changes 0.5-2% of the predictions, and the net accuracy change on 500
# queries then moves by +-0.2-0.4 points from noise alone. 2000 queries resolve 0.05 points.
NUM_BANK, NUM_QUERIES = 2000, 2000


@pytest.fixture(scope="module")
def fashion_split():
    images, labels = load_fashion_mnist("test")
    count = NUM_BANK + NUM_QUERIES
    pixels = images[:count].float().div(255).sub(FASHION_MNIST_MEAN[0]).div(FASHION_MNIST_STD[0]).unsqueeze(1)
    return pixels, labels[:count]  # [N, 1, 28, 28], [N]


# the paths: fp32 eager (the reference), bf16 autocast on float32 weights (`--dtype bf16` before the weights were
# cast), and the package's own `prepare_for_inference` (`--dtype bf16`: cast weights where the CPU has the kernels;
# `--compile`)
FAST_PATHS = ("bf16 autocast", "bf16", "fp32 compiled", "bf16 compiled")
EAGER_PATHS = ("fp32", "bf16 autocast", "bf16")


def _features(model: MACRLModel, pixels: torch.Tensor, path: str, batch_size: int = 250) -> torch.Tensor:
    """Pooled features as float32, computed on a copy of `model` the way `path` says."""
    model = copy.deepcopy(model).eval()
    if path == "bf16 autocast":
        model_dtype, context = torch.float32, torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        dtype = "bf16" if path.startswith("bf16") else "fp32"
        model = prepare_for_inference(model, "cpu", dtype, compile=path.endswith("compiled"))
        precision = inference_precision("cpu", dtype)
        model_dtype, context = precision.weights, precision.context(torch.device("cpu"))
    chunks = []
    with torch.inference_mode(), context:
        for start in range(0, pixels.shape[0], batch_size):
            chunks.append(model(pixels[start : start + batch_size].to(model_dtype)).pooler_output.float())
    return torch.cat(chunks)


def _small_config(**overrides):
    # the fmnist preset's width (192, 3 heads, patch 4 on 28 px) with 2 of its 4 blocks: runs in seconds. The decoder
    # is pinned at 2 blocks so the encoder these tests probe (and its few near-tie kNN queries) stays the one the
    # tolerances were set on when the preset's decoder changes
    return load_config("fmnist", patch_size=4, num_hidden_layers=2, decoder_num_hidden_layers=2, **overrides)


@pytest.fixture(scope="module")
def pretrained_encoder(fashion_split):
    """An encoder pre-trained for 8 MACRL steps (reconstruction + contrast) on bank images, with mean pooling (timm's
    `global_pool='avg'`)."""
    pixels, _ = fashion_split
    torch.manual_seed(0)
    model = MACRLForPreTraining(_small_config(pooling="mean")).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for step in range(8):
        batch = pixels[step * 64 : (step + 1) * 64]
        loss = model(batch, batch.flip(-1)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_momentum_branch(step / 8)
    return model.macrl


@pytest.fixture(scope="module")
def pretrained_features(fashion_split, pretrained_encoder):
    """Features of every path, computed on first use: {path: [N, D]}."""
    pixels, _ = fashion_split
    cache: dict[str, torch.Tensor] = {}

    def features(path: str) -> torch.Tensor:
        if path not in cache:
            cache[path] = _features(pretrained_encoder, pixels, path)
        return cache[path]

    return features


def _assert_close_features(fp32: torch.Tensor, bf16: torch.Tensor) -> None:
    assert fp32.shape == bf16.shape
    assert torch.isfinite(bf16).all()
    cosine = F.cosine_similarity(fp32, bf16, dim=1)  # [N]
    assert cosine.mean() >= 0.999, f"mean cosine {cosine.mean():.6f}, min {cosine.min():.6f}"
    assert cosine.min() >= 0.99, f"min cosine {cosine.min():.6f}"


def _slow_if_compiled(paths):
    # torch.compile takes tens of seconds on 2 cores: the compiled paths run with `pytest -m slow`
    return [pytest.param(path, marks=pytest.mark.slow) if "compiled" in path else path for path in paths]


@pytest.mark.parametrize("path", _slow_if_compiled(FAST_PATHS))
def test_fast_features_match_fp32_random_init(fashion_split, path):
    pixels, _ = fashion_split
    torch.manual_seed(0)
    model = MACRLModel(_small_config())  # CLS pooling, the default
    subset = pixels[:NUM_BANK]
    fp32, fast = _features(model, subset, "fp32"), _features(model, subset, path)
    assert fp32.shape == (NUM_BANK, 192)
    _assert_close_features(fp32, fast)


def test_bf16_weights_are_cast_where_the_cpu_has_kernels_but_the_final_norm(pretrained_encoder):
    model = prepare_for_inference(copy.deepcopy(pretrained_encoder), "cpu", "bf16")
    expected = torch.bfloat16 if cpu_runs_bf16_fast() else torch.float32
    dtypes = {name: tensor.dtype for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    assert {dtypes.pop("norm.weight"), dtypes.pop("norm.bias")} == {torch.float32}
    assert set(dtypes.values()) == {expected}
    with torch.inference_mode():
        output = model(torch.zeros(2, 1, 28, 28, dtype=expected))
    assert output.pooler_output.dtype == output.last_hidden_state.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_model_loaded_in_half_precision_keeps_its_final_norm_float32_and_its_heads_run(
    pretrained_encoder, tmp_path, dtype
):
    from macrl import MACRLBackbone, MACRLForImageClassification

    pretrained_encoder.save_pretrained(tmp_path / "encoder")
    pixels = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(dtype)
    model = MACRLModel.from_pretrained(tmp_path / "encoder", dtype=dtype)
    assert model.norm.weight.dtype == torch.float32 and model.blocks[0].norm1.weight.dtype == dtype
    output = model(pixels)
    assert output.pooler_output.dtype == torch.float32 and torch.isfinite(output.pooler_output).all()
    classifier = MACRLForImageClassification.from_pretrained(tmp_path / "encoder", dtype=dtype, num_labels=3)
    assert classifier(pixels).logits.dtype == dtype
    backbone = MACRLBackbone.from_pretrained(tmp_path / "encoder", dtype=dtype, out_indices=[1, 2])
    assert {feature_map.dtype for feature_map in backbone(pixels).feature_maps} == {dtype}
    pretraining = MACRLForPreTraining.from_pretrained(tmp_path / "encoder", dtype=dtype)
    assert pretraining.macrl.norm.weight.dtype == torch.float32
    assert torch.isfinite(pretraining(pixels, pixels).loss)  # the decoder and the projector take the float32 tokens


@pytest.mark.parametrize("path", _slow_if_compiled(FAST_PATHS))
def test_fast_features_match_fp32_briefly_pretrained(pretrained_features, path):
    _assert_close_features(pretrained_features("fp32"), pretrained_features(path))


# bf16 weights throughout, the final norm included, moved kNN by 0.25 points on this encoder (5 net queries of 2000)
# at a mean cosine of 0.999996; with that norm in float32 (`prepare_for_inference`) the move is gone
# (benchmarks/results/extraction-speed.md)
_KNN_PATHS = _slow_if_compiled(FAST_PATHS)


@pytest.mark.parametrize("path", _KNN_PATHS)
def test_fast_knn_accuracy_matches_fp32(fashion_split, pretrained_features, path):
    _, labels = fashion_split

    def knn(features: torch.Tensor) -> float:
        bank, queries = features[:NUM_BANK], features[NUM_BANK:]
        return knn_accuracy(bank, labels[:NUM_BANK], queries, labels[NUM_BANK:], num_classes=10)

    accuracy_fp32, accuracy_fast = knn(pretrained_features("fp32")), knn(pretrained_features(path))
    assert accuracy_fp32 > 30.0, accuracy_fp32  # the features carry the classes at all (chance is 10%)
    assert abs(accuracy_fast - accuracy_fp32) <= 0.2 + 1e-3, (path, accuracy_fp32, accuracy_fast)


def _cpu_kind() -> str:
    flags = set(re.findall(r"\w+", Path("/proc/cpuinfo").read_text())) if Path("/proc/cpuinfo").exists() else set()
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"


# about 15 s on 2 cores without the compiled cases: every other case of the table at tiny sizes, each memory figure
# in its own process; with them (`pytest -m slow`), minutes of compiling
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["no-compile", "all"])
def test_speed_benchmark_quick_prints_the_table(compiled):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--quick", *([] if compiled else ["--no-compile"])],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^machine: .+cores.+torch threads", out, re.M), out
    assert f"torch {torch.__version__}" in out

    lines = out.splitlines()
    header = next(line for line in lines if re.match(r"size\s+task\s+case", line))
    columns = re.split(r"\s{2,}", header.strip())
    assert columns == [
        "size",
        "task",
        "case",
        "batch",
        "ms/step",
        "img/s",
        "peak MB",
        "check",
        "ratio",
        "target",
        "result",
        "bf16 img/s",
        "compile img/s",
    ]
    rows = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.strip():
            break
        if line.startswith("quick "):
            cells = re.split(r"\s{2,}", line.strip())
            rows[cells[2]] = cells
    expected_cases = {
        "MACRL",
        "ViTMAEForPreTraining",
        "MACRL MoCo-v3 mode",
        "MACRL MAE mode",
        "MACRL bf16 autocast",
        "MACRL bf16 momentum fwd",
        "MACRLModel fp32",
        "timm ViT fp32",
        "transformers ViTModel fp32",
        "MACRLModel bf16 autocast",
        "timm ViT bf16 autocast",
        "MACRLModel bf16",
        "timm ViT bf16",
    }
    compiled_cases = {
        "MACRL bf16 compiled momentum fwd",
        "MACRL bf16 compiled",
        "MACRL compiled",
        "MACRLModel fp32 compiled",
        "timm ViT fp32 compiled",
        "MACRLModel bf16 compiled",
        "timm ViT bf16 compiled",
    }
    assert set(rows) == expected_cases | (compiled_cases if compiled else set()), out
    kind = _cpu_kind()
    assert {"amx": "(AMX)", "avx512_bf16": "(AVX512-BF16 (no AMX))", "none": "(neither AMX nor AVX512-BF16)"}[kind] in out
    for case, cells in rows.items():
        assert cells[3] == "8", cells  # the same batch for every case
        milliseconds, images_per_second = float(cells[4]), float(cells[5])
        assert milliseconds > 0 and images_per_second > 0, cells
        if case in ("MACRL", "ViTMAEForPreTraining", "MACRL MoCo-v3 mode", "MACRL MAE mode"):
            assert float(cells[6]) > 0, cells  # peak memory of the pretraining step, in MB
    # every target has a verdict, one line per check; the bf16 targets only on CPUs with bf16 units
    verdicts = re.findall(r"(<=|>=)\d+\.\d\dx\s+(PASS|FAIL)", out)
    expected = 5 + (kind == "amx") + (1 + (kind != "none") if compiled else 0)
    assert len(verdicts) == expected, out
    assert re.search(r"step time / ViTMAE\s+\d+\.\d\dx\s+<=1\.90x", out)
    assert re.search(r"step time / MoCo-v3 mode\s+\d+\.\d\dx\s+<=0\.30x", out)
    if kind == "amx":
        assert re.search(r"img/s / timm fp32\s+\d+\.\d\dx\s+>=3\.00x", out)
    if compiled:
        assert re.search(r"img/s / timm fp32\s+\d+\.\d\dx\s+>=1\.10x", out)
        assert "compile time (first call of each compiled case" in out
    assert re.search(r"^targets: \d+ PASS, \d+ FAIL$", out, re.M)
