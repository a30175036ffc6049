"""How the commands' OpenMP threads wait: a short spin on a quiet CPU, asleep at once on one that other work shares.

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the pip wheels), whose threads, by default, spin 300,000 times at
every barrier before they sleep. On a machine that other processes share, a spinning thread burns the time slice of
a thread that has work, and every barrier waits for the thread that lost its core: beside two busy processes the
main job runs at less than half its fair share of the cores with the default waiting, and at about its fair share
with `OMP_WAIT_POLICY=PASSIVE` (threads sleep at once). On a quiet CPU passive waiting is slower (a woken thread
starts late), while a short spin, `GOMP_SPINCOUNT=10000`, is as fast as the default and keeps most of the gain under
load. So a command looks at the CPU when it starts: when nothing else is running it spins briefly, otherwise it waits
passively (benchmarks/results/fair-share.md has the tables, per CPU).

libgomp reads its settings once, when it is loaded, that is when `torch` is first imported; so they are set here, by
`macrl/__init__.py` before it imports anything that imports torch, and only in the processes of a macrl command
(`macrl-pretrain`, `python -m macrl.pretrain`, `torchrun ... -m macrl.pretrain`, their DataLoader workers): importing
macrl as a library leaves the process's OpenMP as its owner set it up. A value the user set is kept
(`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

__all__ = [
    "BUSY_SETTING", "QUIET_SETTING", "choose_waiting_in_commands", "openmp_waiting", "other_runnable_tasks",
    "running_a_macrl_command", "waiting_for",
]

# spin this long before sleeping where the CPU is the command's own: as fast as libgomp's default when quiet
QUIET_SETTING = {"GOMP_SPINCOUNT": "10000"}
# sleep at once where other work runs: every core a spinning thread holds is taken from a thread with work
BUSY_SETTING = {"OMP_WAIT_POLICY": "PASSIVE"}
_USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def running_a_macrl_command(argv0: str | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process is a macrl command: a `macrl-*` console script, or `python -m macrl.<module>`."""
    argv0 = sys.argv[0] if argv0 is None and sys.argv else argv0 or ""
    if os.path.basename(argv0).startswith("macrl-"):
        return True
    orig_argv = list(getattr(sys, "orig_argv", [])) if orig_argv is None else orig_argv
    return any(flag == "-m" and module.startswith("macrl.") for flag, module in zip(orig_argv, orig_argv[1:]))


def other_runnable_tasks(samples: int = 5, interval: float = 0.01, loadavg: str = "/proc/loadavg") -> int | None:
    """How many tasks besides this one are running or waiting for a core now (the median of a few looks at the
    kernel's count in /proc/loadavg); None where the system does not say (not Linux)."""
    counts = []
    for sample in range(samples):
        try:
            with open(loadavg) as file:
                running = file.read().split()[3].split("/")[0]  # "runnable/total"; this process is one of them
            counts.append(int(running) - 1)
        except (OSError, IndexError, ValueError):
            return None
        if sample + 1 < samples:
            time.sleep(interval)
    return max(0, int(statistics.median(counts)))


def waiting_for(other_tasks: int | None) -> dict[str, str]:
    """The OpenMP setting a command takes: a short spin on a quiet CPU, passive waiting beside other work (or where
    it cannot be known)."""
    return dict(QUIET_SETTING) if other_tasks == 0 else dict(BUSY_SETTING)


def choose_waiting_in_commands() -> dict[str, str]:
    """Set a macrl command's OpenMP waiting before torch is loaded (`waiting_for` the CPU now); the setting, or {}.

    Left alone: a policy or spin count the user set (`OMP_WAIT_POLICY`, libgomp's `GOMP_SPINCOUNT`), a process that
    is not a macrl command, and one that has loaded torch already (its OpenMP has read its settings)."""
    if any(key in os.environ for key in _USER_SETTINGS) or "torch" in sys.modules or not running_a_macrl_command():
        return {}
    setting = waiting_for(other_runnable_tasks())
    os.environ.update(setting)
    return setting


def openmp_waiting() -> str:
    """The waiting this process's OpenMP was started with, for results files: `OMP_WAIT_POLICY=PASSIVE`,
    `GOMP_SPINCOUNT=10000`, ... or `default` (libgomp's: spin 300,000 times)."""
    return " ".join(f"{key}={os.environ[key]}" for key in _USER_SETTINGS if key in os.environ) or "default"
