"""Model cards (README.md with Hub metadata) for MACRL encoders, rendered from `model_cards/macrl_encoder.md`.

The front matter is built with `huggingface_hub.ModelCardData`, so the Hub reads the library, pipeline tag, tags,
datasets and (when results are given) a `model-index` with the kNN / linear-probe accuracies. The body describes the
encoder from its `MACRLConfig`, the training run and evaluation the caller passes, and shows code that loads it with
`macrl`, with `trust_remote_code=True`, as a pipeline and in timm. `update_model_card` (`macrl-eval --update-card`)
re-renders an existing card with new results, keeping what the config does not say (repo id, training rows).
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_macrl import MACRLConfig
from .timm_layout import TIMM_LAYER_NORM_EPS, timm_vit_defaults, timm_vit_kwargs

TEMPLATE_NAME = "macrl_encoder.md"
CARD_TAGS = [
    "macrl",
    "self-supervised",
    "vision-transformer",
    "masked-image-modeling",
    "contrastive-learning",
    "image-feature-extraction",
]
PLACEHOLDER_REPO_ID = "your-namespace/macrl-encoder"

# `training` keys with a label of their own, in the order the card lists them; other keys are listed after them
TRAINING_LABELS = {
    "dataset": "Dataset",
    "num_images": "Training images",
    "epochs": "Epochs",
    "steps": "Optimizer steps",
    "batch_size": "Batch size",
    "learning_rate": "Learning rate",
    "lr": "Learning rate",
    "weight_decay": "Weight decay",
    "optimizer": "Optimizer",
    "minutes": "Training time (minutes)",
    "hardware": "Hardware",
}
# `evaluation` keys; anything else is a typo the caller wants to hear about
EVALUATION_KEYS = ("dataset_name", "dataset_type", "split", "metrics")
METRIC_LABELS = {"knn_accuracy": "kNN accuracy", "linear_probe_accuracy": "Linear-probe accuracy"}
# an encoder's frozen-feature accuracies under the main job's names: all the labels, a fraction of them (`_1pct`), or
# DINOv2's linear protocol (`_dinov2`); these go into the model-index
ACCURACY_METRIC = re.compile(r"^(knn_accuracy|linear_probe_accuracy)(?:_(dinov2|[0-9.]+pct))?$")
# the timm arguments a card always shows, defaults or not: they say what the model is
_TIMM_SIZE_ARGUMENTS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")


def template_text() -> str:
    """The Jinja2 card template: packaged as `macrl.model_cards`, or the checkout's `model_cards/` folder."""
    try:
        return (importlib.resources.files("macrl.model_cards") / TEMPLATE_NAME).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # an editable install from a checkout whose pyproject does not map `macrl.model_cards` yet
        return (Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE_NAME).read_text(encoding="utf-8")


def encoder_parameter_count(config: MACRLConfig) -> int:
    """Number of parameters of `MACRLModel(config)` (the fixed position embedding included), without building it."""
    width, mlp = config.hidden_size, config.intermediate_size
    patch_embed = config.num_channels * config.patch_size**2 * width + width
    tokens = width + (config.num_patches + 1) * width  # CLS token + position embedding
    attention = 3 * width * width + (3 * width if config.qkv_bias else 0) + width * width + width
    block = attention + (width * mlp + mlp) + (mlp * width + width) + 2 * (2 * width)  # + two LayerNorms
    return patch_embed + tokens + config.num_hidden_layers * block + 2 * width  # + final LayerNorm


def timm_model_kwargs(config: MACRLConfig) -> dict[str, str]:
    """`timm.create_model` keyword arguments (as Python source) that rebuild this encoder in timm: the sizes, and
    whatever else differs from timm's defaults."""
    defaults = timm_vit_defaults()
    kwargs = {
        name: repr(value)
        for name, value in timm_vit_kwargs(config).items()
        if name in _TIMM_SIZE_ARGUMENTS or value != defaults.get(name)
    }
    if config.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        kwargs["norm_layer"] = f"functools.partial(torch.nn.LayerNorm, eps={config.layer_norm_eps!r})"
    kwargs["num_classes"] = kwargs.pop("num_classes")  # last, beside its comment in the template
    return kwargs


