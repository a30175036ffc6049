"""Tests for macrl.evaluation: weighted kNN and linear probe on small problems with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from macrl.evaluation import LinearProbeResult, knn_accuracy, linear_probe, weighted_knn_predict

# Small probe settings: the tests' datasets have a few hundred rows.
FAST_PROBE = dict(lrs=(0.1, 1.0), weight_decays=(0.0, 1e-3), epochs=10, batch_size=64)


def gaussian_clusters(
    num_per_class: int, num_classes: int, dim: int, separation: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Isotropic unit Gaussians around orthogonal class centres ``separation * e_c``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)  # [N]
    centres = separation * torch.eye(num_classes, dim)  # [C, D]
    features = centres[labels] + torch.randn(labels.shape[0], dim, generator=g)  # [N, D]
    perm = torch.randperm(labels.shape[0], generator=g)
    return features[perm], labels[perm]


# --------------------------------------------------------------------------- #
# kNN
# --------------------------------------------------------------------------- #
def test_knn_separable_clusters_are_perfect() -> None:
    train_x, train_y = gaussian_clusters(100, 4, 16, separation=12.0, seed=0)
    test_x, test_y = gaussian_clusters(50, 4, 16, separation=12.0, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, num_classes=4) == 100.0


def _three_point_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query on the x-axis; one class-0 point on it, two class-1 points at +-40 degrees."""
    angle = math.radians(40.0)
    train_x = torch.tensor(
        [[1.0, 0.0], [math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)]]
    )
    train_y = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    return train_x, train_y, query


def test_knn_weighted_vote_matches_hand_computation() -> None:
    # Votes with k=3: class 0 gets exp(1/T), class 1 gets 2 exp(cos40/T).
    # Class 0 wins iff (1 - cos40) / T > ln 2, i.e. T < T* = (1 - cos40) / ln 2 ~= 0.338.
    train_x, train_y, query = _three_point_problem()
    t_star = (1.0 - math.cos(math.radians(40.0))) / math.log(2.0)
    assert 0.33 < t_star < 0.34
    for temperature in (0.07, 0.3, 0.9 * t_star):
        assert weighted_knn_predict(train_x, train_y, query, 2, k=3, temperature=temperature).tolist() == [0]
    for temperature in (1.1 * t_star, 0.4, 1.0):
        assert weighted_knn_predict(train_x, train_y, query, 2, k=3, temperature=temperature).tolist() == [1]
    # With k=1 only the nearest neighbour votes, whatever the temperature.
    assert weighted_knn_predict(train_x, train_y, query, 2, k=1, temperature=1.0).tolist() == [0]


def test_knn_uses_cosine_similarity_and_survives_tiny_temperature() -> None:
    train_x, train_y, query = _three_point_problem()
    # Rescaling rows changes Euclidean distances but not cosine similarities.
    scaled = train_x * torch.tensor([[0.01], [50.0], [3.0]])
    for temperature in (0.07, 1.0):
        assert torch.equal(
            weighted_knn_predict(train_x, train_y, query * 7.0, 2, k=3, temperature=temperature),
            weighted_knn_predict(scaled, train_y, query, 2, k=3, temperature=temperature),
        )
    # exp(1 / 1e-3) overflows float32; the max-shifted weights must not.
    assert weighted_knn_predict(train_x, train_y, query, 2, k=3, temperature=1e-3).tolist() == [0]


def test_knn_chunking_and_k_clamp_do_not_change_predictions() -> None:
    train_x, train_y = gaussian_clusters(20, 3, 8, separation=2.0, seed=2)  # N = 60
    test_x, _ = gaussian_clusters(15, 3, 8, separation=2.0, seed=3)  # M = 45
    reference = weighted_knn_predict(train_x, train_y, test_x, 3, k=10, batch_size=1000)
    for batch_size in (1, 7, 45):
        assert torch.equal(weighted_knn_predict(train_x, train_y, test_x, 3, k=10, batch_size=batch_size), reference)
    # k > N is clamped to N: identical to asking for exactly N neighbours.
    assert torch.equal(
        weighted_knn_predict(train_x, train_y, test_x, 3, k=500),
        weighted_knn_predict(train_x, train_y, test_x, 3, k=60),
    )
    assert reference.shape == (45,) and reference.dtype == torch.long


