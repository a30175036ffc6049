"""Stop signals (`--stop-signals`): what a cluster's preemption or time limit does to `macrl-pretrain`.

A real run (`python -m macrl.pretrain`, or 2 gloo processes under `torchrun`) is sent SIGTERM in the middle of a
step: it must finish that step, write its checkpoint and log line, print one line naming the checkpoint and the
command that continues it, and exit 75; that command must then end with the bytes of a run never stopped. A second
signal stops it at once; with several processes, all of them stop after the same step, whichever got the signal.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from transformers import TrainerControl, TrainerState

from macrl.command_line import EXIT_STOPPED, OneLineErrorParser, run_command as run_a_command
from macrl.errors import RunStopped
from macrl.pretrain import build_parser
from macrl.training.budget import TrainingClock
from macrl.training.checkpoints import STAGING_DIR, checkpoint_problem
from macrl.training.stop_signals import StopSignals, parse_signals
from tests.pretrain_runs import (
    ENV, RUN_ARGS, TIMEOUT, finish, launch, logged_steps, poll, printed_command, run_command, same_weights_and_log,
)

STEPS = 16


def _stderr(out: Path) -> str:
    return (out / "stderr.txt").read_text()


def _stop_lines(out: Path) -> list[str]:
    """The lines that say a run stopped (where another process's progress bar shares a line, from the saying on)."""
    found = "macrl-pretrain: stopped by"
    return [line[line.index(found):] for line in _stderr(out).splitlines() if found in line]


def _stop_line(out: Path) -> str:
    lines = _stop_lines(out)
    assert len(lines) == 1, _stderr(out)[-3000:]
    return lines[0]


def _signal_after_step(process: subprocess.Popen, out: Path, step: int, target=None) -> None:
    """SIGTERM to `target()` (default: the run) once the run has logged `step`, so during step + 1."""
    log = out / "logs" / "train_log.jsonl"
    assert poll(process, lambda: log.is_file() and logged_steps(out) >= step) is not None, _stderr(out)[-3000:]
    os.kill(process.pid if target is None else target(), signal.SIGTERM)


def test_sigterm_mid_run_checkpoints_its_step_and_resumes_bit_identical(tmp_path, uninterrupted_run):
    reference = uninterrupted_run(STEPS)
    out = tmp_path / "run"
    process = launch(run_command(out, STEPS), out)
    _signal_after_step(process, out, 5)
    assert process.wait(timeout=TIMEOUT) == EXIT_STOPPED, _stderr(out)[-3000:]

    step = logged_steps(out)  # the step the signal arrived in, finished and logged
    assert 6 <= step < STEPS
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    assert checkpoint_problem(checkpoint) is None  # written whole, through the atomic path
    assert not list((out / "checkpoints" / STAGING_DIR).glob("checkpoint-*"))
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    line = _stop_line(out)
    assert line.startswith(f"macrl-pretrain: stopped by SIGTERM after step {step}; its checkpoint: {checkpoint}; "
                           "continue with: macrl-pretrain ")
    assert not (out / "results.json").exists() and not (out / "encoder").exists()  # left to the resumed run

    # the command it printed continues the run, which ends as if it had never been stopped
    finish(launch(printed_command(_stderr(out)), out), out)
    same_weights_and_log(out, reference)


def test_a_second_signal_stops_at_once(tmp_path):
    out = tmp_path / "run"
    process = launch(run_command(out, 200), out)
    _signal_after_step(process, out, 5)
    time.sleep(0.02)  # the first one noted, the step not yet over (a step and its checkpoint take longer)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM  # killed by it, as without the handlers
    assert "stopped by" not in _stderr(out)
    for folder in (out / "checkpoints").glob("checkpoint-*"):  # whatever it left: only complete checkpoints
        assert checkpoint_problem(folder) is None


def test_a_signal_to_every_process_of_the_run_stops_it_the_same_way(tmp_path):
    """SIGTERM to the run's whole process group (as Ctrl-C, SLURM's --signal without B: and `kill -- -PGID` send
    it): its DataLoader worker ignores it (torch's own handler would die of it and fail the run), the run stops."""
    out = tmp_path / "run"
    process = launch(run_command(out, 200, "--num-workers", "1"), out, start_new_session=True)
    _signal_after_step(process, out, 5, target=lambda: -process.pid)  # kill(-pgid): every process of the group
    assert process.wait(timeout=TIMEOUT) == EXIT_STOPPED, _stderr(out)[-3000:]
    step = logged_steps(out)
    assert _stop_line(out).startswith(f"macrl-pretrain: stopped by SIGTERM after step {step}; ")
    assert checkpoint_problem(out / "checkpoints" / f"checkpoint-{step}") is None


def test_stop_signals_note_the_first_and_give_the_second_to_the_previous_handler():
    """In this process: the handler only notes the first signal; the second goes to the handler that was there
    before (as if there were none); the previous handlers are back after the block, whatever happens in it."""
    previous = []
    signal.signal(signal.SIGUSR1, lambda number, frame: previous.append(number))
    try:
        stop = StopSignals(parse_signals(["usr1"]))
        with stop.installed():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.received == signal.SIGUSR1 and previous == []
            control = TrainerControl()
            stop.on_step_end(None, TrainerState(global_step=7), control)
            assert control.should_training_stop and control.should_save
            assert (stop.stopped_by, stop.stopped_at) == (signal.SIGUSR1, 7)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert previous == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)  # after the block: the previous handler again
        assert previous == [signal.SIGUSR1] * 2
        with pytest.raises(RuntimeError), StopSignals(parse_signals(["SIGUSR1"])).installed():
            raise RuntimeError("a failed run")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert previous == [signal.SIGUSR1] * 3
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