def _number(value) -> str:
    """Integers with thousands separators, floats in short form, anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _parameter_count_text(count: int) -> str:
    return f"{count:,} ({count / 1e6:.1f} M)" if count >= 1e6 else f"{count:,}"


def _encoder_facts(config: MACRLConfig) -> dict:
    pooling = "the CLS token" if config.pooling == "cls" else "the mean of the patch tokens"
    return {
        "image_size": config.image_size,
        "num_channels": config.num_channels,
        "patch_size": config.patch_size,
        "num_patches": config.num_patches,
        "hidden_size": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "mlp_ratio": f"{config.intermediate_size / config.hidden_size:g}",
        "hidden_act": config.hidden_act,
        "parameters": _parameter_count_text(encoder_parameter_count(config)),
        "pooling": pooling,
    }


def _objective_facts(config: MACRLConfig) -> dict:
    loss_name = config.reconstruction_loss.upper()
    target = "per-patch normalised pixels" if config.norm_pix_loss else "pixels"
    return {
        "reconstruction_loss_name": loss_name,
        "reconstruction_loss": f"{loss_name} on the {target} of the masked patches",
        "reconstruction_weight": _number(config.reconstruction_weight),
        "contrastive_weight": _number(config.contrastive_weight),
        "temperature": _number(config.temperature),
        "symmetric_loss": config.symmetric_loss,
        "mask_ratio": _percent(config.mask_ratio),
        "momentum_mask_ratio": _percent(config.momentum_mask_ratio),
        "momentum": _number(config.momentum),
        "queue_size": config.queue_size,
        "decoder_hidden_size": config.decoder_hidden_size,
        "decoder_depth": config.decoder_num_hidden_layers,
        "decoder_num_heads": config.decoder_num_attention_heads,
        "projector": f"{config.projector_num_layers}-layer MLP, hidden {config.projector_hidden_size}, "
        f"output {config.projection_dim}",
        "predictor": f"{config.predictor_num_layers}-layer MLP, hidden {config.predictor_hidden_size}, "
        f"output {config.projection_dim}",
    }


def _training_rows(training: Mapping) -> list[tuple[str, str]]:
    """(label, value) rows for the given, non-None training facts: the known keys first, then the others."""
    given = {key: value for key, value in training.items() if value is not None}
    known = [(TRAINING_LABELS[key], _number(given[key])) for key in TRAINING_LABELS if key in given]
    other = [(key.replace("_", " ").capitalize(), _number(value)) for key, value in given.items() if key not in TRAINING_LABELS]
    return known + other


def _metric_label(name: str) -> str:
    """`knn_accuracy` -> "kNN accuracy", `knn_accuracy_1pct` -> "kNN accuracy (1% of the labels)",
    `linear_probe_accuracy_dinov2` -> "Linear-probe accuracy (DINOv2 protocol)"; other names as words."""
    if not (match := ACCURACY_METRIC.match(name)):
        return METRIC_LABELS.get(name, name.replace("_", " ").capitalize())
    probe, variant = match.groups()
    if variant == "dinov2":
        return f"{METRIC_LABELS[probe]} (DINOv2 protocol)"
    return f"{METRIC_LABELS[probe]} ({variant[:-3]}% of the labels)" if variant else METRIC_LABELS[probe]


def accuracy_metrics(accuracies: Mapping[str, Any]) -> dict[str, float]:
    """The card's metrics from percentages under the main job's names (`knn_accuracy`, `knn_accuracy_1pct`,
    `linear_probe_accuracy_dinov2`, ...): those names only, as fractions."""
    return {name: round(value / 100, 4) for name, value in accuracies.items() if ACCURACY_METRIC.match(name)}


def _eval_results(evaluation: Mapping) -> list[EvalResult]:
    """model-index entries for the accuracy metrics (kNN, linear probe, ...) of `evaluation`."""
    accuracies = {
        name: value for name, value in evaluation["metrics"].items()
        if name.endswith("accuracy") or ACCURACY_METRIC.match(name)
    }
    if not accuracies:
        return []
    dataset_type = evaluation.get("dataset_type") or evaluation.get("dataset_name")
    dataset_name = evaluation.get("dataset_name") or dataset_type
    if not dataset_type:
        raise ValueError(
            "evaluation has accuracy metrics but no dataset: give 'dataset_type' (the Hub dataset id, e.g. "
            "'fashion_mnist') and/or 'dataset_name' (e.g. 'Fashion-MNIST')"
        )
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=evaluation.get("split"),
            metric_type="accuracy",
            metric_name=_metric_label(name),
            metric_value=value,
        )
        for name, value in accuracies.items()
    ]


def _check_evaluation(evaluation: Mapping) -> None:
    unknown = sorted(set(evaluation) - set(EVALUATION_KEYS))
    if unknown:
        raise ValueError(f"evaluation has unknown keys {unknown}; allowed: {list(EVALUATION_KEYS)}")
    metrics = evaluation.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("evaluation['metrics'] must be a non-empty dict of metric name -> value")


def render_model_card(
    config: MACRLConfig,
    *,
    repo_id: str | None = None,
    training: dict | None = None,
    evaluation: dict | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
) -> str:
    """The README.md (YAML front matter + markdown) of a MACRL encoder pushed to `repo_id`.

    Args:
        config: the encoder's `MACRLConfig`; sizes, pooling and pre-training objective are read from it.
        repo_id: the Hub repository the code examples load from (a placeholder if None).
        training: facts about the pre-training run; any of `dataset`, `num_images`, `epochs`, `steps`,
            `batch_size`, `learning_rate` (or `lr`), `weight_decay`, `optimizer`, `minutes`, `hardware`, plus any
            other key (listed with its name). Missing or None values are left out.
        evaluation: `{"dataset_name": "Fashion-MNIST", "dataset_type": "fashion_mnist", "split": "test",
            "metrics": {"knn_accuracy": 0.83, "linear_probe_accuracy": 0.85, "knn_accuracy_1pct": 0.76, ...}}`.
            Every metric goes into the card's table; the accuracies (names ending in `accuracy`, and the
            label-fraction and DINOv2-protocol ones, `ACCURACY_METRIC`) also into the `model-index` metadata.
        license: the license identifier of the front matter.
        datasets: Hub dataset ids of the pre-training data, for the front matter.
    """
    training = dict(training or {})
    if evaluation is not None:
        _check_evaluation(evaluation)
    model_id = repo_id or PLACEHOLDER_REPO_ID
    model_name = model_id.split("/")[-1]
    eval_results = _eval_results(evaluation) if evaluation else []
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        pipeline_tag="image-feature-extraction",
        tags=list(CARD_TAGS),
        datasets=list(datasets) if datasets else None,
        metrics=["accuracy"] if eval_results else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    num_images = training.get("num_images")
    timm_kwargs = timm_model_kwargs(config)
    card = ModelCard.from_template(
        card_data,
        template_str=template_text(),
        title=f"MACRL ViT encoder: {model_name}",
        repo_id=model_id,
        encoder=_encoder_facts(config),
        objective=_objective_facts(config),
        # the training dict names the data for people; the Hub ids stand in when it does not
        training_dataset=training.get("dataset") or ", ".join(datasets or []) or None,
        training_images=_number(num_images) if num_images is not None else None,
        dataset_links=[f"[{name}](https://huggingface.co/datasets/{name})" for name in datasets or []],
        training_rows=_training_rows(training),
        evaluation_dataset=(evaluation or {}).get("dataset_name") or (evaluation or {}).get("dataset_type"),
        evaluation_split=(evaluation or {}).get("split"),
        evaluation_rows=[(_metric_label(k), _number(v)) for k, v in (evaluation or {}).get("metrics", {}).items()],
        timm_kwargs=list(timm_kwargs.items()),
        timm_needs_functools="norm_layer" in timm_kwargs,
    )
    return str(card)


def write_model_card(folder: str | Path, text: str, overwrite: bool = False) -> bool:
    """Write `text` to `folder/README.md`, unless a README.md is there already and `overwrite` is False.

    Returns whether the file was written. A hand-edited card is never replaced by accident.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write a model card: {folder} is not a directory")
    readme = folder / "README.md"
    if readme.exists() and not overwrite:
        return False
    readme.write_text(text, encoding="utf-8")
    return True


