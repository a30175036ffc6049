"""How the commands' OpenMP threads wait: passively, so a run gets its fair share of a CPU that other work shares.

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the pip wheels), whose threads, by default, spin for a while at
every barrier before they sleep. On a machine that other processes share, a spinning thread burns the time slice of
a thread that has work, and every barrier waits for the thread that lost its core: with two busy processes beside
it, the main job ran at 112 images/s with the default waiting and at 266 with `OMP_WAIT_POLICY=PASSIVE`, close to the
fair share of the cores (about 280), and at about the same speed with the passive waiting on a quiet machine
(benchmarks/results/fair-share.md has the table, per CPU).

libgomp reads `OMP_WAIT_POLICY` once, when it is loaded, that is when `torch` is first imported; so the policy is set
here, by `macrl/__init__.py` before it imports anything that imports torch, and only in the processes of a macrl
command (`macrl-pretrain`, `python -m macrl.pretrain`, `torchrun ... -m macrl.pretrain`, their DataLoader workers):
importing macrl as a library leaves the process's OpenMP as its owner set it up. A value the user set is kept
(`OMP_WAIT_POLICY`, or `GOMP_SPINCOUNT`, which libgomp's default waiting is: 300000 spins).
"""

from __future__ import annotations

import os
import sys

__all__ = ["COMMAND_POLICY", "openmp_wait_policy", "running_a_macrl_command", "wait_passively_in_commands"]

COMMAND_POLICY = "PASSIVE"
# what a user sets to tune OpenMP's waiting themselves
_USER_SETTINGS = {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}


def running_a_macrl_command(argv0: str | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process is a macrl command: a `macrl-*` console script, or `python -m macrl.<module>`."""
    argv0 = sys.argv[0] if argv0 is None and sys.argv else argv0 or ""
    if os.path.basename(argv0).startswith("macrl-"):
        return True
    orig_argv = list(getattr(sys, "orig_argv", [])) if orig_argv is None else orig_argv
    return any(flag == "-m" and module.startswith("macrl.") for flag, module in zip(orig_argv, orig_argv[1:]))


def wait_passively_in_commands() -> bool:
    """Set `OMP_WAIT_POLICY=PASSIVE` in a macrl command's process before torch is loaded; True where it did.

    Left alone: a policy or spin count the user set (`OMP_WAIT_POLICY`, libgomp's `GOMP_SPINCOUNT`), a process that
    is not a macrl command, and one that has loaded torch already (its OpenMP has read its settings)."""
    if _USER_SETTINGS & set(os.environ) or "torch" in sys.modules or not running_a_macrl_command():
        return False
    os.environ["OMP_WAIT_POLICY"] = COMMAND_POLICY
    return True


def openmp_wait_policy() -> str:
    """The waiting this process's OpenMP was started with, for results files: `PASSIVE`, `ACTIVE` or `default`."""
    return os.environ.get("OMP_WAIT_POLICY", "default").upper()
