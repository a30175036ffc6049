"""Model cards: the Hub reads their front matter, they describe the config, and their code examples run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult, HfApi, ModelCard

from macrl import MACRLModel
from macrl import model_card as model_card_module
from macrl.model_card import CARD_TAGS, render_model_card, template_text, write_model_card
from tests.tiny_models import save_tiny_encoder


REPO_ID = "tester/macrl-tiny"
TRAINING = {
    "dataset": "Fashion-MNIST",
    "num_images": 60000,
    "epochs": 3,
    "batch_size": 256,
    "lr": 1.5e-4,
    "minutes": 7.5,
    "hardware": "2 CPU cores",
    "steps": None,  # not known: must be left out
    "seed": 0,  # not a known key: listed under its own name
}
EVALUATION = {
    "dataset_name": "Fashion-MNIST",
    "dataset_type": "fashion_mnist",
    "split": "test",
    "metrics": {"knn_accuracy": 0.8312, "linear_probe_accuracy": 0.8507, "knn_k": 20},
}
SUBPROCESS_TIMEOUT = 240


def _section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a markdown document."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.M | re.S)


def _timm_parameter_count(model: MACRLModel) -> int:
    """Parameters as timm counts them: the fixed position embedding (a buffer in MACRL) included."""
    return model.num_parameters() + model.pos_embed.numel()


def test_front_matter_loads_with_huggingface_hub(tiny_config):
    text = render_model_card(
        tiny_config(), repo_id=REPO_ID, training=TRAINING, evaluation=EVALUATION, datasets=["fashion_mnist"]
    )
    card = ModelCard(text)
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert card.data.tags == CARD_TAGS and card.data.datasets == ["fashion_mnist"]
    assert card.data.model_name == "macrl-tiny"
    expected = [("kNN accuracy", 0.8312), ("Linear-probe accuracy", 0.8507)]  # knn_k is no accuracy: table only
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == expected
    for result in card.data.eval_results:
        assert isinstance(result, EvalResult)
        assert (result.task_type, result.metric_type) == ("image-classification", "accuracy")
        assert (result.dataset_type, result.dataset_name, result.dataset_split) == ("fashion_mnist", "Fashion-MNIST", "test")
    evaluation = _section(text, "Evaluation")
    assert "Fashion-MNIST (test split)" in evaluation
    for row in ("| kNN accuracy | 0.8312 |", "| Linear-probe accuracy | 0.8507 |", "| Knn k | 20 |"):
        assert row in evaluation


def test_card_describes_the_config_and_the_training_run(tiny_config):
    config = tiny_config(pooling="mean", mask_ratio=0.6, momentum_mask_ratio=0.25, temperature=0.1)
    text = render_model_card(config, repo_id=REPO_ID, training=TRAINING)
    parameters = _timm_parameter_count(MACRLModel(config))  # the analytic count must match the real model
    description = _section(text, "Model description")
    for fact in (
        "| Input | 28 × 28 pixels, 1 channel |",
        "| Patch size | 4 × 4 (49 patches + 1 CLS token) |",
        "| Width (hidden size) | 32 |",
        "| Depth (blocks) | 2 |",
        "| Attention heads | 2 |",
        f"| Parameters | {parameters:,} |",
        "| Pooled feature (`pooler_output`) | the mean of the patch tokens |",
        "| Reconstruction loss | L1 on the pixels of the masked patches |",
        "temperature 0.1",
        "| Mask ratio, main branch | 60% |",
        "| Mask ratio, momentum branch | 25% |",
        "| EMA momentum | 0.99 ",
    ):
        assert fact in description, fact
    procedure = _section(text, "Training procedure")
    for row in ("| Training images | 60,000 |", "| Learning rate | 0.00015 |", "| Training time (minutes) | 7.5 |",
                "| Hardware | 2 CPU cores |", "| Seed | 0 |"):
        assert row in procedure, row
    assert "Optimizer steps" not in procedure  # given as None
    assert "Pre-trained on Fashion-MNIST (60,000 images)" in _section(text, "Training data")
    assert "eprint        = {2211.06012}" in _section(text, "Citation")


def test_card_without_training_or_results_has_no_model_index(tiny_config):
    text = render_model_card(tiny_config(qkv_bias=False), license="mit")
    card = ModelCard(text)
    assert card.data.eval_results is None and "model-index" not in text and card.data.license == "mit"
    assert "No evaluation results were recorded" in _section(text, "Evaluation")
    assert "was not recorded" in _section(text, "Training procedure")
    assert f"{_timm_parameter_count(MACRLModel(tiny_config(qkv_bias=False))):,}" in text
    assert model_card_module.PLACEHOLDER_REPO_ID in _section(text, "How to use")


def test_malformed_evaluation_is_rejected(tiny_config):
    with pytest.raises(ValueError, match="unknown keys.*'splits'"):
        render_model_card(tiny_config(), evaluation={**EVALUATION, "splits": "test"})
    with pytest.raises(ValueError, match="no dataset"):
        render_model_card(tiny_config(), evaluation={"metrics": {"knn_accuracy": 0.5}})
    with pytest.raises(ValueError, match="non-empty"):
        render_model_card(tiny_config(), evaluation={"dataset_name": "x", "metrics": {}})


def test_template_falls_back_to_the_checkout(monkeypatch):
    packaged = template_text()

    def missing_package(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(model_card_module.importlib.resources, "files", missing_package)
    assert template_text() == packaged and packaged.startswith("---\n{{ card_data }}\n---")


def test_write_model_card_never_clobbers(tmp_path):
    assert write_model_card(tmp_path, "first") is True
    assert write_model_card(tmp_path, "second") is False
    assert (tmp_path / "README.md").read_text() == "first"
    assert write_model_card(tmp_path, "third", overwrite=True) is True
    assert (tmp_path / "README.md").read_text() == "third"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        write_model_card(tmp_path / "missing", "x")


def _upload(folder: Path, repo_id: str) -> None:
    api = HfApi()  # the hub_server fixture points it at the loopback Hub
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder)


def check_timm_features(namespace: dict, folder: Path, config) -> None:
    """The timm model a card's code built gives the saved MACRLModel's pooled features."""
    reference = MACRLModel.from_pretrained(folder).eval()
    pixels = torch.randn(3, config.num_channels, config.image_size, config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](pixels), reference(pixels).pooler_output, rtol=1e-5, atol=1e-5)


# Runs each code block of the card in a fresh namespace, then checks the timm block's features (macrl importable).
RUN_WITH_MACRL = """
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_model_card import check_timm_features
from macrl import MACRLConfig
blocks, folder = json.loads(Path({blocks!r}).read_text()), Path({folder!r})
for block in blocks:
    namespace = {{"__name__": "__main__"}}
    exec(compile(block, "<model card>", "exec"), namespace)
