"""`macrl-pretrain` runs as subprocesses, for the tests that kill and resume them: start one with its stderr kept
in its output folder, wait for a point in it, kill it, wait for it to end, and read its log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

# one thread: a run killed and resumed must give the bytes of a run never interrupted
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 1200  # a hung run fails the test instead of blocking CI (generous: CI machines can be slow)


def launch(command: list, out: Path) -> subprocess.Popen:
    """Start `command` (a run writing into `out`), appending its stderr to `out/stderr.txt`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stderr.txt", "ab") as stderr:
        return subprocess.Popen([str(part) for part in command], env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)


def finish(process: subprocess.Popen, out: Path) -> None:
    """Wait for the run to end, which must be a success (else its stderr's end is the failure)."""
    assert process.wait(timeout=TIMEOUT) == 0, (out / "stderr.txt").read_text()[-3000:]


def kill(process: subprocess.Popen) -> None:
    """`kill -9` the run, and wait for it to be gone."""
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def poll(process: subprocess.Popen, condition, timeout: float = TIMEOUT):
    """Check `condition()` every millisecond until it returns something truthy (returned) or the run exits (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            return None
        time.sleep(0.001)
    process.kill()
    raise AssertionError("the run neither reached the kill point nor finished")


def logged_steps(out: Path) -> int:
    """The last step in the run's train_log.jsonl (0 if none yet); a line being written is ignored."""
    try:
        lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except ValueError:
            continue
    return 0


def logged_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every line of the run's train_log.jsonl."""
    lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines)]
