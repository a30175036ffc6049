"""The parts of a pre-training run, each on its own: the time budget (`training/budget.py`: the step fit, the probe,
the clock and its saved state, the schedule, the progress bar), the log's trim when a run resumes
(`JsonlLogCallback`) and the encoder's release (`training/release.py`). The whole run: test_pretrain.py,
test_training_loop.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from transformers import TrainerControl, TrainerState, get_cosine_schedule_with_warmup
from transformers.trainer_callback import ProgressCallback

from macrl import MACRLForPreTraining, MACRLImageProcessor, MACRLModel
from macrl.training.budget import (
    STEP_TIME_SHARE,
    BudgetProgressCallback,
    ClockState,
    TrainingClock,
    fit_steps_to_budget,
    probe_step_seconds,
    steady_step_seconds,
    warmup_cosine,
)
from macrl.training.callbacks import JsonlLogCallback, RunCallbacks
from macrl.training.checkpoints import AtomicCheckpoints
from macrl.training.plan import ResumePoint
from macrl.training.release import EncoderRelease

# ------------------------------------------------------------------------------------------------ the time budget


def test_warmup_cosine_follows_the_stock_schedule_on_steps():
    steps, warmup = 200, 10
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    stock = get_cosine_schedule_with_warmup(optimizer, warmup, steps).lr_lambdas[0]
    for step in (0, 3, 10, 57, 150, 199, 200):
        assert warmup_cosine(step / steps, warmup / steps) == pytest.approx(stock(step), abs=1e-12)


def test_step_time_ignores_the_slow_first_steps():
    # the first steps of a fresh model, timed on a 2-core AVX2 machine: ~1.8x the steady 0.7 s at first
    durations = [1.25, 1.14, 0.84, 0.76, 0.71, 0.74, 0.65, 0.77, 0.70, 0.77]
    assert steady_step_seconds(durations) == pytest.approx(0.74)
    assert steady_step_seconds([0.5]) == 0.5
    with pytest.raises(ValueError, match="no step"):
        steady_step_seconds([])


def test_steps_fitted_to_a_budget_leave_room_and_are_at_least_one():
    assert fit_steps_to_budget(10, 0.25) == int(10 * 60 * STEP_TIME_SHARE / 0.25) == 2280
    assert fit_steps_to_budget(0.01, 5.0) == 1  # a step longer than the budget: still one


def test_step_probe_times_each_precision_it_is_given(fashion_images, tiny_config):
    """The budget's probe times real steps of every precision it is asked for (taking turns), on a throwaway copy."""
    model = MACRLForPreTraining(tiny_config())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pixels, _ = fashion_images
    dataset = [{"pixel_values": image, "momentum_pixel_values": image} for image in pixels]
    timed = probe_step_seconds(
        model, dataset, None, batch_size=16, num_workers=0, precisions=(False, True), device=torch.device("cpu")
    )
    assert set(timed) == {False, True} and all(seconds > 0 for seconds in timed.values())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    only = probe_step_seconds(
        model, dataset, None, batch_size=16, num_workers=0, precisions=(False,), device=torch.device("cpu")
    )
    assert list(only) == [False]


def _step(clock: TrainingClock, state: TrainerState) -> TrainerControl:
    """One optimiser step as the Trainer calls the clock: on_optimizer_step, then the step counted, on_step_end."""
    control = TrainerControl()
    clock.on_optimizer_step(None, state, control)
    state.global_step += 1
    clock.on_step_end(None, state, control)
    return control


def test_a_step_based_clock_counts_steps_and_never_stops_the_run():
    clock, state = TrainingClock(), TrainerState(max_steps=4)
    clock.on_train_begin(None, state, TrainerControl())
    for step in range(1, 5):
        control = _step(clock, state)
        assert clock.progress == step / 4 and not control.should_training_stop
    assert not clock.stopped_by_budget and clock.budget_seconds is None


def test_a_budget_clock_follows_the_time_and_stops_the_run_when_it_is_spent():
    clock, state = TrainingClock(max_minutes=1.0), TrainerState(max_steps=1000)
    clock.on_train_begin(None, state, TrainerControl())
    _step(clock, state)  # a first step of no time
    clock.started -= 30  # half of the minute spent, two steps of 1000 done: the time is further along
    control = _step(clock, state)
    assert clock.progress == pytest.approx(0.5, abs=0.01) and not control.should_training_stop
    clock.started -= 31  # the minute is spent: the run stops and saves, though the steps are not done
    control = _step(clock, state)
    assert clock.progress == 1.0 and clock.stopped_by_budget
    assert control.should_training_stop and control.should_save
    # a machine faster than the probe: the steps are further along than the time, and end the schedules
    fast, state = TrainingClock(max_minutes=60.0), TrainerState(max_steps=4)
    fast.on_train_begin(None, state, TrainerControl())
    for _ in range(4):
        _step(fast, state)
    assert fast.progress == 1.0 and not fast.stopped_by_budget