@pytest.mark.parametrize("names, message", [(["SIGNOPE"], "is not a signal"), (["KILL"], "SIGKILL cannot be caught")])
def test_parse_signals_refuses_what_cannot_stop_a_run(names, message):
    assert parse_signals(["TERM", "sigint", "10", "SIGTERM"]) == (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    with pytest.raises(ValueError, match=message):
        parse_signals(names)


def test_a_budget_run_keeps_its_budget_across_a_stop(tmp_path):
    """--max-minutes: the time spent before the stop is in its checkpoint, and the resumed run spends the rest."""
    budget = 6.0  # seconds
    out = tmp_path / "run"
    command = run_command(out, 0, "--max-steps", "-1", "--max-minutes", str(budget / 60))
    process = launch(command, out)
    _signal_after_step(process, out, 3)
    assert process.wait(timeout=TIMEOUT) == EXIT_STOPPED, _stderr(out)[-3000:]
    stopped = out / "checkpoints" / f"checkpoint-{logged_steps(out)}"
    spent = _spent_seconds(stopped)
    assert 0 < spent < budget

    finish(launch(printed_command(_stderr(out)), out), out)
    results = json.loads((out / "results.json").read_text())
    assert results["stopped_by_time_budget"]
    # the resumed run trained what was left of the budget, not a whole budget again
    assert results["training_seconds"] < budget - spent + 3
    final = out / "checkpoints" / f"checkpoint-{results['steps']}"
    assert budget <= _spent_seconds(final) < budget + 3


def _spent_seconds(checkpoint: Path) -> float:
    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return TrainingClock.saved_in(state).spent_seconds


def _torchrun(out: Path, steps: int, *extra) -> list[str]:
    command = run_command(out, steps, *extra)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command[1:]]