def test_knn_random_labels_give_chance_accuracy() -> None:
    g = torch.Generator().manual_seed(4)
    train_x, test_x = torch.randn(1000, 16, generator=g), torch.randn(2000, 16, generator=g)
    train_y, test_y = torch.randint(0, 4, (1000,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    # Test labels are independent of everything else, so accuracy ~ Binomial(2000, 1/4) / 20:
    # std ~= 1 point, and +-6 points is a > 5 sigma bound.
    assert abs(knn_accuracy(train_x, train_y, test_x, test_y, num_classes=4) - 25.0) < 6.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_features=torch.empty(0, 4)), "train_features is empty"),
        (dict(test_features=torch.empty(0, 4)), "test_features is empty"),
        (dict(train_features=torch.ones(5)), "train_features must have shape"),
        (dict(test_features=torch.ones(3, 5)), "same feature dim"),
        (dict(train_labels=torch.zeros(4, dtype=torch.long)), "train_labels has 4 entries"),
        (dict(train_labels=torch.tensor([0, 1, 2, 3, 9])), r"train_labels must lie in \[0, 4\)"),
        (dict(train_features=torch.tensor([[float("nan")] * 4] * 5)), "train_features contains NaN"),
        (dict(test_features=torch.full((3, 4), float("inf"))), "test_features contains NaN or inf"),
        (dict(k=0), "k must be a positive int"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(num_classes=0), "num_classes must be"),
    ],
)
def test_knn_input_validation(kwargs: dict, match: str) -> None:
    args = dict(
        train_features=torch.randn(5, 4),
        train_labels=torch.tensor([0, 1, 2, 3, 0]),
        test_features=torch.randn(3, 4),
        num_classes=4,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        weighted_knn_predict(**args)


def test_knn_type_errors() -> None:
    with pytest.raises(TypeError, match="train_labels must be an integer tensor"):
        weighted_knn_predict(torch.randn(3, 2), torch.tensor([0.0, 1.0, 0.0]), torch.randn(1, 2), 2)
    with pytest.raises(TypeError, match="test_features must be a floating point tensor"):
        weighted_knn_predict(torch.randn(3, 2), torch.tensor([0, 1, 0]), torch.ones(1, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="test_labels has 2 entries"):
        knn_accuracy(torch.randn(3, 2), torch.tensor([0, 1, 0]), torch.randn(1, 2), torch.tensor([0, 1]), 2)


# --------------------------------------------------------------------------- #
# Linear probe
# --------------------------------------------------------------------------- #
def test_linear_probe_separable_clusters_are_perfect_despite_scale_and_offset() -> None:
    train_x, train_y = gaussian_clusters(100, 3, 12, separation=10.0, seed=5)
    test_x, test_y = gaussian_clusters(40, 3, 12, separation=10.0, seed=6)
    # A huge per-dimension scale and offset: standardisation with train statistics undoes it.
    scale, offset = torch.logspace(-3, 3, 12), 1e3
    result = linear_probe(train_x * scale + offset, train_y, test_x * scale + offset, test_y, 3, **FAST_PROBE)
    assert isinstance(result, LinearProbeResult)
    assert result.accuracy == 100.0 and result.val_accuracy == 100.0
    assert result.epochs == FAST_PROBE["epochs"]
    assert (result.best_lr, result.best_weight_decay) in result.val_accuracies
    assert len(result.val_accuracies) == 4


def test_linear_probe_is_linear_not_nearest_neighbour() -> None:
    # Labels are the sign of one coordinate; the other coordinates are larger noise.
    # A linear probe solves it; cosine kNN, dominated by the noise dims, does not.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(600, 10, generator=g) * torch.tensor([1.0] + [3.0] * 9)
    y = (x[:, 0] > 0).long()
    x[:, 0] += torch.where(y == 1, 0.5, -0.5)  # margin of 1 around the boundary
    result = linear_probe(x[:400], y[:400], x[400:], y[400:], 2, **FAST_PROBE)
    assert result.accuracy == 100.0
    assert knn_accuracy(x[:400], y[:400], x[400:], y[400:], 2) < 90.0


def test_linear_probe_random_labels_give_chance_accuracy() -> None:
    g = torch.Generator().manual_seed(8)
    train_x, test_x = torch.randn(500, 16, generator=g), torch.randn(2000, 16, generator=g)
    train_y, test_y = torch.randint(0, 4, (500,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y, 4, **FAST_PROBE)
    assert abs(result.accuracy - 25.0) < 6.0  # same binomial bound as the kNN case
    assert result.val_accuracy < 45.0  # 50 val rows: nothing to learn beyond noise


def test_linear_probe_is_deterministic_given_the_seed() -> None:
    train_x, train_y = gaussian_clusters(60, 3, 8, separation=1.5, seed=9)
    test_x, test_y = gaussian_clusters(30, 3, 8, separation=1.5, seed=10)
    torch.manual_seed(123)  # the global RNG must not matter
    first = linear_probe(train_x, train_y, test_x, test_y, 3, seed=3, **FAST_PROBE)
    torch.manual_seed(456)
    second = linear_probe(train_x, train_y, test_x, test_y, 3, seed=3, **FAST_PROBE)
    assert first == second


def test_linear_probe_input_validation() -> None:
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    with pytest.raises(ValueError, match="train_features is empty"):
        linear_probe(torch.empty(0, 4), torch.empty(0, dtype=torch.long), x, y, 2)
    with pytest.raises(ValueError, match="test_labels must lie in"):
        linear_probe(x, y, x, y + 5, 2)
    with pytest.raises(ValueError, match="same feature dim"):
        linear_probe(x, y, torch.randn(20, 5), y, 2)
    with pytest.raises(ValueError, match="test_features contains NaN"):
        linear_probe(x, y, torch.full((20, 4), float("nan")), y, 2)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        linear_probe(x, y, x, y, 2, val_fraction=1.0)
    with pytest.raises(ValueError, match="both must be >= 1"):
        linear_probe(x, y, x, y, 2, val_fraction=0.01)  # rounds to 0 validation rows
    with pytest.raises(ValueError, match="lrs must be"):
        linear_probe(x, y, x, y, 2, lrs=())
    with pytest.raises(ValueError, match="weight_decays must be"):
        linear_probe(x, y, x, y, 2, weight_decays=(-1.0,))
    with pytest.raises(ValueError, match="epochs must be"):
        linear_probe(x, y, x, y, 2, epochs=0)


def test_linear_probe_skips_diverged_grid_points() -> None:
    # With lr * wd = 1e28 the decay step multiplies W by ~-1e28 each step, so it
    # overflows to inf and then nan; the search must pick the finite run.
    train_x, train_y = gaussian_clusters(50, 2, 4, separation=8.0, seed=11)
    result = linear_probe(
        train_x, train_y, train_x, train_y, 2, lrs=(1e30, 0.1), weight_decays=(1e-2,), epochs=5, batch_size=32
    )
    assert result.best_lr == 0.1 and result.accuracy == 100.0
    assert math.isnan(result.val_accuracies[(1e30, 1e-2)])
    with pytest.raises(RuntimeError, match="every .* grid point diverged"):
        linear_probe(train_x, train_y, train_x, train_y, 2, lrs=(1e30,), weight_decays=(1e-2,), epochs=5)