def _existing_card_facts(folder: Path) -> dict[str, Any]:
    """What a card written by ``render_model_card`` says that the config does not: repo id, training rows,
    Hub datasets, license. Best effort: an unreadable or hand-written card gives what can be found."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        card = ModelCard.load(readme)
    except Exception:  # noqa: BLE001 - any broken card is simply replaced
        return {}
    facts: dict[str, Any] = {}
    if card.data.license:
        facts["license"] = card.data.license
    if card.data.datasets:
        facts["datasets"] = list(card.data.datasets)
    repo = re.search(r'from_pretrained\("([^"]+)"', card.text)
    if repo and repo.group(1) != PLACEHOLDER_REPO_ID:
        facts["repo_id"] = repo.group(1)
    section = re.search(r"^## Training procedure\s*$(.*?)(?=^## )", card.text, re.M | re.S)
    if section:
        keys = {}
        for key, label in TRAINING_LABELS.items():
            keys.setdefault(label, key)  # "Learning rate" -> learning_rate
        training = {}
        for label, value in re.findall(r"^\| (.+?) \| (.+?) \|\s*$", section.group(1), re.M):
            if label != "Setting":
                training[keys.get(label, label.lower().replace(" ", "_"))] = value
        if training:
            facts["training"] = training
    return facts


def card_evaluation(results: Mapping[str, Any], dataset: Mapping[str, str], pool: str) -> dict[str, Any] | None:
    """The ``evaluation`` argument of ``render_model_card``: the frozen-feature accuracies of ``pool`` (else of the
    first pool evaluated) as fractions, as ``macrl-pretrain`` writes them, and the number of test images.

    The fine-tuning accuracy is left out: the card presents its results as frozen-feature ones."""
    used = pool if any(key.endswith(f"_{pool}") for key in results) else (results.get("pools") or [pool])[0]
    # macrl-eval's names (`knn_accuracy_cls_1pct`) without the pooling, as the main job names them
    own = re.compile(rf"^(knn_accuracy|linear_probe_accuracy)_{used}(_[0-9.]+pct)?$")
    renamed = {"".join(match.groups(default="")): value for key, value in results.items() if (match := own.match(key))}
    if "linear_probe_accuracy_dinov2" in results:
        renamed["linear_probe_accuracy_dinov2"] = results["linear_probe_accuracy_dinov2"]
    metrics: dict[str, Any] = accuracy_metrics(renamed)
    if not metrics:
        return None
    if "test_images" in results:
        metrics["test_images"] = results["test_images"]
    metrics["pooling"] = used
    return {**dataset, "metrics": metrics}


def update_model_card(folder: str | Path, config, evaluation: Mapping[str, Any]) -> Path:
    """Rewrite ``folder/README.md`` with a fresh card carrying ``evaluation`` in its ``model-index``.

    Facts of the existing card that the config does not hold (repo id, training rows, datasets, license) are kept.
    """
    folder = Path(folder)
    facts = _existing_card_facts(folder)
    text = render_model_card(
        config,
        repo_id=facts.get("repo_id"),
        training=facts.get("training"),
        evaluation=dict(evaluation),
        license=facts.get("license", "apache-2.0"),
        datasets=facts.get("datasets"),
    )
    write_model_card(folder, text, overwrite=True)
    return folder / "README.md"


__all__ = [
    "accuracy_metrics",
    "render_model_card",
    "write_model_card",
    "update_model_card",
    "card_evaluation",
    "encoder_parameter_count",
    "timm_model_kwargs",
]
