"""Feature-level evaluation of frozen backbones: weighted kNN and linear probe.

Both work on cached ``[N, D]`` feature tensors, so a backbone is run once over
the data and the (cheap) classifiers are fitted afterwards.
"""

from .knn import knn_accuracy, weighted_knn_predict
from .linear_probe import LinearProbeResult, linear_probe

__all__ = ["weighted_knn_predict", "knn_accuracy", "LinearProbeResult", "linear_probe"]