def test_a_slow_first_step_counts_against_the_budget_but_not_in_the_schedules(tmp_path):
    """A compile in the first step (a minute on 2 cores) would otherwise spend the warm-up before training starts."""
    clock, state = TrainingClock(max_minutes=1.0), TrainerState(max_steps=1000)
    clock.on_train_begin(None, state, TrainerControl())
    clock.started -= 20  # the first step takes 20 s of the minute
    _step(clock, state)
    assert clock.startup == pytest.approx(20, abs=0.5) and clock.progress == pytest.approx(1 / 1000, abs=0.01)
    clock.started -= 20  # half of the 40 s left: half of the schedules
    control = _step(clock, state)
    assert clock.progress == pytest.approx(0.5, abs=0.02) and not control.should_training_stop
    clock.started -= 20  # the minute is spent, first step included: the run stops
    control = _step(clock, state)
    assert clock.progress == 1.0 and control.should_training_stop
    # a checkpoint keeps the first steps' time, and a resumed process adds its own first step to it
    TrainerState(global_step=3, max_steps=1000, stateful_callbacks=[clock]).save_to_json(tmp_path / "state.json")
    saved = TrainerState.load_from_json(tmp_path / "state.json")
    assert TrainingClock.saved_in(saved).startup_seconds == pytest.approx(20, abs=0.5)
    resumed = TrainingClock(max_minutes=2.0)
    resumed.on_train_begin(None, saved, TrainerControl())
    resumed.started -= 10  # its own first step: 10 s more of startup
    _step(resumed, saved)
    assert resumed.startup_seconds() == pytest.approx(30, abs=1)
    assert resumed.progress == pytest.approx((70 - 30) / (120 - 30), abs=0.02)


def test_the_clock_saves_its_time_and_precision_and_a_resumed_run_counts_them(tmp_path):
    clock = TrainingClock(max_minutes=2.0, bf16=True)
    clock.on_train_begin(None, TrainerState(max_steps=100), TrainerControl())
    clock.started -= 45
    # a checkpoint's trainer_state.json, as the Trainer writes it
    state_file = tmp_path / "trainer_state.json"
    TrainerState(global_step=10, max_steps=100, stateful_callbacks=[clock]).save_to_json(state_file)
    saved = TrainerState.load_from_json(state_file)
    assert TrainingClock.saved_in(saved) == ClockState(spent_seconds=pytest.approx(45, abs=1), bf16=True)
    assert TrainingClock.saved_in(TrainerState()) is None  # a checkpoint of a run without the clock
    point = ResumePoint.read(str(tmp_path))  # what a --resume plans with
    assert (point.step, point.max_steps, point.clock) == (10, 100, TrainingClock.saved_in(saved))

    resumed = TrainingClock(max_minutes=2.0, bf16=True)
    resumed.on_train_begin(None, saved, TrainerControl())
    assert resumed.spent_seconds() == pytest.approx(45, abs=1)
    assert resumed.progress == pytest.approx(45 / 120, abs=0.01)  # where it stood: the schedules go on from there


def test_a_budget_runs_progress_bar_counts_the_budget_not_the_step_cap(tiny_config, tmp_path, capsys):
    """The bar of a 2-minute run counts to 120 s and moves with the clock (the stock bar would count to the Trainer's
    step cap, 1.5x the fitted steps); the Trainer shows it instead of the stock bar, and only for a budget run."""
    clock, state = TrainingClock(max_minutes=2.0), TrainerState(max_steps=2402, is_world_process_zero=True)
    clock.on_train_begin(None, state, TrainerControl())
    bar = BudgetProgressCallback(clock)
    bar.on_train_begin(None, state, TrainerControl())
    assert bar.training_bar.total == 120 and bar.training_bar.n == 0
    clock.started -= 60
    _step(clock, state)
    bar.on_step_end(None, state, TrainerControl())
    assert bar.training_bar.n == pytest.approx(60, abs=1)
    bar.on_train_end(None, state, TrainerControl())
    shown = capsys.readouterr().err
    assert "2-minute budget" in shown and "/120" in shown and "2402" not in shown

    from macrl.training.trainer import MACRLPretrainer
    from transformers import TrainingArguments

    arguments = TrainingArguments(output_dir=str(tmp_path / "staging"), use_cpu=True, report_to="none")
    for minutes, expected in ((2.0, BudgetProgressCallback), (None, ProgressCallback)):
        callbacks = RunCallbacks(clock=TrainingClock(max_minutes=minutes), checkpoints=AtomicCheckpoints(tmp_path, 1))
        trainer = MACRLPretrainer(
            MACRLForPreTraining(tiny_config()), arguments, run_callbacks=callbacks, global_batch_size=8
        )
        bars = [c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]
        assert [type(bar) for bar in bars] == [expected]