def _worker(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of `torchrun`'s worker of `rank`."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "macrl.pretrain" in child.cmdline():
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.parametrize("target", ["worker", "launcher"])
def test_two_processes_stop_after_the_same_step(tmp_path, target):
    """2 gloo processes under torchrun: the signal reaches one worker (rank 1, which does not write the checkpoint),
    or the launcher, which passes it to both (each at its own moment): both stop after the same step, and its
    checkpoint holds the state of both."""
    out = tmp_path / "run"
    launcher = launch(_torchrun(out, 200), out)
    _signal_after_step(launcher, out, 4, target=(lambda: _worker(launcher, 1)) if target == "worker" else None)
    launcher.wait(timeout=TIMEOUT)
    lines = _stop_lines(out)
    assert len(lines) == 2 and lines[0] == lines[1], _stderr(out)[-3000:]  # one per process: the same step
    step = logged_steps(out)
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    assert lines[0].startswith(f"macrl-pretrain: stopped by SIGTERM after step {step}; its checkpoint: {checkpoint}; "
                               "continue with: torchrun --standalone --nproc-per-node 2 -m macrl.pretrain ")
    assert checkpoint_problem(checkpoint) is None
    assert {path.name for path in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step


@pytest.mark.slow
def test_two_processes_stopped_twice_resume_bit_identical(tmp_path):
    """Stopped through a worker, then through the launcher, then resumed to the end: the bytes of 2 processes never
    stopped."""
    steps = 12
    reference = tmp_path / "reference"
    finish(launch(_torchrun(reference, steps), reference), reference)
    out = tmp_path / "run"
    launcher = launch(_torchrun(out, steps), out)
    _signal_after_step(launcher, out, 2, target=lambda: _worker(launcher, 1))
    launcher.wait(timeout=TIMEOUT)
    first = logged_steps(out)
    launcher = launch(printed_command(_stderr(out)), out)
    _signal_after_step(launcher, out, first + 3)
    launcher.wait(timeout=TIMEOUT)
    assert logged_steps(out) > first + 3
    second = logged_steps(out)
    finish(launch(printed_command(_stderr(out)), out), out)
    same_weights_and_log(out, reference)
    stops = [line.split(";")[0] for line in _stop_lines(out)]
    assert stops == [f"macrl-pretrain: stopped by SIGTERM after step {step}" for step in (first, first, second, second)]


class _Writes(io.StringIO):
    """A stderr that keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_the_stop_line_is_one_write(monkeypatch):
    """stderr is unbuffered: a line written in two pieces (print's text, then its newline) runs into the line of
    another process stopping at the same moment, as torchrun's processes do; the stop line is one write."""

    def stopped(args):
        raise RunStopped("stopped by SIGTERM after step 5; its checkpoint: run/checkpoints/checkpoint-5",
                         resume_from=Path("run/checkpoints/checkpoint-5"))

    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    code = run_a_command("macrl-pretrain", OneLineErrorParser(), stopped, [], resume="macrl-pretrain --resume")
    line = "macrl-pretrain: stopped by SIGTERM after step 5; its checkpoint: run/checkpoints/checkpoint-5; " \
           "continue with: macrl-pretrain --resume\n"
    assert code == EXIT_STOPPED and line in stderr.writes, stderr.writes


def test_stop_signals_flag():
    """`--stop-signals` with no value is none (each signal does what it does by default); the default is
    SIGTERM, SIGINT and SIGUSR1."""
    (default,) = build_parser().parse_args_into_dataclasses(args=[])
    (none,) = build_parser().parse_args_into_dataclasses(args=["--stop-signals"])
    (usr2,) = build_parser().parse_args_into_dataclasses(args=["--stop-signals", "SIGUSR2", "TERM"])
    assert parse_signals(default.stop_signals) == (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    assert none.stop_signals == [] and parse_signals(usr2.stop_signals) == (signal.SIGUSR2, signal.SIGTERM)


def _slurm_recipe() -> str:
    """The bash of docs/reliability.md's SLURM recipe."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    return text.split("<!-- slurm-recipe -->\n```bash\n", 1)[1].split("```", 1)[0]


def test_slurm_recipe_stops_requeues_and_resumes(tmp_path):
    """The recipe's bash, run as SLURM would run it (no SLURM here: one process instead of torchrun, a stand-in
    `scontrol` that notes its arguments): SIGUSR1 to the script stops the run with a checkpoint and requeues the
    job; the requeued job continues the run to its end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    flags = " ".join(RUN_ARGS + ["--max-steps", "30"])
    script = tmp_path / "job.sbatch"
    recipe = _slurm_recipe()
    lines = recipe.splitlines()
    lines = [f"LAUNCH=({sys.executable} -m macrl.pretrain)" if line.startswith("LAUNCH=") else
             f'FLAGS=({flags} --output-dir "$OUT")' if line.startswith("FLAGS=") else line for line in lines]
    assert lines != recipe.splitlines()
    script.write_text("\n".join(lines) + "\n")
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SCONTROL_LOG": str(tmp_path / "scontrol.log")}
    out = tmp_path / "runs" / "vit-b"

    job = launch(["bash", script], out, env=env, cwd=tmp_path)
    log = out / "logs" / "train_log.jsonl"
    assert poll(job, lambda: log.is_file() and logged_steps(out) >= 5) is not None, _stderr(out)[-3000:]
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=TIMEOUT) == EXIT_STOPPED, _stderr(out)[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n"
    step = logged_steps(out)
    assert checkpoint_problem(out / "checkpoints" / f"checkpoint-{step}") is None

    requeued = launch(["bash", script], out, env=env, cwd=tmp_path)
    assert requeued.wait(timeout=TIMEOUT) == 0, _stderr(out)[-3000:]
    assert json.loads((out / "results.json").read_text())["steps"] == 30
    assert "resuming" in _stderr(out) and (tmp_path / "scontrol.log").read_text() == "requeue 42\n"


def test_a_run_with_data_workers_exits_when_it_is_done(tmp_path):
    # the workers ignore SIGTERM, which multiprocessing's exit handler sends the daemonic children still alive before
    # it joins them: the Trainer's persistent workers hung the main job at exit, its results written
    out = tmp_path / "run"
    try:
        done = subprocess.run(run_command(out, 4, "--num-workers", "1"), env=ENV,
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not exit within 180 s of starting (4 tiny steps)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "results.json").is_file()
