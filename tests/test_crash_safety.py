"""Crash safety of `macrl-pretrain`: `kill -9` at random points, then `--resume` until done.

Every run trains the tiny preset on 48 Fashion-MNIST images (3 steps per epoch), so the checkpoints (every 4 steps)
fall in the middle of an epoch and a resumed run has to skip into it. The runs that are killed, resumed and compared
are `python -m macrl.pretrain` subprocesses with the same environment (OMP_NUM_THREADS=1), so an interrupted and
resumed run must end with a `model.safetensors` that is byte for byte the one of an uninterrupted run with the same
seed. The tests of hand-made or damaged checkpoints call `macrl.pretrain.main` in this process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from macrl.pretrain import main
from macrl.training.checkpoints import STAGING_DIR, AtomicCheckpoints, CheckpointError, checkpoint_problem
from macrl.training.trainer import MACRLPretrainer
from tests.pretrain_runs import (
    RUN_ARGS, finish, kill, launch, logged_steps, poll, run_command, same_weights_and_log,
)


def _launch(out: Path, steps: int) -> subprocess.Popen:
    """Start a run; `--resume` as soon as the output folder holds a checkpoint (`--resume` refuses an empty one)."""
    checkpoints = out / "checkpoints"
    resume = ["--resume"] if checkpoints.is_dir() and get_last_checkpoint(checkpoints) else []
    return launch(run_command(out, steps, *resume), out)


def _staging_entries(out: Path) -> dict[str, tuple[int, int]]:
    staging = out / "checkpoints" / STAGING_DIR
    entries = {}
    for path in staging.glob("checkpoint-*") if staging.is_dir() else ():
        if not path.name.split("-", 1)[1].isdigit():  # an old checkpoint on its way out (rotation): not a write
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # renamed into place in the meantime
            continue
        entries[path.name] = (stat.st_ino, stat.st_ctime_ns)
    return entries


def _assert_visible_checkpoints_complete(out: Path) -> None:
    """The invariant a kill may never break: every `checkpoint-N` in place can be resumed from exactly."""
    for folder in (out / "checkpoints").glob("checkpoint-*"):
        assert checkpoint_problem(folder) is None, (folder, checkpoint_problem(folder))


def _kill_during_write(out: Path, steps: int) -> tuple[str, bool] | None:
    """Run until a checkpoint is being written in `.staging/` and kill it there.

    Returns the checkpoint's name and whether the kill landed while it was still in staging (False: the rename won
    the race and the run was killed just after that checkpoint), or None if the run finished without a write.
    """
    stale = _staging_entries(out)  # left by an earlier kill: not the write we are waiting for
    process = _launch(out, steps)

    def writing():
        fresh = [name for name, key in _staging_entries(out).items() if stale.get(name) != key]
        return fresh[0] if fresh else None

    name = poll(process, writing)
    if name is None:
        finish(process, out)
        return None
    kill(process)
    staged = out / "checkpoints" / STAGING_DIR / name
    return name, staged.is_dir() and not (out / "checkpoints" / name).exists()


def _kill_after_checkpoint(out: Path, steps: int, checkpoint: int, delay: float) -> bool:
    """Kill the run `delay` seconds after `checkpoint-<checkpoint>` is in place; False if it finished before."""
    process = _launch(out, steps)
    target = out / "checkpoints" / f"checkpoint-{checkpoint}"
    if poll(process, target.is_dir) is None:
        finish(process, out)
        return False
    time.sleep(delay)
    if process.poll() is not None:
        return False
    kill(process)
    return True


def _latest_checkpoint_step(out: Path) -> int:
    """The step of the newest visible checkpoint (0 if none)."""
    return max([int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")] + [0])


def _kill_after_step(out: Path, steps: int, step: int) -> None:
    """Kill the run as soon as it has logged `step` (so during step + 1): a point in the run, whatever its speed."""
    assert step > _latest_checkpoint_step(out)
    log = out / "logs" / "train_log.jsonl"
    launched = time.time_ns()  # until the new run rewrites the log, it may hold steps the killed run logged

    def reached():
        return log.is_file() and log.stat().st_mtime_ns > launched and logged_steps(out) >= step

    process = _launch(out, steps)
    assert poll(process, reached) is not None, "the run ended before the kill point"
    kill(process)


def _resume_to_end(out: Path, steps: int) -> None:
    finish(_launch(out, steps), out)


def _assert_same_run(out: Path, reference: Path) -> None:
    """Bit-identical weights, the same log, the same checkpoints in place and nothing left in staging."""
    same_weights_and_log(out, reference)  # every step logged once, with the loss of the uninterrupted run
    names = lambda run: {p.name for p in (run / "checkpoints").glob("checkpoint-*")}
    # a kill between the rename of checkpoint-N and the rotation leaves one older checkpoint more (complete: every
    # visible one is), which the next save rotates away
    assert names(reference) <= names(out)
    for name in names(reference):
        assert (out / "checkpoints" / name / "model.safetensors").read_bytes() == (
            reference / "checkpoints" / name / "model.safetensors"
        ).read_bytes()
    _assert_visible_checkpoints_complete(out)
    _assert_staging_clean(out)


def _assert_staging_clean(out: Path) -> None:
    """Every run clears what killed runs left in staging before it trains."""
    staging = out / "checkpoints" / STAGING_DIR
    assert not staging.exists() or not list(staging.iterdir())


@pytest.fixture
def reference(uninterrupted_run):
    """`reference(steps)`: the uninterrupted run of `steps` steps (conftest's `uninterrupted_run`)."""
    return uninterrupted_run


def test_kill_9_mid_step_and_mid_checkpoint_write_then_resume_is_bit_identical(tmp_path, reference):
    steps, rng = 16, random.Random(6)
    expected = reference(steps)
    out = tmp_path / "run"
    started = time.monotonic()

    # 1. in the middle of a (seeded, random) step after the first checkpoint
    killed_at = rng.randint(5, 7)
    _kill_after_step(out, steps, killed_at)
    _assert_visible_checkpoints_complete(out)
    assert get_last_checkpoint(out / "checkpoints") == str(out / "checkpoints" / "checkpoint-4")

    # 2. while a checkpoint is being written (a few tries: a write takes milliseconds)
    caught = None
    for _ in range(3):
        result = _kill_during_write(out, steps)
        assert result is not None, "the run finished before a kill landed inside a checkpoint write"
        if result[1]:
            caught = result[0]
            break
    assert caught, "no kill landed inside a checkpoint write in 3 tries"
    checkpoints = out / "checkpoints"
    assert (checkpoints / STAGING_DIR / caught).is_dir() and not (checkpoints / caught).exists()
    _assert_visible_checkpoints_complete(out)
    latest = get_last_checkpoint(checkpoints)
    assert latest is not None and int(latest.rsplit("-", 1)[1]) < int(caught.rsplit("-", 1)[1])

    # 3. resume until done: the same run as if nothing had happened
    _resume_to_end(out, steps)
    _assert_same_run(out, expected)
    print(f"killed during step {killed_at + 1} and while writing {caught}; {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_many_random_kills_then_resume_is_bit_identical(tmp_path, reference):
    """24 steps, killed at 6 seeded random points (mid-step, mid-write, after the last checkpoint) and resumed."""
    steps, rng = 24, random.Random(20240611)
    expected = reference(steps)
    out = tmp_path / "run"
    plan = []
    # during the first steps, before any checkpoint exists: the run starts again from scratch
    step = rng.randint(1, 3)
    _kill_after_step(out, steps, step)
    plan.append(f"during step {step + 1}, before the first checkpoint")
    for _ in range(4):
        done = _latest_checkpoint_step(out)
        checkpoint = min(done + 4 * rng.randint(1, 2), steps - 4)
        # never two kills inside writes in a row: the resumed run would only write the same checkpoint again
        if (rng.random() < 0.6 and not plan[-1].startswith("writing")) or checkpoint <= done:
            result = _kill_during_write(out, steps)
            if result is None:  # no checkpoint left to write: the run finished
                plan.append("(finished)")
                break
            plan.append(f"writing {result[0]} ({'in staging' if result[1] else 'just renamed'})")
        else:
            step = checkpoint + rng.randint(0, 3)
            _kill_after_step(out, steps, step)
            plan.append(f"during step {step + 1}")
        _assert_visible_checkpoints_complete(out)
    # the last checkpoint is in place but the final export has not happened yet
    assert _kill_after_checkpoint(out, steps, steps, delay=0.0)
    plan.append(f"right after checkpoint-{steps}")
    _assert_visible_checkpoints_complete(out)
    _resume_to_end(out, steps)
    _assert_same_run(out, expected)
    print("kill points:", "; ".join(plan))


def test_partial_checkpoints_in_staging_are_never_resumed_from(tmp_path, reference):
    """What a kill inside a write leaves in `.staging/` (here made by hand: a truncated model.safetensors next to a
    complete trainer_state.json) is never taken as the latest checkpoint and is replaced by the real one."""
    expected = reference(12)
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    shutil.copytree(expected / "checkpoints" / "checkpoint-8", checkpoints / "checkpoint-8")
    partial = checkpoints / STAGING_DIR / "checkpoint-12"
    shutil.copytree(expected / "checkpoints" / "checkpoint-12", partial)
    weights = (partial / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "model.safetensors is truncated" in checkpoint_problem(partial)
    assert get_last_checkpoint(checkpoints) == str(checkpoints / "checkpoint-8")

    _resume_to_end(out, 12)
    assert (out / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    assert (checkpoints / "checkpoint-12" / "model.safetensors").read_bytes() == weights
    _assert_staging_clean(out)


FAST_IN_PROCESS = [*RUN_ARGS, "--max-steps", "12"]


def _file_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_hand_made_checkpoint_without_trainer_state_fails_clearly(tmp_path, reference, capsys):
    """A `checkpoint-N` folder that MACRLPretrainer did not write (it renames only complete ones into place) is
    refused with one line naming it, rather than skipped: skipping would resume from an older step without saying
    so, and a later save of step N would replace the folder."""
    expected = reference(12)
    out = tmp_path / "run"
    shutil.copytree(expected / "checkpoints" / "checkpoint-8", out / "checkpoints" / "checkpoint-8")
    foreign = out / "checkpoints" / "checkpoint-16"
    foreign.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(expected / "checkpoints" / "checkpoint-8" / name, foreign / name)
    assert get_last_checkpoint(out / "checkpoints") == str(foreign)  # transformers' pick: the highest number
    before = _file_state(out)

    assert main([*FAST_IN_PROCESS, "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"macrl-pretrain: error: --resume: {foreign} is not a complete checkpoint (no trainer_state.json)")
    assert _file_state(out) == before  # nothing written, nothing deleted

    # the way out the message points to: resume from a complete checkpoint by name
    assert main([*FAST_IN_PROCESS, "--output-dir", str(out), "--resume", str(out / "checkpoints" / "checkpoint-8")]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 12


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "no optimizer.pt": lambda folder: (folder / "optimizer.pt").unlink(),
    "no rng_state.pth": lambda folder: (folder / "rng_state.pth").unlink(),
    "model.safetensors is truncated": lambda folder: _truncate(folder / "model.safetensors"),
    "optimizer.pt is truncated": lambda folder: _truncate(folder / "optimizer.pt"),
    "scheduler.pt is truncated": lambda folder: _truncate(folder / "scheduler.pt"),
    "trainer_state.json is truncated": lambda folder: _truncate(folder / "trainer_state.json"),
    "config.json is truncated": lambda folder: _truncate(folder / "config.json"),
}


def test_checkpoint_problem_names_each_kind_of_damage(tmp_path, reference):
    source = reference(12) / "checkpoints" / "checkpoint-8"
    assert checkpoint_problem(source) is None
    for problem, damage in DAMAGE.items():
        folder = tmp_path / problem.replace(" ", "_")
        shutil.copytree(source, folder)
        damage(folder)
        assert checkpoint_problem(folder).startswith(problem), problem
        # the trainer itself refuses it too (for code that drives MACRLPretrainer without macrl-pretrain), before
        # touching anything: the stock Trainer would resume with a fresh optimizer or fail with a bare traceback
        with pytest.raises(CheckpointError, match=f"is not a complete checkpoint \\({problem}"):
            MACRLPretrainer.train(SimpleNamespace(), resume_from_checkpoint=str(folder))


@pytest.mark.parametrize("problem", ["no optimizer.pt", "model.safetensors is truncated", "optimizer.pt is truncated"])
def test_damaged_complete_looking_checkpoint_is_refused(tmp_path, reference, capsys, problem):
    """A checkpoint with trainer_state.json but a missing or truncated file (an interrupted copy, a disk error).
    Without the check the stock Trainer resumes silently with a fresh optimizer (a different run) or dies with a
    bare torch/safetensors traceback."""
    out = tmp_path / "run"
    folder = out / "checkpoints" / "checkpoint-8"
    shutil.copytree(reference(12) / "checkpoints" / "checkpoint-8", folder)
    DAMAGE[problem](folder)
    assert main([*FAST_IN_PROCESS, "--output-dir", str(out), "--resume"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"macrl-pretrain: error: --resume: {folder} is not a complete checkpoint ({problem}")
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints" / "checkpoint-12").exists()


def test_checkpoint_files_are_on_disk_before_the_rename(tmp_path, monkeypatch):
    """kill -9 keeps the page cache, a power cut does not: every file of checkpoint-N is fsynced before the
    rename that makes checkpoint-N visible."""
    synced, renames = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        synced.append(os.path.realpath(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    def replace(source, target, *args, **kwargs):
        renames.append((os.path.realpath(source), os.path.realpath(target), set(synced)))
        real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    assert main([*RUN_ARGS, "--max-steps", "4", "--save-steps", "2", "--output-dir", str(out)]) == 0
    checked = 0
    for source, target, synced_before in renames:
        if Path(target).parent == (out / "checkpoints").resolve() and Path(target).name.startswith("checkpoint-"):
            files = [p for p in Path(target).rglob("*") if p.is_file()]
            assert files
            for file in files:
                assert str(Path(source) / file.relative_to(target)) in synced_before, file
            assert source in synced_before  # and the folder, for its entries
            checked += 1
    assert checked == 2  # checkpoint-2 and checkpoint-4


def test_rotation_never_leaves_a_half_deleted_checkpoint(tmp_path, reference, monkeypatch):
    """A kill while an old checkpoint is being deleted (save_total_limit) leaves no partial `checkpoint-N` in place:
    MACRLPretrainer renames it into staging first; transformers' `rotate_checkpoints` deletes it where it is."""

    def killed_while_deleting(path, ignore_errors=False):  # removes half the files, then the process "dies"
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            for file in files[: len(files) // 2]:
                file.unlink()
            raise KeyboardInterrupt

    for rotate in ("macrl", "transformers"):
        checkpoints = tmp_path / rotate / "checkpoints"
        for name in ("checkpoint-8", "checkpoint-12"):
            shutil.copytree(reference(12) / "checkpoints" / name, checkpoints / name)
        (checkpoints / STAGING_DIR).mkdir()
        with monkeypatch.context() as patch:
            patch.setattr(shutil, "rmtree", killed_while_deleting)
            with pytest.raises(KeyboardInterrupt):
                if rotate == "macrl":
                    AtomicCheckpoints(checkpoints, save_total_limit=1)._rotate(checkpoints / STAGING_DIR)
                else:
                    rotate_checkpoints(str(checkpoints), save_total_limit=1)
        visible = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
        if rotate == "macrl":
            assert visible == ["checkpoint-12"]
            _assert_visible_checkpoints_complete(checkpoints.parent)
        else:  # the failure this guards against
            assert visible == ["checkpoint-12", "checkpoint-8"] and checkpoint_problem(checkpoints / "checkpoint-8")