check_timm_features(namespace, folder, MACRLConfig.from_pretrained(folder))  # the last block is timm's
"""
RUN_WITHOUT_MACRL = """
import sys
sys.modules["macrl"] = None  # any `import macrl` raises ImportError
import json
from pathlib import Path
namespace = {{"__name__": "__main__"}}
exec(compile(json.loads(Path({blocks!r}).read_text())[0], "<model card>", "exec"), namespace)
assert "transformers_modules" in type(namespace["model"]).__module__, type(namespace["model"]).__module__
"""


def test_how_to_use_code_runs(hub_server, tiny_config, tmp_path):
    """The card's examples run as written against the repo on a loopback Hub (timm's needs hf_hub_download)."""
    config = tiny_config()
    folder = tmp_path / "encoder"
    save_tiny_encoder(folder, config)
    _upload(folder, REPO_ID)
    blocks = _python_blocks(_section(render_model_card(config, repo_id=REPO_ID), "How to use"))
    remote = [b for b in blocks if "trust_remote_code=True" in b and "import macrl" not in b]
    local = [b for b in blocks if b not in remote]
    assert len(remote) == 1 and len(local) == 3 and "timm.create_model" in local[-1]

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}  # the fixture's endpoint, token and cache, own modules
    runs = {}
    for name, script, snippets in (("with macrl", RUN_WITH_MACRL, local), ("without macrl", RUN_WITHOUT_MACRL, remote)):
        blocks_file = tmp_path / f"{name.replace(' ', '_')}.json"
        blocks_file.write_text(json.dumps(snippets))
        code = textwrap.dedent(script).format(root=str(Path(__file__).parents[1]), blocks=str(blocks_file), folder=str(folder))
        # both interpreters start at once: most of their time is importing torch and transformers
        runs[name] = subprocess.Popen(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for name, process in runs.items():
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert process.returncode == 0, f"{name}:\n{stderr[-4000:]}"
        runs[name] = stdout.splitlines()
    assert runs["with macrl"] == ["torch.Size([1, 32]) torch.Size([1, 50, 32])", "32", "torch.Size([1, 32])"]
    assert runs["without macrl"] == ["torch.Size([1, 32])"]


def test_timm_code_matches_every_architecture_option(hub_server, tiny_config, tmp_path):
    """Mean pooling, no qkv bias, another activation and LayerNorm epsilon all reach timm's keyword arguments."""
    config = tiny_config(pooling="mean", qkv_bias=False, hidden_act="gelu_tanh", layer_norm_eps=1e-5)
    folder = tmp_path / "encoder"
    save_tiny_encoder(folder, config)
    repo_id = "tester/macrl-mean"
    _upload(folder, repo_id)
    timm_block = _python_blocks(_section(render_model_card(config, repo_id=repo_id), "How to use"))[-1]
    for argument in ("global_pool='avg'", "fc_norm=False", "qkv_bias=False", "act_layer='gelu_tanh'", "eps=1e-05"):
        assert argument in timm_block, argument
    namespace = {"__name__": "__main__"}
    exec(compile(timm_block, "<model card>", "exec"), namespace)
    check_timm_features(namespace, folder, config)
