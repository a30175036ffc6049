"""Pre-training data at scale: WebDataset tar shards and streaming `datasets`, split across DataLoader workers and
gloo processes (every image once per epoch, seeds by key whatever the split), resumed mid-epoch, corrupt samples and
truncated shards named.

The shards are real tars of Fashion-MNIST PNGs (+ `cls` labels) that `shard_files.write_shards` writes; the processes
are real gloo process groups (torch.multiprocessing).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from macrl.data import (
    BatchedTwoViewDataset,
    StreamCollator,
    StreamingTwoViewDataset,
    StreamPositions,
    UnreadableImageError,
    UnreadableShardError,
    open_stream,
)
from macrl.data.fashion_mnist import load_fashion_mnist
from macrl.pretrain import main
from tests.image_folders import write_class_folders
from tests.pretrain_runs import finish, kill, launch, logged_losses, logged_steps, poll
from tests.shard_files import fashion_samples, write_shards

IMAGES, SHARDS, BUFFER = 192, 4, 32
NUM_PATCHES = 49


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), IMAGES, SHARDS)


def _dataset(pattern: str, buffer: int = BUFFER, **kwargs) -> StreamingTwoViewDataset:
    views = BatchedTwoViewDataset(None, num_patches=NUM_PATCHES, seed=5)
    return StreamingTwoViewDataset(open_stream(pattern, "L"), views, "L", buffer_size=buffer, with_keys=True, **kwargs)


def _read(dataset, batches: int, workers: int, batch_size: int = 8) -> list[dict]:
    """`batches` batches of a DataLoader with `workers` workers, as lists of samples."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)
    samples = []
    for number, batch in enumerate(loader):
        if number == batches:
            break
        samples.extend(batch)
    return samples


def _by_epoch(samples: list[dict]) -> dict[int, Counter]:
    seen: dict[int, Counter] = {}
    for sample in samples:
        seen.setdefault(sample["epoch"], Counter())[sample["key"]] += 1
    return seen


def _all_keys() -> set[str]:
    per = IMAGES // SHARDS
    return {f"train-{i // per:06d}.tar/fmnist_{i:06d}" for i in range(IMAGES)}


def test_shards_are_read_with_keys_labels_and_counted(shards):
    stream = open_stream(shards, "L")
    assert len(stream.shards) == SHARDS and stream.count_images() == IMAGES
    images, labels = load_fashion_mnist("train")
    samples = list(stream.samples(1))
    assert len(samples) == IMAGES // SHARDS
    first = samples[0]
    assert first.key == "train-000001.tar/fmnist_000048" and first.label == int(labels[48])
    assert torch.equal(torch.from_numpy(__import__("numpy").array(first.decode("L"))), images[48])
    assert [s.key for s in stream.samples(1, skip=45)] == [s.key for s in samples[45:]]


