"""A time budget for a run (`--max-minutes`): the step count that fits it, and the stop when it is spent."""

from __future__ import annotations

import copy
import itertools
import statistics
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..distributed import is_distributed
from ..modeling_macrl import MACRLForPreTraining

__all__ = ["PROBE_STEPS", "TimeBudgetCallback", "fit_steps_to_budget", "steady_step_seconds"]

# The first steps of a fresh model run slower (allocator and oneDNN kernel caches warming up), so the probe times
# several steps and keeps the median of the last half (benchmarks/results/budget-probe.md has the timings).
PROBE_STEPS = 10
# logging, checkpoints and the epoch ends cost a few percent on top of the steps
STEP_TIME_SHARE = 0.95


def steady_step_seconds(durations: list[float]) -> float:
    """The steady time of a step from the times of consecutive first steps: the median of the second half."""
    if not durations:
        raise ValueError("no step was timed")
    return statistics.median_low(durations[len(durations) // 2 :])


def fit_steps_to_budget(
    model: MACRLForPreTraining,
    dataset,
    collator,
    *,
    minutes: float,
    batch_size: int,
    num_workers: int,
    bf16: bool,
    device: torch.device,
) -> int:
    """Optimiser steps that fit in `minutes`, from the time of a few real steps on a throwaway copy of `model`.

    `batch_size` is the per-process batch; with several processes, the slowest one's time counts.
    """
    probe = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-6)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, collate_fn=collator
    )
    batches = itertools.cycle(loader)  # a small data set may hold fewer batches than the probe takes
    durations = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for _ in range(PROBE_STEPS):
        start = time.perf_counter()
        batch = {key: value.to(device) for key, value in next(batches).items()}
        with autocast:
            loss = probe(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        probe.update_momentum_branch(0.0)
        durations.append(time.perf_counter() - start)
    seconds = torch.tensor(steady_step_seconds(durations))
    if is_distributed():
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return max(int(minutes * 60 * STEP_TIME_SHARE / seconds.item()), 1)


class TimeBudgetCallback(TrainerCallback):
    """Stops training, with a final checkpoint, once `max_minutes` of training have passed.

    Every process must stop at the same step, so rank 0's clock decides for all of them.
    """

    def __init__(self, max_minutes: float):
        self.deadline = time.monotonic() + max_minutes * 60
        self.stopped_early = False

    def on_step_end(self, args, state, control, **kwargs):
        over = torch.tensor(int(time.monotonic() > self.deadline))
        if is_distributed():
            dist.broadcast(over, src=0)
        if over.item() and state.global_step < state.max_steps:
            self.stopped_early = True
            control.should_training_stop = True
            control.should_save = True
