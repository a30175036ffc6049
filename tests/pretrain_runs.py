"""`macrl-pretrain` runs as subprocesses, for the tests that kill, stop and resume them: the short run they all make
(`RUN_ARGS`, `run_command`), start one with its stderr kept in its output folder, wait for a point in it, kill it,
wait for it to end, read its log, and turn the command a stopped run prints into one to start (`printed_command`)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

# one thread: a run killed and resumed must give the bytes of a run never interrupted
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 1200  # a hung run fails the test instead of blocking CI (generous: CI machines can be slow)

# the tiny preset on 48 Fashion-MNIST images (3 steps per epoch), a checkpoint every 4 steps: mid-epoch
RUN_ARGS = [
    "--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--logging-steps", "1", "--save-steps", "4",
    "--limit-images", "48", "--no-knn", "--seed", "3",
]


def run_command(out: Path, steps: int, *extra) -> list[str]:
    """`python -m macrl.pretrain` with `RUN_ARGS`, `steps` steps, into `out`."""
    return [sys.executable, "-m", "macrl.pretrain", *RUN_ARGS, "--max-steps", str(steps), "--output-dir", str(out),
            *extra]


def printed_command(stderr: str) -> list[str]:
    """The command after "continue with: " on the last line of a run's stderr that has it, as an argv to start
    (`macrl-pretrain` and `torchrun` through this Python)."""
    line = next(line for line in reversed(stderr.splitlines()) if "; continue with: " in line)
    argv = shlex.split(line.split("; continue with: ", 1)[1])
    if argv[0] == "macrl-pretrain":
        return [sys.executable, "-m", "macrl.pretrain", *argv[1:]]
    assert argv[0] == "torchrun", line
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]


def launch(command: list, out: Path, **popen) -> subprocess.Popen:
    """Start `command` (a run writing into `out`; `popen`: more `subprocess.Popen` arguments), appending its stderr
    to `out/stderr.txt`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stderr.txt", "ab") as stderr:
        return subprocess.Popen([str(part) for part in command], env=popen.pop("env", ENV), stdout=subprocess.DEVNULL,
                                stderr=stderr, **popen)


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


def same_weights_and_log(out: Path, reference: Path) -> None:
    """Assert that the run in `out` ended with `reference`'s bytes (model, encoder) and logged its losses."""
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    encoder = Path("encoder") / "model.safetensors"
    assert (out / encoder).read_bytes() == (reference / encoder).read_bytes()
    assert logged_losses(out) == logged_losses(reference)


def logged_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every line of the run's train_log.jsonl."""
    lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines)]
