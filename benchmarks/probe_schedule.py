"""The linear probe on a 1% / 10% label subset at several schedules, on an encoder's CLS features and on raw pixels.

    python benchmarks/probe_schedule.py --encoder outputs/macrl-fmnist/encoder

Why the label-efficiency probes train for at least 400 steps (`macrl.evaluation.frozen_features._FEW_LABEL_MIN_STEPS`):
the probe's default 20 epochs are 20 steps on 600 rows. Fashion-MNIST train / test; one row a (features, subset,
steps), each with the usual lr / weight-decay search on a seeded tenth of the subset.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from macrl import MACRLImageProcessor, MACRLModel
from macrl.data import FashionMNISTSource
from macrl.evaluation.frozen_features import extract_pooled_features
from macrl.evaluation.label_subsets import labelled_subset
from macrl.evaluation.linear_probe import linear_probe


def pixels(source: FashionMNISTSource) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(source.load_image(i)) for i in range(len(source))])).flatten(1) / 255


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="an encoder folder (MACRLModel + image processor)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = MACRLModel.from_pretrained(args.encoder).eval()
    processor = MACRLImageProcessor.from_pretrained(args.encoder)
    train, test = FashionMNISTSource("train"), FashionMNISTSource("test")
    train_cls, train_labels, _ = extract_pooled_features(model, processor, train, ("cls",), batch_size=512)
    test_cls, test_labels, _ = extract_pooled_features(model, processor, test, ("cls",), batch_size=512)
    features = {"encoder": (train_cls["cls"], test_cls["cls"]), "pixels": (pixels(train), pixels(test))}
    print("| features | labels | steps | accuracy | seconds |\n|---|---|---|---|---|")
    for name, (fit, held) in features.items():
        for fraction in (0.01, 0.1):
            rows = labelled_subset(train_labels, fraction, args.seed)
            steps_per_epoch = math.ceil(len(rows) / 1024)
            for steps in (20 * steps_per_epoch, 100, 400, 1600):
                epochs = max(1, math.ceil(steps / steps_per_epoch))
                started = time.perf_counter()
                result = linear_probe(
                    fit[rows], train_labels[rows], held, test_labels, 10, epochs=epochs, seed=args.seed
                )
                print(f"| {name} | {fraction:.0%} ({len(rows)}) | {epochs * steps_per_epoch} | {result.accuracy:.2f} | "
                      f"{time.perf_counter() - started:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
