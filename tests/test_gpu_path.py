"""The CUDA path as far as a machine without a GPU can check it: the arguments a CUDA run gets, a training step
without host syncs, bf16 BatchNorm statistics over processes, and `benchmarks/gpu_check.py` end to end on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.gpu_check import HostSyncCounter
from macrl.devices import MAX_WORKERS_PER_GPU, default_num_workers, has_fused_adamw, has_tf32
from macrl.training.arguments import PretrainingArguments
from macrl.training.plan import StepPlan, build_training_arguments, plan_run

from tests.batch_norm_worker import batch_norm_under_bf16

ROOT = Path(__file__).resolve().parents[1]


def test_a_cuda_run_gets_pinned_non_blocking_copies_fused_adamw_and_workers(tmp_path):
    """What build_training_arguments gives a CUDA device, built here without initialising CUDA (and in fp32: the
    stock arguments refuse bf16 without a GPU that has it)."""
    args = PretrainingArguments(output_dir=str(tmp_path), config="tiny", batch_size=16, bf16=False)
    steps = StepPlan(max_steps=10, bf16=False)
    cuda = build_training_arguments(args, plan_run(args, device=torch.device("cuda")), steps)
    assert cuda.optim == "adamw_torch_fused"
    assert cuda.dataloader_pin_memory and cuda.accelerator_config.non_blocking
    assert cuda.dataloader_num_workers == default_num_workers(torch.device("cuda")) >= 1
    assert cuda.dataloader_persistent_workers
    assert not cuda.logging_nan_inf_filter  # the stock filter reads the loss on the host every step
    assert not cuda.use_cpu
    assert cuda.tf32 is None  # no TF32 tensor cores here: left alone rather than refused
    assert not torch.cuda.is_initialized()

    cpu = build_training_arguments(args, plan_run(args, device=torch.device("cpu")), steps)
    assert cpu.optim == "adamw_torch_fused" and not cpu.dataloader_pin_memory and cpu.use_cpu
    assert cpu.dataloader_num_workers == 1
    assert not cpu.accelerator_config.non_blocking
    explicit = PretrainingArguments(output_dir=str(tmp_path), config="tiny", batch_size=16, num_workers=3)
    explicit_plan = plan_run(explicit, device=torch.device("cuda"))
    assert build_training_arguments(explicit, explicit_plan, steps).dataloader_num_workers == 3


def test_device_facts():
    assert not has_tf32(torch.device("cpu"))
    assert has_fused_adamw(torch.device("cuda")) and has_fused_adamw(torch.device("cpu"))
    assert not has_fused_adamw(torch.device("mps"))
    assert 1 <= default_num_workers(torch.device("cuda")) <= MAX_WORKERS_PER_GPU
    # eight GPUs on this machine's cores still get one worker each
    assert default_num_workers(torch.device("cuda"), processes_per_machine=8) == 1


def test_the_sync_counter_counts_item_and_bool_of_a_tensor():
    x = torch.ones(3)
    with HostSyncCounter(torch.device("cpu")) as counter:
        x.sum().item()
        if (x > 0).all():
            x.nonzero()
    assert counter.count == 3, counter.ops


@pytest.mark.slow  # two spawned processes importing torch and transformers: ~20 s
def test_global_batch_norm_keeps_float32_statistics_under_bf16(tmp_path):
    """Two gloo processes under bf16 autocast: float32 output and running statistics, those of the global batch."""
    # spawned, not forked: a fork of a process whose torch thread pools have run can hang
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(batch_norm_under_bf16, args=(str(tmp_path / "init"), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    torch.manual_seed(0)
    whole = torch.randn(12, 4).bfloat16().float()
    expected = 0.1 * whole.mean(dim=0)  # one update of momentum 0.1 from zero
    for _, output_dtype, stats_dtype, running_mean in results:
        assert output_dtype == stats_dtype == "torch.float32"
        torch.testing.assert_close(torch.tensor(running_mean), expected, rtol=1e-5, atol=1e-6)


def test_gpu_check_runs_end_to_end_on_the_cpu():
    """`benchmarks/gpu_check.py --device cpu --quick` runs every part and prints its table."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        # generous shares: on a loaded machine a part over its share would skip what the test looks for
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--minutes", "10"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "device: cpu" in out and f"torch {torch.__version__}" in out
    table = out[out.index("part "):]
    for case in ("MACRL sdpa fp32", "ViTMAE sdpa bf16", "MACRL MoCo-v3 mode sdpa fp32", "MACRLModel bf16",
                 "timm ViT fp32", "MACRLPretrainer steps 3-6", "macrl-pretrain"):
        assert case in table
    assert "error" not in table, table
    header, dashes, *lines = table.split("\n\n")[0].splitlines()
    spans = [match.span() for match in re.finditer(r"-+", dashes)]  # the columns, as the dashes under them

    def cells(line: str) -> list[str]:
        return [line[start:end].strip() for start, end in spans[:-1]] + [line[spans[-1][0]:].strip()]

    names = cells(header)
    rows = {cells(line)[1]: dict(zip(names, cells(line))) for line in lines}  # by case
    assert rows["tiny MACRL sdpa bf16+compile"]["batch"] == "8"
    assert "skipped: compile is timed on a GPU only" in table
    syncs = rows["tiny MACRLPretrainer steps 3-6 (bf16)"]
    assert syncs["host syncs/step"] == "0"
    assert "not counted: 8 CPU-only input checks" in table  # the counter does see the step's value reads
    end_to_end = next(row for case, row in rows.items() if case.startswith("macrl-pretrain"))
    assert end_to_end["steps"] == "4" and float(end_to_end["first step s"]) > 0 and float(end_to_end["kNN %"]) >= 0
