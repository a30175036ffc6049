"""`--gradient-checkpointing` in fine-tuning (`macrl-eval`, `finetune`) and pre-training (`macrl-pretrain`): it reaches
the model's blocks and trains as the run without it does; and `benchmarks/gradient_checkpointing.py` prints its table.
No timings: what it saves and costs is the benchmark's (benchmarks/results/gradient-checkpointing.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from macrl import MACRLForImageClassification, MACRLImageProcessor
from macrl.data import FashionMNISTSource, limit_source
from macrl.evaluation.finetune import build_finetune_trainer, is_checkpointing
from macrl.pretrain import main as pretrain

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sources():
    return limit_source(FashionMNISTSource("train"), 128, seed=0), None


def test_fine_tuning_with_it_reaches_the_model_and_trains_alike(tiny_encoder_folder, sources, tmp_path):
    """The same seeded fine-tuning with and without checkpointing: the flag reaches every block, and the logged losses
    and the trained weights are the same."""
    train, test = sources
    processor = MACRLImageProcessor.from_pretrained(tiny_encoder_folder)
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same new classifier
        model = MACRLForImageClassification.from_pretrained(tiny_encoder_folder, num_labels=10)
        trainer = build_finetune_trainer(
            model, processor, train, None, output_dir=tmp_path / str(checkpointing), batch_size=32, lr=2e-3,
            max_steps=4, logging_steps=1, seed=0, gradient_checkpointing=checkpointing,
        )
        trainer.train()
        assert is_checkpointing(trainer.model) is checkpointing
        assert all(block.gradient_checkpointing is checkpointing for block in trainer.model.macrl.blocks)
        losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
        runs[checkpointing] = losses, trainer.model.state_dict()
    (plain_losses, plain), (checkpointed_losses, checkpointed) = runs[False], runs[True]
    assert len(plain_losses) == 4 and checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_pre_training_with_it_reaches_the_model_and_trains_alike(tmp_path):
    args = ["--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--limit-images", "64", "--logging-steps",
            "1", "--max-steps", "3", "--no-knn"]  # fmt: skip
    assert pretrain([*args, "--output-dir", str(tmp_path / "plain")]) == 0
    assert pretrain([*args, "--output-dir", str(tmp_path / "checkpointed"), "--gradient-checkpointing"]) == 0
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("plain", "checkpointed")}
    assert results["plain"]["gradient_checkpointing"] is False and results["checkpointed"]["gradient_checkpointing"] is True
    logs = {run: [json.loads(line) for line in (tmp_path / run / "logs" / "train_log.jsonl").read_text().splitlines()]
            for run in ("plain", "checkpointed")}  # fmt: skip
    for key in ("loss", "grad_norm"):  # the encoder's gradient norm at every step
        assert [r[key] for r in logs["checkpointed"]] == pytest.approx([r[key] for r in logs["plain"]], rel=1e-4), key
    plain, checkpointed = (load_file(tmp_path / run / "model.safetensors") for run in ("plain", "checkpointed"))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # four fresh processes for the memory, each importing torch and transformers
def test_the_benchmark_prints_its_table():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gradient_checkpointing.py"), "--preset", "tiny", "--batch", "8",
         "--repeats", "1"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = re.findall(r"^\| (pre-training|fine-tuning) \| (off|on) \| (\d+) \| (-?\d+%|) \| ([\d.]+) \| ([\d.x]*) \|$",
                      done.stdout, re.M)
    assert [(task, flag) for task, flag, *_ in rows] == [
        ("pre-training", "off"), ("pre-training", "on"), ("fine-tuning", "off"), ("fine-tuning", "on")
    ], done.stdout
    assert all(int(memory) > 0 for _, _, memory, *_ in rows) and "machine: " in done.stdout
