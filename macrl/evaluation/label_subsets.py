"""Label-efficiency subsets: a seeded, class-balanced fraction of the training labels.

Self-supervised encoders are meant for the case where labels are few, and the papers report it as "1% and 10% of
the labels" (SimCLR, BYOL, MSN: ImageNet's fixed subset lists; MSN also 1, 2 and 5 images per class). With no
published list for other data, the subset here takes the same fraction of every class, drawn by a seeded
permutation, so two runs with the same seed probe with the same images, and a class never disappears: each keeps at
least one image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DEFAULT_LABEL_FRACTIONS", "fraction_name", "labelled_subset"]

# SimCLR's and BYOL's semi-supervised protocol
DEFAULT_LABEL_FRACTIONS: tuple[float, ...] = (0.01, 0.1)


def fraction_name(fraction: float) -> str:
    """The suffix of a result key for `fraction` of the labels: 0.01 -> `1pct`, 0.1 -> `10pct`, 0.005 -> `0.5pct`."""
    return f"{fraction * 100:.4g}pct"


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """`fractions` deduplicated in order; each must lie in (0, 1) (all the labels is the plain protocol)."""
    fractions = tuple(dict.fromkeys(float(fraction) for fraction in fractions))
    for fraction in fractions:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"a label fraction must lie in (0, 1), got {fraction}")
    return fractions


def labelled_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices `[K]` (sorted) of `fraction` of the images of every class of `labels` `[N]`.

    Each class keeps `round(fraction * its count)` images, at least one, chosen by a permutation seeded with `seed`
    and the class, so a class's subset does not depend on the other classes, and the 1% subset of a seed lies inside
    its 10% subset.
    """
    (fraction,) = check_fractions([fraction])
    labels = labels.cpu()
    chosen = []
    for label in labels.unique(sorted=True).tolist():
        members = (labels == label).nonzero().flatten()  # [n_c]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(label))
        order = members[torch.randperm(members.numel(), generator=generator)]
        chosen.append(order[: max(1, round(fraction * members.numel()))])
    return torch.cat(chosen).sort().values
