"""A run's progress and its time budget (`--max-minutes`): the step count that fits the budget, the clock that the
schedules follow (and its state in a checkpoint), the stop when the budget is spent, and the progress bar of a
budget run."""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerState
from transformers.trainer_callback import ExportableState, ProgressCallback
from tqdm.auto import tqdm

from ..devices import has_fused_adamw
from ..distributed import host_group, is_distributed
from ..modeling_macrl import MACRLForPreTraining

__all__ = [
    "BudgetProgressCallback",
    "ClockState",
    "PROBE_STEPS",
    "probe_step_seconds",
    "STEP_HEADROOM",
    "TrainingClock",
    "fit_steps_to_budget",
    "steady_step_seconds",
    "warmup_cosine",
]

# The first steps of a fresh model run slower (allocator and oneDNN kernel caches warming up), so the probe times
# several steps and keeps the median of the last half (benchmarks/results/budget-probe.md has the timings).
PROBE_STEPS = 10
# logging, checkpoints and the epoch ends cost a few percent on top of the steps
STEP_TIME_SHARE = 0.95
# a budget run may take this many times the fitted steps if the machine turns out faster than the probe said (the
# clock then ends its schedules at the last step instead of at the budget)
STEP_HEADROOM = 1.5


def steady_step_seconds(durations: list[float]) -> float:
    """The steady time of a step from the times of consecutive first steps: the median of the second half."""
    if not durations:
        raise ValueError("no step was timed")
    return statistics.median_low(durations[len(durations) // 2 :])


def probe_step_seconds(
    model: MACRLForPreTraining,
    dataset,
    collator,
    *,
    batch_size: int,
    num_workers: int,
    precisions: tuple[bool, ...],
    device: torch.device,
    fp16: bool = False,
) -> dict[bool, float]:
    """The steady time of a real training step in each precision (`True`: bf16 autocast), from `PROBE_STEPS` steps
    of each on a throwaway copy of `model`, set up as the run's Trainer sets it up (pinned memory and non-blocking
    copies on CUDA, the fused AdamW where there is one, fp16 autocast with loss scaling under `fp16`).

    The precisions take turns step by step, so that load from other processes, which comes and goes, slows them
    alike and the faster one is still found faster. `batch_size` is the per-process batch; with several processes,
    the slowest one's time counts (the same value on every process).
    """
    probe = copy.deepcopy(model).to(device).train()
    parameters = [p for p in probe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, fused=True if has_fused_adamw(device) else None)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collator, pin_memory=cuda,
        shuffle=not isinstance(dataset, torch.utils.data.IterableDataset),  # a stream shuffles itself
    )
    batches = itertools.cycle(loader)  # a small data set may hold fewer batches than the probe takes
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    dtype = torch.float16 if fp16 else torch.bfloat16
    durations: dict[bool, list[float]] = {bf16: [] for bf16 in precisions}
    for _ in range(PROBE_STEPS):
        for bf16 in precisions:
            start = time.perf_counter()
            # the model's inputs (an online probe's labels are not)
            batch = {key: value.to(device, non_blocking=cuda) for key, value in next(batches).items() if key != "labels"}
            with torch.autocast(device.type, dtype=dtype, enabled=bf16 or fp16):
                loss = probe(**batch).loss
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            probe.update_momentum_branch(0.0)
            if cuda:  # the GPU runs behind the host: a step is done when its kernels are
                torch.cuda.synchronize(device)
            durations[bf16].append(time.perf_counter() - start)
    seconds = torch.tensor([steady_step_seconds(durations[bf16]) for bf16 in precisions])
    if is_distributed():
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return dict(zip(precisions, seconds.tolist()))


def fit_steps_to_budget(minutes: float, step_seconds: float) -> int:
    """Optimiser steps of `step_seconds` that fit in `minutes`, with room for logging, checkpoints, epoch ends."""
    return max(int(minutes * 60 * STEP_TIME_SHARE / step_seconds), 1)


@dataclass(frozen=True)
class ClockState:
    """What a `TrainingClock` keeps in a checkpoint (`TrainerState.stateful_callbacks`) for the run that resumes it."""

    spent_seconds: float = 0.0  # training time spent up to the checkpoint
    bf16: bool | None = None  # the precision the run chose at its start (None: a checkpoint that does not say)
    startup_seconds: float = 0.0  # of the time spent, the first step of each process (compiling, warming caches)


class TrainingClock(TrainerCallback, ExportableState):
    """The progress of a run in [0, 1], which its learning-rate and momentum schedules follow, and its time budget.

    A step-based run (`--max-steps`, `--epochs`) progresses by steps: `step / max_steps`, exactly as the stock
    schedules count, so it stays bit-exact and resumable. A run with a time budget (`--max-minutes`) progresses by
    whichever is further along, the training time spent or the steps (`max(spent / budget, step / max_steps)`), so a
    run slowed down by other load still finishes its warm-up, cosine decay and momentum schedule when the budget
    ends, and one that runs faster than its probe finishes them at its last step; the run stops once the budget is
    spent. The time of each process's first step (a `torch.compile`, caches warming up: a minute on 2 cores) counts
    against the budget but not in the schedules' time, which runs over what is left (`(spent - startup) / (budget -
    startup)`): a compiled run warms up over its first steps, not during its compile. The time spent is saved in
    every checkpoint (`TrainerState.stateful_callbacks`), so a resumed run keeps its budget. With several processes, rank 0's clock is broadcast every step over a gloo (CPU) group: the same
    progress on every process, and no device synchronisation.
    """

    def __init__(self, max_minutes: float | None = None, bf16: bool = False):
        self.max_minutes = max_minutes
        self.bf16 = bf16  # the precision the run chose at its start, which a resume keeps
        self.spent_before = 0.0  # seconds spent by the processes that trained before a resume
        self.startup_before = 0.0  # of those, their first steps
        self.startup: float | None = None  # this process's first step, once it is done
        self.started: float | None = None
        self.progress = 0.0
        self.stopped_by_budget = False
        self._group = None

    @property
    def budget_seconds(self) -> float | None:
        return None if self.max_minutes is None else self.max_minutes * 60

    def spent_seconds(self) -> float:
        """Training time so far, resumed runs included."""
        return self.spent_before + (0.0 if self.started is None else time.monotonic() - self.started)

    def state(self) -> dict:
        """What goes into each checkpoint; `saved_in` reads it back."""
        return {
            "args": {"max_minutes": self.max_minutes, "bf16": self.bf16},
            "attributes": {"spent_seconds": self.spent_seconds(), "bf16": self.bf16,
                           "startup_seconds": self.startup_seconds()},
        }

    @classmethod
    def saved_in(cls, state: TrainerState) -> ClockState | None:
        """The clock's state in a checkpoint's `TrainerState` (`TrainerState.load_from_json(...)`), or None where the
        checkpoint holds none."""
        saved = (state.stateful_callbacks or {}).get(cls.__name__)
        if not isinstance(saved, dict):
            return None
        attributes = saved.get("attributes", {})
        return ClockState(float(attributes.get("spent_seconds", 0.0)), attributes.get("bf16"),
                          float(attributes.get("startup_seconds", 0.0)))

    def on_train_begin(self, args, state, control, **kwargs):
        saved = self.saved_in(state)
        if state.global_step > 0 and saved is not None:  # resumed: the time spent before counts
            self.spent_before, self.startup_before = saved.spent_seconds, saved.startup_seconds
        if is_distributed():
            self._group = host_group()
        self.started = time.monotonic()
        self.progress = self._progress_at(state.global_step, state.max_steps)

    def _progress_at(self, step: int, max_steps: int) -> float:
        by_steps = step / max(max_steps, 1)
        if self.budget_seconds is None:
            return min(by_steps, 1.0)
        seconds = torch.tensor([self.spent_seconds(), self.startup_seconds()], dtype=torch.float64)
        if is_distributed():
            dist.broadcast(seconds, src=0, group=self._group)
        spent, startup = seconds.tolist()
        if spent >= self.budget_seconds:
            return 1.0
        by_time = max(spent - startup, 0.0) / max(self.budget_seconds - startup, 1e-9)
        return min(max(by_time, by_steps), 1.0)

    def startup_seconds(self) -> float:
        """The first steps' time so far (each process's), which the schedules do not count."""
        return self.startup_before + (self.startup or 0.0)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.startup is None and self.started is not None:  # this process's first step is done
            self.startup = time.monotonic() - self.started
        # before the scheduler steps: the learning rate of the next step follows the progress after this one
        self.progress = self._progress_at(state.global_step + 1, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.budget_seconds is not None and self.progress >= 1.0 and state.global_step < state.max_steps:
            self.stopped_by_budget = True
            control.should_training_stop = True
            control.should_save = True


def warmup_cosine(progress: float, warmup: float) -> float:
    """The learning-rate factor at `progress` in [0, 1]: linear from 0 over the first `warmup` of the run, then a
    half cosine to 0 (the stock `cosine` schedule, on the run's progress instead of its step)."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min((progress - warmup) / max(1.0 - warmup, 1e-12), 1.0)))


class BudgetProgressCallback(ProgressCallback):
    """The progress bar of a budget run (`--max-minutes`): the budget's seconds, as far as the time spent or the
    clock's progress (what the schedules follow, ahead of the time where the steps are) has gone, with the step
    beside them.

    The stock bar counts to the Trainer's `max_steps`, which for a budget run is a cap of `STEP_HEADROOM` times the
    fitted steps: a 10-minute run would show 2402 steps and a 15-minute ETA. The Trainer's own bar is replaced by
    this one (`MACRLPretrainer`); its log lines and the end are the stock bar's.
    """

    def __init__(self, clock: TrainingClock):
        super().__init__()
        self.clock = clock

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            total = round(self.clock.budget_seconds)
            # a resumed run starts where its clock stands
            self.training_bar = tqdm(
                total=total, initial=self._seconds_done(total), unit="s", dynamic_ncols=True,
                desc=f"{self.clock.max_minutes:g}-minute budget",
            )
        self.current_step = state.global_step

    def _seconds_done(self, total: int) -> int:
        return min(round(max(self.clock.spent_seconds(), self.clock.progress * total)), total)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            done = self._seconds_done(self.training_bar.total)
            self.training_bar.set_postfix_str(f"step {state.global_step}", refresh=False)
            self.training_bar.update(done - self.training_bar.n)
        self.current_step = state.global_step
