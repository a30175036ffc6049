"""Evaluation of MACRL encoders.

* ``knn`` and ``linear_probe``: classifiers fitted on cached ``[N, D]`` frozen features, so a backbone is run once over
  the data and the (cheap) classifiers are fitted afterwards;
* ``frozen_features``: ``evaluate_encoder`` runs an encoder over labelled images and reports both, per pooling;
* ``finetune``: end-to-end fine-tuning with ``transformers.Trainer``;
* ``labels``: what every evaluation checks of its images.
"""

from .frozen_features import (
    POOLS,
    RAW_PIXELS_MAX_VALUES,
    evaluate_encoder,
    evaluate_features,
    evaluate_raw_pixels,
    extract_pooled_features,
)
from .knn import knn_accuracy, weighted_knn_predict
from .labels import EvaluationDataError, check_labelled, num_classes_of
from .linear_probe import LinearProbeResult, linear_probe

__all__ = [
    "POOLS",
    "RAW_PIXELS_MAX_VALUES",
    "EvaluationDataError",
    "LinearProbeResult",
    "check_labelled",
    "evaluate_encoder",
    "evaluate_features",
    "evaluate_raw_pixels",
    "extract_pooled_features",
    "knn_accuracy",
    "linear_probe",
    "num_classes_of",
    "weighted_knn_predict",
]
