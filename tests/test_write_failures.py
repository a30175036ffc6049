"""A full disk (or any failed write) while `macrl-pretrain` writes a checkpoint, the log, the model, the pictures, the
encoder or results.json: one line naming what and where, what the error number means, and what is safe (the previous
checkpoint, untouched, and the command that continues from it); no partial checkpoint left in staging.

The disk is really full on a small tmpfs (mounted here: we are root in CI; skipped with the reason where mounting is
refused), and the failure is injected into one writer in this process for the other outputs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from macrl.atomic_files import atomic_path
from macrl.errors import OutputWriteError
from macrl.modeling_macrl import MACRLForPreTraining
from macrl.pretrain import main
from macrl.training.checkpoints import STAGING_DIR, checkpoint_problem
from macrl.training.release import EncoderRelease
from macrl.write_failures import write_failure, writing
from tests.pretrain_runs import RUN_ARGS, printed_command

ENOSPC = "No space left on device (ENOSPC)"


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def _resume_in_process(line: str) -> int:
    """Run the command a failed run printed in this process (`main` of its flags)."""
    return main(printed_command(line)[3:])


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a tiny run's first checkpoint, 580 kB, fits; its second does not); `grow()` remounts it with
    room to spare, as freeing space would."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)

    try:
        yield folder, grow
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_while_writing_a_checkpoint(small_tmpfs, capsys):
    folder, grow = small_tmpfs
    out = folder / "run"
    args = [*RUN_ARGS, "--max-steps", "8", "--save-steps", "2", "--output-dir", str(out)]
    assert main(args) == 1
    line = _one_line(capsys)
    checkpoints = out / "checkpoints"
    staged = checkpoints / STAGING_DIR / "checkpoint-4"
    assert line.startswith(f"macrl-pretrain: error: could not write checkpoint-4 to {staged}: {ENOSPC}")
    assert (f"; the partial checkpoint is removed; {checkpoints / 'checkpoint-2'} is complete and untouched; "
            "continue with: macrl-pretrain ") in line
    assert not staged.exists() and checkpoint_problem(checkpoints / "checkpoint-2") is None

    grow()  # space freed: the command it printed finishes the run
    assert _resume_in_process(line) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 8


def test_write_failure_reads_the_error_number_of_each_writer(small_tmpfs):
    """What safetensors and torch.save raise on a full disk (neither an OSError) is read as ENOSPC."""
    folder, _ = small_tmpfs
    big = {"weights": torch.zeros(2**19)}  # 2 MiB
    with pytest.raises(SafetensorError) as safetensors_error:
        save_file(big, folder / "model.safetensors")
    assert write_failure(safetensors_error.value, folder) == ENOSPC
    with pytest.raises(RuntimeError) as torch_error:
        torch.save(big, folder / "optimizer.pt")
    assert write_failure(torch_error.value, folder).startswith(f"{ENOSPC}, ")  # inferred from the free space
    assert write_failure(OSError(errno.EDQUOT, "quota"), folder) == "Disk quota exceeded (EDQUOT)"
    assert write_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), folder) is None  # not a write
    assert write_failure(ValueError("bad"), folder) is None
    with pytest.raises(OutputWriteError) as raised, writing("the thing", folder, safe="x is safe", resume_from="y"):
        save_file(big, folder / "model.safetensors")
    assert str(raised.value) == f"could not write the thing to {folder}: {ENOSPC}; x is safe"
    assert raised.value.resume_from == "y"
    with pytest.raises(ZeroDivisionError), writing("the thing", folder):  # any other error goes through
        1 / 0


def test_a_write_error_while_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    """ENOSPC injected into torch.save for checkpoint-4's optimizer: the same line, checkpoint-2 byte for byte as it
    was, nothing left in staging, and the printed command finishes the run."""
    out = tmp_path / "run"
    real_save = torch.save
    before = {}

    def save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            before.update(_files(out / "checkpoints" / "checkpoint-2"))
            _full_disk()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main([*RUN_ARGS, "--max-steps", "6", "--save-steps", "2", "--output-dir", str(out)]) == 1
    line = _one_line(capsys)
    staged = out / "checkpoints" / STAGING_DIR / "checkpoint-4"
    assert line.startswith(f"macrl-pretrain: error: could not write checkpoint-4 to {staged}: {ENOSPC}; the partial "
                           f"checkpoint is removed; {out / 'checkpoints' / 'checkpoint-2'} is complete and untouched; "
                           "continue with: macrl-pretrain ")
    assert before and _files(out / "checkpoints" / "checkpoint-2") == before
    assert not list((out / "checkpoints" / STAGING_DIR).iterdir())
    monkeypatch.setattr(torch, "save", real_save)
    assert _resume_in_process(line) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 6


def _failing_results_json(monkeypatch):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".results.json."):
            _full_disk()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def _failing_model(monkeypatch):
    real = MACRLForPreTraining.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):
        if Path(folder).name == "run":  # the output folder, not a checkpoint
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(self, folder, *args, **kwargs)

    monkeypatch.setattr(MACRLForPreTraining, "save_pretrained", save_pretrained)


FINISH_WRITES = {
    "the pre-training model": ("", _failing_model),
    "the pictures": ("pictures", lambda patch: patch.setattr(matplotlib.figure.Figure, "savefig", _full_disk)),
    "the encoder": ("encoder", lambda patch: patch.setattr(EncoderRelease, "export", _full_disk)),
    "results.json": ("results.json", _failing_results_json),
    "the training log": (None, lambda patch: patch.setattr(Path, "open", _failing_log_open(Path.open))),
}


def _failing_log_open(real):
    def open_(self, mode="r", *args, **kwargs):
        if self.name == "train_log.jsonl" and "a" in mode and self.exists() and len(self.read_text().splitlines()) >= 3:
            _full_disk()
        return real(self, mode, *args, **kwargs)

    return open_


@pytest.mark.parametrize("what", FINISH_WRITES)
def test_a_write_error_after_the_training(tmp_path, monkeypatch, capsys, what):
    """The outputs written after the training (and the log during it): one line naming it, the last checkpoint safe,
    and the command that continues from it."""
    out = tmp_path / "run"
    where, inject = FINISH_WRITES[what]
    inject(monkeypatch)
    assert main([*RUN_ARGS, "--max-steps", "4", "--save-steps", "2", "--output-dir", str(out)]) == 1
    line = _one_line(capsys)
    checkpoints = out / "checkpoints"
    if where is None:  # the log of step 4, during the training: checkpoint-2 is the last
        assert line.startswith(f"macrl-pretrain: error: could not write the training log to "
                               f"{out / 'logs' / 'train_log.jsonl'}: {ENOSPC}; {checkpoints / 'checkpoint-2'} is "
                               "complete and untouched; continue with: macrl-pretrain ")
        return
    target = out / where if where else out
    assert line.startswith(f"macrl-pretrain: error: could not write {what} to {target}: {ENOSPC}; the training's "
                           f"last checkpoint, {checkpoints / 'checkpoint-4'}, is complete and untouched (--resume "
                           "from it trains no more steps and writes the outputs); continue with: macrl-pretrain ")
    assert checkpoint_problem(checkpoints / "checkpoint-4") is None
    if what == "results.json":
        assert not list(out.glob("*results.json*"))  # no half of a file
        monkeypatch.undo()
        assert _resume_in_process(line) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["steps"] == 4 and (out / "encoder" / "model.safetensors").is_file()


def test_atomic_path_leaves_nothing_on_a_failed_write(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")
    _failing_results_json(monkeypatch)
    with pytest.raises(OSError), atomic_path(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
