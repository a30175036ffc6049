"""A macrl command's OpenMP threads wait passively beside other work, so a run on a CPU that other work shares gets
its fair share of it instead of spinning, and spin briefly on a quiet one (benchmarks/fair_share.py has the speeds;
`macrl.openmp_waiting` the why).

Real outside load: two busy processes, one a core, beside real `python -m macrl.pretrain` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from macrl.openmp_waiting import (
    BUSY_SETTING,
    QUIET_SETTING,
    choose_waiting_in_commands,
    other_runnable_tasks,
    running_a_macrl_command,
    waiting_for,
)

RUN = ["--config", "tiny", "--max-steps", "20", "--no-knn", "--bf16", "--num-workers", "0", "--batch-size", "64",
       "--logging-steps", "100", "--save-steps", "100"]
OPENMP_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _run(output: Path, **environment: str) -> dict:
    """The results.json of a `python -m macrl.pretrain` run in a fresh process with `environment`."""
    env = {key: value for key, value in os.environ.items() if key not in OPENMP_SETTINGS} | environment
    subprocess.run([sys.executable, "-m", "macrl.pretrain", *RUN, "--output-dir", str(output)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((output / "results.json").read_text())


@pytest.fixture
def outside_load():
    """Two busy processes, one a core of the two CI has, for as long as the test runs."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for process in busy:
        process.kill()
        process.wait()


def test_under_outside_load_the_command_waits_instead_of_spinning(outside_load, tmp_path):
    # the command sees the busy processes when it starts, and waits passively
    assert other_runnable_tasks() >= 2
    passive = _run(tmp_path / "command-default")
    assert passive["openmp_waiting"] == "OMP_WAIT_POLICY=PASSIVE"
    # the same run with libgomp's own default (spin 300,000 times at every barrier before sleeping), which a user
    # who sets GOMP_SPINCOUNT keeps: its threads burn CPU time that the busy processes and the run's own threads need
    spinning = _run(tmp_path / "libgomp-default", GOMP_SPINCOUNT="300000")
    assert spinning["openmp_waiting"] == "GOMP_SPINCOUNT=300000" and spinning["steps"] == passive["steps"] == 20
    # the CPU time the training loop took, all its threads: the same work, without the spinning. How much the spinning
    # burns depends on the CPU and its kernels' lengths (4.1x on a 2-core AMX Xeon, 1.24x on a CI machine); the same
    # waiting twice differs by a few percent
    used = passive["training_cpu_seconds"], spinning["training_cpu_seconds"]
    assert used[1] > 1.1 * used[0], used


def test_only_macrl_commands_change_the_waiting(monkeypatch):
    assert running_a_macrl_command("/usr/local/bin/macrl-pretrain", [])
    assert running_a_macrl_command("-m", [sys.executable, "-m", "macrl.evaluate", "--model", "m"])
    assert not running_a_macrl_command("/usr/bin/python", [sys.executable, "train.py"])  # a library user's script
    # this test process has torch loaded already: its OpenMP has read its settings, so nothing is pretended
    for key in OPENMP_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/macrl-pretrain"])
    assert choose_waiting_in_commands() == {} and not set(OPENMP_SETTINGS) & set(os.environ)
    # in a fresh process where torch is not loaded yet: a command takes one of the two settings, a user's is kept
    code = ("import os, sys; sys.argv[0] = 'macrl-x'; import macrl; from macrl.openmp_waiting import openmp_waiting; "
            "print(openmp_waiting())")
    env = {key: value for key, value in os.environ.items() if key not in OPENMP_SETTINGS}
    for user, seen in (({}, {"GOMP_SPINCOUNT=10000", "OMP_WAIT_POLICY=PASSIVE"}),
                       ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY=ACTIVE"}),
                       ({"GOMP_SPINCOUNT": "300000"}, {"GOMP_SPINCOUNT=300000"})):
        shown = subprocess.run([sys.executable, "-c", code], env=env | user, capture_output=True, text=True,
                               check=True).stdout.strip()
        assert shown in seen, (user, shown)


def test_a_quiet_cpu_gets_a_short_spin_and_a_shared_one_passive_waiting(tmp_path):
    # the kernel's count of runnable tasks, "runnable/total" in the 4th field, counts the process that reads it
    loadavg = tmp_path / "loadavg"
    for line, others in (("0.52 0.40 0.31 1/120 9166", 0), ("3.33 2.48 1.87 4/120 9170", 3), ("garbled", None)):
        loadavg.write_text(line + "\n")
        assert other_runnable_tasks(samples=3, interval=0, loadavg=str(loadavg)) == others
        assert waiting_for(others) == (QUIET_SETTING if others == 0 else BUSY_SETTING)
    assert other_runnable_tasks(loadavg=str(tmp_path / "not-linux")) is None
