"""A macrl command's OpenMP threads wait passively, so a run on a CPU that other work shares gets its fair share of
it instead of spinning (benchmarks/fair_share.py has the speeds; `macrl.openmp_waiting` the why).

Real outside load: two busy processes, one a core, beside real `python -m macrl.pretrain` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from macrl.openmp_waiting import running_a_macrl_command, wait_passively_in_commands

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
    passive = _run(tmp_path / "command-default")
    assert passive["omp_wait_policy"] == "PASSIVE"
    # the same run with libgomp's own default (spin 300,000 times at every barrier before sleeping), which a user
    # who sets GOMP_SPINCOUNT keeps: its threads burn CPU time that the busy processes and the run's own threads need
    spinning = _run(tmp_path / "libgomp-default", GOMP_SPINCOUNT="300000")
    assert spinning["omp_wait_policy"] == "DEFAULT" and spinning["steps"] == passive["steps"] == 20
    # the CPU time the training loop took, all its threads: the same work, without the spinning
    used = passive["training_cpu_seconds"], spinning["training_cpu_seconds"]
    assert used[1] > 2 * used[0], used


def test_only_macrl_commands_change_the_waiting(monkeypatch):
    assert running_a_macrl_command("/usr/local/bin/macrl-pretrain", [])
    assert running_a_macrl_command("-m", [sys.executable, "-m", "macrl.evaluate", "--model", "m"])
    assert not running_a_macrl_command("/usr/bin/python", [sys.executable, "train.py"])  # a library user's script
    # this test process has torch loaded already: its OpenMP has read its settings, so nothing is pretended
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/macrl-pretrain"])
    assert not wait_passively_in_commands() and "OMP_WAIT_POLICY" not in os.environ
    # a user's own setting is kept, in a fresh process where torch is not loaded yet
    code = "import os, sys; sys.argv[0] = 'macrl-x'; import macrl; print(os.environ['OMP_WAIT_POLICY'])"
    env = {key: value for key, value in os.environ.items() if key not in OPENMP_SETTINGS}
    for user, seen in (({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")):
        shown = subprocess.run([sys.executable, "-c", code], env=env | user, capture_output=True, text=True,
                               check=True).stdout.strip()
        assert shown == seen
