"""A live quality signal during pre-training: the kNN accuracy of the encoder on a fixed held-out subset."""

from __future__ import annotations

import logging
import time

import torch
from transformers import TrainerCallback

from ..data import ImageSource, SubsetSource, UnreadableImageError, limit_source
from ..errors import first_line
from ..evaluation.frozen_features import evaluate_encoder
from ..image_processing_macrl import MACRLImageProcessor

logger = logging.getLogger(__name__)

__all__ = ["KnnMonitor", "MEMORY_PER_QUERY", "monitor_queries"]

# training images in the kNN memory per held-out query image
MEMORY_PER_QUERY = 5


def monitor_queries(eval_source: ImageSource, images: int) -> SubsetSource:
    """The fixed held-out images the live signals (the kNN monitor, the online probe) are measured on: the first
    `images` of `eval_source` (`--knn-monitor-images`)."""
    return SubsetSource(eval_source, range(min(images, len(eval_source))), f"{eval_source.name}/monitor")


class KnnMonitor(TrainerCallback):
    """Every `every` steps and at the last one, DINO's weighted kNN (k=20, T=0.07) of the encoder's pooled
    features: `images` fixed held-out images classified against `MEMORY_PER_QUERY` times as many fixed training
    images (as lightly's and solo-learn's online kNN do). The result waits in `pending` for the trainer's next log
    (which this forces), so it reaches the JSONL log, the trackers and the plots; `seconds` counts what it cost.
    Runs on the main process only. An undecodable image among its fixed images is skipped with `skip_unreadable`;
    without, it turns the monitor off with a warning naming it: a quality signal does not stop the training.
    """

    def __init__(
        self,
        processor: MACRLImageProcessor,
        train_source: ImageSource,
        eval_source: ImageSource,
        *,
        every: int,
        images: int,
        seed: int,
        device: torch.device,
        batch_size: int = 256,
        skip_unreadable: bool = False,
    ):
        self.processor = processor
        self.queries = monitor_queries(eval_source, images)
        self.memory = limit_source(train_source, MEMORY_PER_QUERY * len(self.queries), seed)
        self.every = every
        self.device = device
        self.batch_size = batch_size
        self.skip_unreadable = skip_unreadable
        self.off = False
        self.pending: dict[str, float] = {}
        self.seconds = 0.0
        self.last: float | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = state.global_step >= state.max_steps or control.should_training_stop
        if self.off or not state.is_world_process_zero or not (state.global_step % self.every == 0 or last):
            return
        started = time.monotonic()
        was_training = model.training
        encoder = model.macrl
        pooling = encoder.config.pooling
        try:
            results = evaluate_encoder(
                encoder, self.processor, self.memory, self.queries, linear_probe=False, pools=(pooling,),
                batch_size=self.batch_size, device=self.device, progress=False, skip_unreadable=self.skip_unreadable,
            )
        except UnreadableImageError as error:
            self.off = True
            logger.warning("the kNN monitor is off: %s (--skip-unreadable skips such images)", first_line(error))
            return
        finally:
            model.train(was_training)
            self.seconds += time.monotonic() - started
        self.last = round(results[f"knn_accuracy_{pooling}"], 2)
        self.pending = {"knn_monitor_accuracy": self.last}
        control.should_log = True

    def pop(self) -> dict[str, float]:
        """The results not logged yet (and forget them)."""
        pending, self.pending = self.pending, {}
        return pending