# ------------------------------------------------------------------------------------------- the log on a resume


def _write_log(path: Path, steps, cut: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in steps) + cut)


def test_a_resumed_run_drops_the_log_lines_past_its_checkpoint(tmp_path):
    """A run killed after its checkpoint at step 4 had logged steps 5-7 and half of a line: the resumed run trains
    (and logs) those steps again, so its log keeps steps 1-4 only, rewritten whole (never half of it)."""
    log = tmp_path / "logs" / "train_log.jsonl"
    _write_log(log, range(1, 8), cut='{"step": 8, "lo')
    state = TrainerState(global_step=4, is_world_process_zero=True)
    JsonlLogCallback(log).on_train_begin(None, state, TrainerControl())
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert log.read_text().endswith("\n") and list(log.parent.iterdir()) == [log]  # no .partial left behind

    # the next lines are appended after the kept ones
    JsonlLogCallback(log).on_log(None, TrainerState(global_step=5, epoch=1.0, is_world_process_zero=True),
                                 TrainerControl(), logs={"loss": 0.2})
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_a_log_with_nothing_to_drop_is_left_alone_and_other_processes_never_touch_it(tmp_path):
    log = tmp_path / "train_log.jsonl"
    _write_log(log, range(1, 4), cut='{"step": 4')  # a cut line without a newline
    before = log.stat().st_mtime_ns, log.read_text()
    JsonlLogCallback(log).on_train_begin(None, TrainerState(global_step=3, is_world_process_zero=False),
                                         TrainerControl())
    assert (log.stat().st_mtime_ns, log.read_text()) == before  # not rank 0: not its log
    _write_log(log, range(1, 4))
    before = log.stat().st_mtime_ns
    JsonlLogCallback(log).on_train_begin(None, TrainerState(global_step=3, is_world_process_zero=True),
                                         TrainerControl())
    assert log.stat().st_mtime_ns == before  # every line kept: not rewritten


# ------------------------------------------------------------------------------------------- the encoder release


def _release(tmp_path: Path, tiny_config, repo_id: str | None = None) -> tuple[EncoderRelease, MACRLForPreTraining]:
    torch.manual_seed(0)
    model = MACRLForPreTraining(tiny_config())
    release = EncoderRelease(
        folder=tmp_path / "encoder",
        processor=MACRLImageProcessor.from_model_config(model.config),
        dataset_name="fashion_mnist",
        evaluation_split="test",
        facts={"dataset": "fashion_mnist", "num_images": 60000, "batch_size": 256, "hardware": "1 x cpu"},
        repo_id=repo_id,
    )
    return release, model


def test_the_release_is_the_encoder_its_processor_and_a_card_of_the_run(tmp_path, tiny_config):
    release, model = _release(tmp_path, tiny_config)
    folder = release.export(model, {"steps": 12, "epochs": 0.1}, {"knn_accuracy": 80.0, "linear_probe_accuracy": 82.5})
    encoder = MACRLModel.from_pretrained(folder)
    assert all(torch.equal(tensor, model.macrl.state_dict()[name]) for name, tensor in encoder.state_dict().items())
    assert MACRLImageProcessor.from_pretrained(folder).to_dict() == release.processor.to_dict()
    card = (folder / "README.md").read_text()
    model_index = card.split("model-index:")[1].split("---")[0]
    assert "value: 0.8" in model_index and "value: 0.825" in model_index and "split: test" in model_index
    assert "60,000" in card or "60000" in card
    # a later export (the next checkpoint's) replaces what the folder held, its card included
    release.export(model, {"steps": 24})
    assert "model-index:" not in (folder / "README.md").read_text()


def test_the_release_updates_its_own_card_on_the_hub_and_keeps_one_the_repo_had(hub_server, tmp_path, tiny_config):
    ours, model = _release(tmp_path / "ours", tiny_config, repo_id="tester/ours")
    ours.export(model, {"steps": 1})
    ours.push("first")
    assert ours.owns_card  # the repo had no card: the run's own, updated by every later push
    (ours.folder / "README.md").write_text("# step 2\n")
    ours.push("second")
    assert Path(hf_hub_download("tester/ours", "README.md")).read_text() == "# step 2\n"

    HfApi().create_repo("tester/theirs")
    HfApi().upload_file(path_or_fileobj=b"# my own card\n", path_in_repo="README.md", repo_id="tester/theirs")
    theirs, model = _release(tmp_path / "theirs", tiny_config, repo_id="tester/theirs")
    theirs.export(model, {"steps": 1})
    theirs.push("weights")
    assert theirs.owns_card is False
    assert Path(hf_hub_download("tester/theirs", "README.md")).read_text() == "# my own card\n"
    assert hf_hub_download("tester/theirs", "model.safetensors")
