"""Stopping a run when it is asked to (a cluster's preemption or time limit, `kill`, Ctrl-C): at the end of the step it
is in, with a checkpoint of that step.

SLURM sends SIGTERM (or, with `--signal`, SIGUSR1) some time before it kills a job, Kubernetes and spot instances
SIGTERM with a grace period. `StopSignals` catches the signals it is given; its handler only notes the signal, as
Lightning's does, and the end of the step turns it into the Trainer's stop with a checkpoint (the same atomic
checkpoint as every other, and the step's log line). With several processes the signal may reach one of them only,
or each at another step: every step, the processes take the largest signal number any of them noted
(an all-reduce of one number over the host group, as the clock's), so all of them stop after the same step and its
checkpoint is whole. A second signal to a process stops it at once, the way it would have stopped without these
handlers (SIGINT: `KeyboardInterrupt`; SIGTERM, SIGUSR1: killed by the signal). The workers that load the training
data ignore the signals (`worker_init_fn`): one sent to every process of the run (Ctrl-C, SLURM's) is the training
process's to act on.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..distributed import host_group, is_distributed

__all__ = ["DEFAULT_STOP_SIGNALS", "StopSignals", "parse_signals"]

logger = logging.getLogger(__name__)

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


def parse_signals(names: Sequence[str]) -> tuple[signal.Signals, ...]:
    """The signals `names` names ("SIGTERM", "TERM", "term", "15"), each once.

    Raises:
        ValueError: a name that is no signal, or one no process can catch (SIGKILL, SIGSTOP).
    """
    found: list[signal.Signals] = []
    for name in names:
        text = str(name).strip().upper()
        try:
            chosen = signal.Signals(int(text)) if text.isdigit() else signal.Signals[
                text if text.startswith("SIG") else f"SIG{text}"]
        except (KeyError, ValueError):
            raise ValueError(f"{name!r} is not a signal (e.g. SIGTERM, SIGINT, SIGUSR1)") from None
        if chosen in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{chosen.name} cannot be caught: no process can stop cleanly on it")
        if chosen not in found:
            found.append(chosen)
    return tuple(found)


class StopSignals(TrainerCallback):
    """Stop the run after the step a signal of `signals` arrived in, with a checkpoint of that step (module
    docstring). `installed()` puts its handlers in place for the duration of the training; `stopped_by` is then the
    signal the processes stopped on (None: they were not stopped) and `stopped_at` its step."""

    def __init__(self, signals: Sequence[signal.Signals]):
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None  # the first signal this process got
        self.stopped_by: signal.Signals | None = None  # the one every process agreed to stop on
        self.stopped_at: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._pid: int | None = None
        self._group = None

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """The handlers in place inside the block, and the previous ones back after it, whatever happens in it.

        Handlers can only be set from the main thread: elsewhere (a run started in a thread) the signals keep their
        handlers and the run stops as it would without this.
        """
        if self.signals and threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for chosen in self.signals:
                self._previous[chosen] = signal.signal(chosen, self._handle)
        elif self.signals:
            logger.info("not in the main thread: the stop signals keep their handlers")
        try:
            yield self
        finally:
            self._restore()

    def _restore(self) -> None:
        for chosen, previous in self._previous.items():
            signal.signal(chosen, previous)
        self._previous = {}

    def _handle(self, number: int, frame) -> None:
        # the handlers are inherited by forked DataLoader workers, where they keep a signal sent to the whole
        # process group (Ctrl-C, SLURM's) from killing the worker under the training process that handles it
        if os.getpid() != self._pid:
            return
        if self.received is None:
            self.received = signal.Signals(number)  # only noted: the step's end acts on it
            return
        self._restore()  # a second signal: stop at once, as the previous handler does
        signal.raise_signal(number)

    def worker_init_fn(self, init_fn: Callable[[int], None] | None = None) -> Callable[[int], None]:
        """A DataLoader `worker_init_fn` that makes the worker ignore these signals, then calls `init_fn`: a signal
        sent to every process of the run (Ctrl-C, SLURM's, `kill -- -PGID`) would otherwise kill the workers (torch
        gives them its own SIGTERM handler, which dies) before the training process finishes its step.

        Workers that ignore SIGTERM outlive `multiprocessing`'s exit handler, which terminates (SIGTERM) the daemonic
        children still alive at exit and then joins them: a DataLoader whose workers were not shut down before (the
        Trainer's persistent ones) would hang the process at exit. So the training process kills them first."""
        if self.signals:
            # atexit runs its handlers last-registered first: this one before multiprocessing's own (registering it
            # again replaces nothing, so it is unregistered first)
            atexit.unregister(_kill_workers_at_exit)
            atexit.register(_kill_workers_at_exit)
        return functools.partial(_ignore_in_worker, self.signals, init_fn)

    def on_train_begin(self, args, state, control, **kwargs):
        if is_distributed():
            self._group = host_group()

    def _agree(self, state) -> bool:
        """Whether any process got a signal (a collective with several processes); if so, note it and the step."""
        number = 0 if self.received is None else int(self.received)
        if is_distributed():
            agreed = torch.tensor([number], dtype=torch.int64)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._group)
            number = int(agreed.item())
        if number:
            self.stopped_by, self.stopped_at = signal.Signals(number), state.global_step
        return bool(number)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_by is None and self._agree(state):
            control.should_training_stop = True
            control.should_save = True
            if state.is_world_process_zero:
                logger.info("%s: stopping after step %d, with its checkpoint", self.stopped_by.name, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        # a signal during the last step's checkpoint: that checkpoint is the one to continue from, and the evaluation
        # and export at the end are left to the resumed run, as after a stop mid-run
        if self.stopped_by is None:
            self._agree(state)


def _ignore_in_worker(
    signals: tuple[signal.Signals, ...], init_fn: Callable[[int], None] | None, worker_id: int
) -> None:
    for chosen in signals:
        signal.signal(chosen, signal.SIG_IGN)
    if init_fn is not None:
        init_fn(worker_id)


def _kill_workers_at_exit() -> None:
    """Kill the daemonic child processes (DataLoader workers) still alive at exit: they ignore SIGTERM."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()

