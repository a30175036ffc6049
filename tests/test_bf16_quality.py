"""bf16 feature extraction keeps the features of fp32 on real Fashion-MNIST images, and `benchmarks/speed.py --quick`
prints its table (no timing is asserted: the speeds depend on the machine and its load)."""

from __future__ import annotations

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


def _features(model: MACRLModel, pixels: torch.Tensor, bf16: bool, batch_size: int = 250) -> torch.Tensor:
    """Pooled features as float32, computed in fp32 or under CPU bf16 autocast (as `macrl-extract --dtype bf16`)."""
    model.eval()
    chunks = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, pixels.shape[0], batch_size):
            chunks.append(model(pixels[start : start + batch_size]).pooler_output.float())
    return torch.cat(chunks)


def _small_config(**overrides):
    # the fmnist preset's width (192, 3 heads, patch 4 on 28 px) with 2 of its 6 blocks: runs in seconds
    return load_config("fmnist", patch_size=4, num_hidden_layers=2, **overrides)


@pytest.fixture(scope="module")
def pretrained_features(fashion_split):
    """fp32 and bf16 features of an encoder pre-trained for 8 MACRL steps (reconstruction + contrast) on bank
    images, with mean pooling (timm's `global_pool='avg'`)."""
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
    encoder = model.macrl
    return _features(encoder, pixels, bf16=False), _features(encoder, pixels, bf16=True)


def _assert_close_features(fp32: torch.Tensor, bf16: torch.Tensor) -> None:
    assert fp32.shape == bf16.shape
    assert torch.isfinite(bf16).all()
    cosine = F.cosine_similarity(fp32, bf16, dim=1)  # [N]
    assert cosine.mean() >= 0.999, f"mean cosine {cosine.mean():.6f}, min {cosine.min():.6f}"
    assert cosine.min() >= 0.99, f"min cosine {cosine.min():.6f}"


def test_bf16_features_match_fp32_random_init(fashion_split):
    pixels, _ = fashion_split
    torch.manual_seed(0)
    model = MACRLModel(_small_config())  # CLS pooling, the default
    subset = pixels[:NUM_BANK]
    fp32, bf16 = _features(model, subset, bf16=False), _features(model, subset, bf16=True)
    assert fp32.shape == (NUM_BANK, 192)
    _assert_close_features(fp32, bf16)


def test_bf16_features_match_fp32_briefly_pretrained(pretrained_features):
    _assert_close_features(*pretrained_features)


def test_bf16_knn_accuracy_matches_fp32(fashion_split, pretrained_features):
    _, labels = fashion_split

    def knn(features: torch.Tensor) -> float:
        bank, queries = features[:NUM_BANK], features[NUM_BANK:]
        return knn_accuracy(bank, labels[:NUM_BANK], queries, labels[NUM_BANK:], num_classes=10)

    accuracy_fp32, accuracy_bf16 = (knn(features) for features in pretrained_features)
    assert accuracy_fp32 > 30.0, accuracy_fp32  # the features carry the classes at all (chance is 10%)
    assert abs(accuracy_bf16 - accuracy_fp32) <= 0.2 + 1e-3, (accuracy_fp32, accuracy_bf16)


# about 15 s on 2 cores: every case of the table at tiny sizes, each memory figure in its own process
def test_speed_benchmark_quick_prints_the_table():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--quick"],
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
        "MACRLModel bf16",
        "timm ViT bf16",
    }
    assert set(rows) == expected_cases, out
    for case, cells in rows.items():
        assert cells[3] == "8", cells  # the same batch for every case
        milliseconds, images_per_second = float(cells[4]), float(cells[5])
        assert milliseconds > 0 and images_per_second > 0, cells
        if case in ("MACRL", "ViTMAEForPreTraining", "MACRL MoCo-v3 mode", "MACRL MAE mode"):
            assert float(cells[6]) > 0, cells  # peak memory of the pretraining step, in MB
    # every target has a verdict, one line per check
    verdicts = re.findall(r"(<=|>=)\d+\.\d\dx\s+(PASS|FAIL)", out)
    assert len(verdicts) == 6, out
    assert re.search(r"step time / ViTMAE\s+\d+\.\d\dx\s+<=1\.90x", out)
    assert re.search(r"step time / MoCo-v3 mode\s+\d+\.\d\dx\s+<=0\.30x", out)
    assert re.search(r"img/s / timm fp32\s+\d+\.\d\dx\s+>=3\.00x", out)
    assert re.search(r"^targets: \d+ PASS, \d+ FAIL$", out, re.M)