def test_two_workers_see_every_image_once_per_epoch_with_seeds_by_key(shards):
    single = _read(_dataset(shards), 2 * IMAGES // 8, workers=0)
    double = _read(_dataset(shards), 2 * IMAGES // 8, workers=2)
    for samples in (single, double):
        seen = _by_epoch(samples)
        assert set(seen) == {0, 1}
        for epoch in (0, 1):
            assert set(seen[epoch]) == _all_keys() and set(seen[epoch].values()) == {1}, epoch
    # the order is shuffled (a seeded shard order and buffer), differently each epoch
    order = [s["key"] for s in single]
    assert order[:IMAGES] != sorted(order[:IMAGES]) and order[:IMAGES] != order[IMAGES:]
    # an image's mask and views are the same whoever reads it
    by_key = {(s["epoch"], s["key"]): s for s in single}
    for sample in double:
        twin = by_key[sample["epoch"], sample["key"]]
        assert torch.equal(sample["noise"], twin["noise"])
        assert torch.equal(sample["augmentation_uniforms"], twin["augmentation_uniforms"])
        assert torch.equal(sample["images"], twin["images"])
    assert not torch.equal(by_key[0, order[0]]["noise"], by_key[1, order[0]]["noise"])  # new masks every epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_reader(rank: int, world: int, port: int, pattern: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        samples = _read(_dataset(pattern), 2 * IMAGES // 8 // world, workers=2)
        mine = [(s["epoch"], s["key"], s["noise"].tolist()) for s in samples]
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_with_two_workers_each_see_every_image_once(shards, tmp_path):
    """2 processes x 2 workers = 4 readers of the 4 shards: the union is every image once per epoch, no image is
    read by two processes, and the masks are those of one process with no workers."""
    out = tmp_path / "seen.json"
    mp.start_processes(_gloo_reader, args=(2, _free_port(), shards, str(out)), nprocs=2, start_method="fork")
    per_rank = json.loads(out.read_text())
    for epoch in (0, 1):  # in an epoch, a shard is read by one process only
        keys = [{key for e, key, _ in rank if e == epoch} for rank in per_rank]
        assert not keys[0] & keys[1]
    everything = [(epoch, key, noise) for rank in per_rank for epoch, key, noise in rank]
    for epoch in (0, 1):
        counts = Counter(key for e, key, _ in everything if e == epoch)
        assert set(counts) == _all_keys() and set(counts.values()) == {1}
    single = {(s["epoch"], s["key"]): s["noise"].tolist() for s in _read(_dataset(shards), 2 * IMAGES // 8, 0)}
    assert all(single[epoch, key] == noise for epoch, key, noise in everything)


class _LoggedStream:
    """A stream that appends every `samples(shard, skip)` call to a file (the DataLoader workers are processes)."""

    def __init__(self, stream, log: Path):
        self.stream, self.log = stream, log
        self.name, self.shards, self.image_size = stream.name, stream.shards, stream.image_size

    def samples(self, shard, skip=0):
        with open(self.log, "a") as file:
            file.write(f"{torch.utils.data.get_worker_info().id} {shard} {skip}\n")
        return self.stream.samples(shard, skip)


def test_resume_mid_epoch_continues_the_stream_and_rereads_only_the_current_window(shards, tmp_path):
    """The positions a trainer records after 13 batches of 2 workers start a new dataset (new workers) exactly where
    the uninterrupted stream goes on: the same samples, views and masks, batch for batch; each reader re-reads its
    current window only (from sample 32 of its shard, the second window of 32), not the shard's beginning."""
    collate = StreamCollator(positions=True)

    def keyed(samples):
        names = [s["key"] for s in samples]
        return {**collate(samples), "keys": names}

    def batches(dataset, count):
        loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=keyed)
        return [batch for _, batch in zip(range(count), loader)]

    uninterrupted = batches(_dataset(shards), 40)
    positions = StreamPositions()
    for batch in uninterrupted[:13]:
        positions.record(batch["data_position"])
    assert positions.batches == 13 and {(p.window, p.offset, p.taken) for p in positions.positions.values()} == {
        (1, 32, 24), (1, 32, 16)
    }

    log = tmp_path / "reads.txt"
    resumed_dataset = _dataset(shards)
    resumed_dataset.stream = _LoggedStream(resumed_dataset.stream, log)
    resumed_dataset.resume_from(positions, num_workers=2)
    resumed = batches(resumed_dataset, 27)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in uninterrupted[13:]]
    for a, b in zip(resumed, uninterrupted[13:]):
        assert all(torch.equal(a[name], b[name]) for name in ("images", "noise", "augmentation_uniforms"))
    first_reads = {}
    for line in log.read_text().splitlines():
        worker, _, skip = line.split()
        first_reads.setdefault(worker, int(skip))
    assert first_reads == {"0": 32, "1": 32}


def _corrupt_copy(shards: str, folder: Path, key: str = "fmnist_000050") -> str:
    """The shards with the image of `key` (by default fmnist_000050, of shard 1) replaced by bytes that are no PNG."""
    source = Path(shards).parent
    folder.mkdir()
    for path in sorted(source.glob("train-*.tar")):
        with tarfile.open(path) as tar, tarfile.open(folder / path.name, "w") as out:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name == f"{key}.png":
                    data = b"\x89PNG\r\n\x1a\n" + b"broken" * 20
                    member.size = len(data)
                out.addfile(member, __import__("io").BytesIO(data))
    return str(folder / Path(shards).name)


def test_a_corrupt_sample_is_named_or_skipped_and_counted(shards, tmp_path):
    pattern = _corrupt_copy(shards, tmp_path / "corrupt")
    with pytest.raises(UnreadableImageError, match=r"fmnist_000050 of shard .*train-000001\.tar"):
        _read(_dataset(pattern, buffer=1), IMAGES // 8, workers=0)
    samples = _read(_dataset(pattern, buffer=1, skip_unreadable=True), (IMAGES - 8) // 8, workers=0)
    epoch0 = _by_epoch(samples)[0]
    assert "train-000001.tar/fmnist_000050" not in epoch0 and len(epoch0) == (IMAGES - 8) // 8 * 8


def test_a_truncated_shard_is_named_by_the_command(shards, tmp_path, capsys):
    folder = tmp_path / "truncated"
    folder.mkdir()
    for path in Path(shards).parent.glob("train-*.tar"):
        data = path.read_bytes()
        (folder / path.name).write_bytes(data[: len(data) // 3] if path.name == "train-000002.tar" else data)
    pattern = str(folder / Path(shards).name)
    with pytest.raises(UnreadableShardError, match=r"train-000002\.tar is truncated .*after sample fmnist_0001"):
        list(open_stream(pattern, "L").samples(2))
    # the command: counting the local shards' headers finds it before training
    args = ["--data", pattern, "--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--max-steps", "2",
            "--no-knn", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train-000002.tar" in err and err.startswith("macrl-pretrain: error:")


def test_too_few_shards_for_the_readers_is_a_usage_error(shards, tmp_path, capsys):
    args = ["--data", shards, "--config", "tiny", "--batch-size", "16", "--num-workers", "5", "--max-steps", "2",
            "--no-knn", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "4 shards cannot be split across 1 processes x 5 workers" in err


def test_a_missing_shard_is_named(shards, capsys, tmp_path):
    pattern = shards.replace("000003", "000004")
    args = ["--data", pattern, "--config", "tiny", "--max-steps", "2", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith("shard not found: " + str(Path(shards).parent / "train-000004.tar"))


def test_streaming_datasets_split_across_workers_once_per_epoch(tmp_path):
    """`--data FOLDER --streaming`: a folder of 4 parquet files read as a streaming `datasets` dataset (4 shards)."""
    datasets = pytest.importorskip("datasets")
    import io

    from PIL import Image

    folder = tmp_path / "parquet"
    folder.mkdir()
    samples = fashion_samples(64)
    for part in range(4):
        rows = samples[part * 16:(part + 1) * 16]
        table = datasets.Dataset.from_dict(
            {"image": [Image.open(io.BytesIO(png)) for _, png, _ in rows], "label": [label for *_, label in rows]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
        )
        table.to_parquet(str(folder / f"train-{part}.parquet"))
    stream = open_stream(str(folder), "L")
    assert len(stream.shards) == 4 and stream.label_column == "label"
    views = BatchedTwoViewDataset(None, num_patches=NUM_PATCHES, seed=5)
    dataset = StreamingTwoViewDataset(stream, views, "L", buffer_size=8, with_keys=True)
    seen = _by_epoch(_read(dataset, 2 * 64 // 8, workers=2))
    for epoch in (0, 1):
        assert len(seen[epoch]) == 64 and set(seen[epoch].values()) == {1}


def test_kill_9_mid_epoch_then_resume_ends_with_the_weights_of_an_uninterrupted_run(shards, tmp_path):
    """`macrl-pretrain --data SHARDS --num-workers 2` killed during step 6 (checkpoint at 3: both readers inside a
    shuffle window, and the next batch is worker 1's), then `--resume`: the same weights and log as a run never
    interrupted."""
    args = ["--data", shards, "--config", "tiny", "--batch-size", "16", "--num-workers", "2", "--logging-steps", "1",
            "--save-steps", "3", "--max-steps", "9", "--no-knn", "--seed", "3", "--shuffle-buffer", "20"]

    def start(out: Path, *extra) -> subprocess.Popen:
        return launch([sys.executable, "-m", "macrl.pretrain", *args, "--output-dir", out, *extra], out)

    reference, run = tmp_path / "reference", tmp_path / "run"
    first = start(reference)
    killed = start(run)
    assert poll(killed, lambda: logged_steps(run) >= 5) is not None, (run / "stderr.txt").read_text()[-3000:]
    kill(killed)
    state = json.loads((run / "checkpoints" / "checkpoint-3" / "data_state_0.json").read_text())
    # (reader, window, taken): reader 0 gave batches 0 and 2 (16 images each, windows of 20), reader 1 batch 1
    assert state["batches"] == 3 and sorted((p[0], p[5], p[6]) for p in state["positions"]) == [(0, 1, 12), (1, 0, 16)]
    assert not (run / "model.safetensors").exists()
    finish(first, reference)
    finish(start(run, "--resume"), run)
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert logged_losses(run) == logged_losses(reference)
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 9 and results["epochs"] == round(9 * 16 / IMAGES, 3)


def test_gradient_accumulation_splits_the_global_batch_into_micro_batches(tmp_path):
    """`--gradient-accumulation-steps 2 --batch-size 16`: the Trainer takes micro-batches of 8, steps once per 16
    images, and a batch that does not split is refused."""
    from macrl.pretrain import build_parser
    from macrl.training.plan import StepPlan, build_training_arguments, plan_run

    (args,) = build_parser().parse_args_into_dataclasses(
        args=["--batch-size", "16", "--gradient-accumulation-steps", "2", "--output-dir", str(tmp_path)]
    )
    training = build_training_arguments(args, plan_run(args), StepPlan(max_steps=4, bf16=False))
    assert training.per_device_train_batch_size == 8 and training.gradient_accumulation_steps == 2
    assert main(["--batch-size", "16", "--gradient-accumulation-steps", "3", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "out")]) == 2


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# one epoch of the 192 images in 12 steps of 16: 2 processes x 2 workers = 4 readers, one shard (48 images) each
EPOCH_RUN = ["--config", "tiny", "--batch-size", "16", "--num-workers", "2", "--logging-steps", "1", "--max-steps",
             "12", "--save-steps", "6", "--shuffle-buffer", "20", "--no-knn", "--seed", "0"]


def _torchrun_pretrain(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*TORCHRUN, "-m", "macrl.pretrain", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _taken_this_epoch(position) -> int:
    """A reader's images taken so far in its epoch, from its `StreamPosition` (when it reads one shard): its window
    starts at sample `offset` of the shard, and it took `taken` of that window's (consecutive) samples."""
    assert position.shard == 0
    return position.offset + position.taken


def test_torchrun_on_shards_trains_every_image_once_and_sums_the_skipped(shards, tmp_path):
    """`torchrun --nproc_per_node 2 macrl-pretrain --data SHARDS --num-workers 2 --skip-unreadable` for one epoch,
    with one corrupt image in a shard that a reader of process 1 reads: the run completes and writes the encoder and
    results.json; the data positions of the two processes show the 4 readers (0, 1 in process 0; 2, 3 in process 1)
    each through its own shard, so every image of the epoch was trained on once; and `skipped_unreadable` counts
    process 1's skip (it was process 0's count alone). With `--eval-data` and `--knn-every`, process 0 runs the kNN
    monitor and the final evaluation while process 1 waits, and the split is unchanged."""
    from macrl.data.streaming_two_view_dataset import StreamPosition, shard_order

    order = shard_order(SHARDS, 0, 0)  # reader g reads shard order[g] in epoch 0
    per = IMAGES // SHARDS
    corrupt_shard = order[2]
    pattern = _corrupt_copy(shards, tmp_path / "corrupt", key=f"fmnist_{corrupt_shard * per:06d}")
    out = tmp_path / "run"
    eval_data = write_class_folders(tmp_path / "eval", 100)
    evaluated = [arg for arg in EPOCH_RUN if arg != "--no-knn"]
    run = _torchrun_pretrain("--data", pattern, *evaluated, "--skip-unreadable", "--eval-data", eval_data,
                             "--knn-every", "6", "--eval-images", "20", "--no-linear-probe", "--output-dir", out)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 12 and results["epochs"] == 1.0 and results["num_workers"] == 2
    assert 0 <= results["knn_accuracy"] <= 100 and results["knn_test_images"] == 10  # the held-out tenth
    assert results["eval_data"] == str(eval_data.resolve()) and results["knn_monitor_last"] is not None
    assert (out / "encoder" / "model.safetensors").is_file() and (out / "encoder" / "config.json").is_file()

    states = [json.loads((out / "checkpoints" / "checkpoint-12" / f"data_state_{rank}.json").read_text())
              for rank in (0, 1)]
    assert [state["batches"] for state in states] == [12, 12]  # each process trained 12 batches of 8
    by_rank = [[StreamPosition.from_values(values) for values in state["positions"]] for state in states]
    assert [sorted(p.reader for p in mine) for mine in by_rank] == [[0, 1], [2, 3]]
    positions = {p.reader: p for mine in by_rank for p in mine}
    assert {p.readers for p in positions.values()} == {4}
    for reader in (0, 1, 3):  # 6 batches of 8: all 48 images of its shard, in epoch 0, nothing skipped
        position = positions[reader]
        assert position.epoch == 0 and _taken_this_epoch(position) == per and position.skipped == 0, position
    # the reader of the corrupt shard skipped its image, so its 48th image is the first of its next epoch
    position = positions[2]
    assert position.epoch == 1 and _taken_this_epoch(position) == 1 and position.skipped == 1, position
    assert results["skipped_unreadable"] == 1
    assert "skipping an unreadable image" in run.stderr and f"train-{corrupt_shard:06d}.tar" in run.stderr


def _log_losses(out: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["reconstruction_loss"], r["contrastive_loss"]) for r in records]


def test_pipe_shards_train_like_the_files_and_a_failing_command_is_one_line(shards, tmp_path, capsys):
    """`--data 'pipe:cat .../train-{000000..000003}.tar'` (the whole URL brace-expanded, as webdataset does): the
    run trains on the same images, keyed by the shard file names, so it logs the losses of the files themselves; a
    command that fails is one line naming its shard and exit status, exit code 1, no traceback."""
    short = ["--config", "tiny", "--batch-size", "16", "--num-workers", "1", "--logging-steps", "1", "--max-steps",
             "2", "--shuffle-buffer", "20", "--no-knn"]
    assert main(["--data", shards, *short, "--output-dir", str(tmp_path / "files")]) == 0
    assert main(["--data", f"pipe:cat {shards}", *short, "--output-dir", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "encoder" / "model.safetensors").is_file()
    piped = _log_losses(tmp_path / "pipe")
    assert [step for step, *_ in piped] == [1, 2] and piped == _log_losses(tmp_path / "files")
    capsys.readouterr()

    missing = tmp_path / "missing"
    assert main(["--data", f"pipe:cat {missing}-{{0..3}}.tar", *short, "--output-dir", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"macrl-pretrain: error: shard pipe:cat {missing}-"), last
    assert "its command failed (exit status 1), before its first sample" in last


def test_gradient_accumulation_trains_like_the_whole_batch_in_mae_mode(shards, tmp_path):
    """MAE alone (`--contrastive-weight 0`: a per-image mean loss, no projector and its BatchNorm): 3 steps of
    `--batch-size 16 --gradient-accumulation-steps 2` log the losses and gradient norms of 3 steps of 16 at once and end
    with the same weights (AdamW hides a gradient scaled by the accumulation, the logged norm does not); the steps
    counted are optimiser steps, the batches recorded for the resume are micro-batches."""
    from safetensors.torch import load_file

    common = ["--data", shards, "--config", "tiny", "--batch-size", "16", "--num-workers", "1", "--logging-steps",
              "1", "--max-steps", "3", "--save-steps", "3", "--contrastive-weight", "0", "--no-knn"]
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    assert main([*common, "--output-dir", str(whole)]) == 0
    assert main([*common, "--gradient-accumulation-steps", "2", "--output-dir", str(micro)]) == 0

    def log(out):
        records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["reconstruction_loss"], r["grad_norm"]) for r in records]

    assert [step for step, *_ in log(micro)] == [1, 2, 3]
    for accumulated, at_once in zip(log(micro), log(whole), strict=True):
        assert accumulated == pytest.approx(at_once, rel=1e-5)
    for out in (whole, micro):
        results = json.loads((out / "results.json").read_text())
        assert results["steps"] == 3 and results["epochs"] == round(3 * 16 / IMAGES, 3)
    batches = [json.loads((out / "checkpoints" / "checkpoint-3" / "data_state_0.json").read_text())["batches"]
               for out in (whole, micro)]
    assert batches == [3, 6]
    weights_whole, weights_micro = load_file(whole / "model.safetensors"), load_file(micro / "model.safetensors")
    assert weights_whole.keys() == weights_micro.keys()
    for name, tensor in weights_whole.items():
        torch.testing.assert_close(weights_micro[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_torchrun_killed_mid_epoch_then_resumed_ends_like_an_uninterrupted_run(shards, tmp_path):
    """2 gloo processes x 2 workers on the shards, the launcher and all its processes killed (SIGKILL) after step 5
    (checkpoint at 3: every reader inside a shuffle window), then `--resume` under torchrun: each process restarts its readers
    from its own data_state_<rank>.json and the run ends with the weights and log of a run never interrupted."""
    import signal

    import psutil  # an accelerate dependency
    command = [*TORCHRUN, "-m", "macrl.pretrain", "--data", shards, "--config", "tiny", "--batch-size", "16",
               "--num-workers", "2", "--logging-steps", "1", "--save-steps", "3", "--max-steps", "9",
               "--shuffle-buffer", "20", "--no-knn", "--seed", "3"]

    def start(out: Path, *extra) -> subprocess.Popen:
        return launch([*command, "--output-dir", out, *extra], out)

    reference, run = tmp_path / "reference", tmp_path / "run"
    finish(start(reference), reference)
    killed = start(run)
    assert poll(killed, lambda: logged_steps(run) >= 5) is not None, (run / "stderr.txt").read_text()[-3000:]
    launcher = psutil.Process(killed.pid)
    # torchrun starts each process in a session of its own: kill the whole tree, as a lost node would
    processes = launcher.children(recursive=True)
    for process in (launcher, *processes):
        process.kill()
    assert killed.wait(timeout=60) == -signal.SIGKILL
    psutil.wait_procs(processes, timeout=60)
    assert not (run / "model.safetensors").exists()
    assert all((run / "checkpoints" / "checkpoint-3" / f"data_state_{rank}.json").is_file() for rank in (0, 1))
    finish(start(run, "--resume"), run)
    assert "checkpoint-3 at step 3 of 9" in (run / "stderr.txt").read_text()
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert logged_losses(run) == logged_losses(reference) and [step for step, _ in logged_losses(run)] == list(range(1, 10))


def test_resuming_a_stream_from_its_last_checkpoint_trains_no_more(shards, tmp_path):
    """A streamed run killed after its last checkpoint (in the final evaluation or export), then `--resume`d: no step
    beyond --max-steps (the Trainer's endless epochs of a stream trained one more), the same weights."""
    args = ["--data", shards, "--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--logging-steps", "1",
            "--max-steps", "3", "--save-steps", "3", "--no-knn", "--output-dir", str(tmp_path / "run")]
    assert main(args) == 0
    finished = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert main([*args, "--resume"]) == 0
    assert [step for step, *_ in _log_losses(tmp_path / "run")] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 3
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == finished
