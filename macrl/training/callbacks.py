"""Trainer callbacks of the pre-training loop: momentum EMA, data epoch, a stream's data position, the JSONL log,
checkpoint pushes, the time to the first step; and `RunCallbacks`, every callback of a run in its one order."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data import TwoViewDataset
from ..data.streaming_two_view_dataset import StreamPositions
from ..errors import first_line
from ..write_failures import writing
from .budget import BudgetProgressCallback, TrainingClock
from .checkpoints import AtomicCheckpoints
from .knn_monitor import KnnMonitor
from .online_probe import OnlineProbe
from .stop_signals import StopSignals

logger = logging.getLogger(__name__)


class MomentumUpdateCallback(TrainerCallback):
    """After every optimiser step, move the momentum branch towards the main branch, on the cosine schedule to 1 of
    the run's progress (`clock.progress`, a `TrainingClock`)."""

    def __init__(self, clock):
        self.clock = clock
        self.momentum: float | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.momentum = model.update_momentum_branch(self.clock.progress)


class DataEpochCallback(TrainerCallback):
    """Tells the dataset which epoch starts, so its seeded augmentations and masks change from epoch to epoch."""

    def __init__(self, dataset: TwoViewDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional (e.g. 2.5 after resuming mid-epoch); the small offset absorbs float error
        self.dataset.set_epoch(math.floor(state.epoch + 1e-6))


DATA_STATE_FILE = "data_state_{rank}.json"


class DataPositionCallback(TrainerCallback):
    """Writes the data position of a streamed run (`StreamPositions`: every reader's place after the last batch
    trained on) into each checkpoint, one `data_state_<rank>.json` per process, before `AtomicCheckpoints` moves the
    checkpoint into place; `load` reads it back for a resumed run."""

    def __init__(self, positions, rank: int, images_per_epoch: int | None = None, global_batch_size: int = 0):
        self.positions = positions
        self.rank = rank
        self.images_per_epoch = images_per_epoch
        self.global_batch_size = global_batch_size

    def on_step_end(self, args, state, control, **kwargs):
        # the Trainer's epoch of an endless stream is the fraction of max_steps done; a known length gives the real one
        if self.images_per_epoch:
            state.epoch = state.global_step * self.global_batch_size / self.images_per_epoch

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        (folder / DATA_STATE_FILE.format(rank=self.rank)).write_text(json.dumps(self.positions.state_dict()) + "\n")

    @staticmethod
    def path(checkpoint, rank: int) -> Path:
        return Path(checkpoint) / DATA_STATE_FILE.format(rank=rank)


class JsonlLogCallback(TrainerCallback):
    """Appends every training log (step, losses, lr, momentum, img/s, the kNN monitor) to a JSON-lines file on the
    main process."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        # A run killed after its last checkpoint logged steps that the resumed run trains (and logs) again: drop
        # them, so the log of an interrupted and resumed run reads like that of an uninterrupted one.
        if not state.is_world_process_zero or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= state.global_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                continue
        if kept != lines:
            partial = self.path.with_name(self.path.name + ".partial")
            with writing("the training log", self.path):
                partial.write_text("".join(kept))
                os.replace(partial, self.path)  # a kill during the rewrite leaves the old log, never half of it

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        with writing("the training log", self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as file:
                file.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class FirstStepTimer(TrainerCallback):
    """The seconds from `started` (a `time.monotonic()` at the run's start) to the end of the first optimiser step
    this process trains: what opening the data, building the model, the budget probe, compiling and the first batch
    cost before training gets going (on a GPU, up to the host's side of that step)."""

    def __init__(self, started: float):
        self.started = started
        self.seconds: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is None:
            self.seconds = time.monotonic() - self.started


class LogLastStepCallback(TrainerCallback):
    """Logs the last step of a run, whatever `--logging-steps`: every run gets its log line and loss curve."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or control.should_training_stop:
            control.should_log = True


class PushCheckpointCallback(TrainerCallback):
    """After every checkpoint, export the encoder and upload it to the Hub (`--push-checkpoints`).

    A failed upload is reported and training goes on: the checkpoint itself is safe on disk, and the final push
    (or a later one) uploads the newer encoder anyway.
    """

    def __init__(self, export_and_push):
        self.export_and_push = export_and_push  # (model, step) -> commit url
        self.pushed: list[int] = []

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        try:
            self.export_and_push(model, state.global_step)
            self.pushed.append(state.global_step)
        except Exception as error:  # noqa: BLE001 - any Hub failure must not end a long run
            logger.warning("pushing the step-%d encoder failed: %s", state.global_step, first_line(error))


@dataclass
class RunCallbacks:
    """Every callback of a pre-training run, by name, and the one order they run in (`in_order`).

    `MACRLPretrainer` takes them all and reads what its hooks need from them: the clock (the schedules), the
    momentum update (the logged momentum), the kNN monitor and the online probe (their results in the next log; the
    probe's training step and resume) and a stream's data positions.
    """

    clock: TrainingClock
    checkpoints: AtomicCheckpoints
    stop_signals: StopSignals | None = None
    log: JsonlLogCallback | None = None
    data_epoch: DataEpochCallback | None = None  # random-access data: a stream counts its own epochs
    data_position: DataPositionCallback | None = None  # a stream
    monitor: KnnMonitor | None = None
    online_probe: OnlineProbe | None = None
    first_step: FirstStepTimer | None = None
    tensorboard: TrainerCallback | None = None
    push: PushCheckpointCallback | None = None
    extra: list[TrainerCallback] = field(default_factory=list)
    momentum_update: MomentumUpdateCallback = field(init=False)
    # a budget run's progress bar, which takes the place of the Trainer's own (None: the stock bar of the steps)
    progress_bar: BudgetProgressCallback | None = field(init=False)

    def __post_init__(self):
        self.momentum_update = MomentumUpdateCallback(self.clock)
        self.progress_bar = BudgetProgressCallback(self.clock) if self.clock.budget_seconds is not None else None

    @property
    def stream_positions(self) -> StreamPositions | None:
        return None if self.data_position is None else self.data_position.positions

    def in_order(self) -> list[TrainerCallback]:
        # The clock first and the stop signals next (they decide the stop) and the EMA right after them; a stream's
        # data position and the online probe before AtomicCheckpoints (written into the checkpoint before it is moved
        # into place); the probe, the monitor and the last-step log after the stop, so the last step is measured and
        # logged.
        ordered = [
            self.clock, self.stop_signals, self.momentum_update, self.data_position, self.online_probe,
            self.checkpoints, self.monitor,
            LogLastStepCallback(), self.data_epoch, self.log, self.first_step, self.tensorboard, self.push, *self.extra,
        ]
        return [callback for callback in ordered if callback is not None]
