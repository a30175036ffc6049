"""`macrl.precision`: bf16 is called slow exactly on CPUs without bf16 kernels, and the commands say so."""

import json
from pathlib import Path

import pytest
import torch

from macrl.precision import cpu_runs_bf16_fast, cpu_runs_fp16_fast, slow_precision_warning
from macrl.pretrain import main as pretrain_main

CPUINFO = Path("/proc/cpuinfo")


def _cpu_flags() -> set[str]:
    """The x86 feature flags of the first CPU; empty elsewhere (ARM lists "Features")."""
    if not CPUINFO.exists():
        return set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not CPUINFO.exists() or not _cpu_flags(), reason="reads an x86 CPU's flags from /proc/cpuinfo")
def test_fast_bf16_follows_the_cpu_flags():
    """torch's oneDNN bf16 paths need AVX512 (bw + vl + dq); an AVX2-only CPU (like CI's) has none."""
    flags = _cpu_flags()
    has_kernels = {"avx512bw", "avx512vl", "avx512dq"} <= flags
    assert cpu_runs_bf16_fast() == has_kernels, sorted(f for f in flags if f.startswith(("avx", "amx")))


def test_warning_names_the_flag_and_the_cpu_only_where_bf16_is_slow():
    warning = slow_precision_warning("cpu", "--bf16")
    if cpu_runs_bf16_fast():
        assert warning is None
    else:
        assert warning.startswith("--bf16: this CPU (") and torch.backends.cpu.get_cpu_capability() in warning
    assert slow_precision_warning(torch.device("cuda"), "--bf16") is None  # GPUs: autocast's own business


def test_fp16_warns_where_the_cpu_has_no_fp16_kernels_and_fp32_never():
    warning = slow_precision_warning("cpu", "--dtype fp16", "fp16")
    if cpu_runs_fp16_fast():
        assert warning is None
    else:
        assert warning.startswith("--dtype fp16: this CPU (") and "no float16 kernels" in warning
    assert slow_precision_warning("cpu", "--dtype fp32", "fp32") is None


def test_pretrain_with_bf16_warns_on_a_slow_cpu_and_still_trains(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--max-steps", "1", "--limit-images", "16",
            "--no-knn", "--output-dir", str(out), "--bf16"]
    assert pretrain_main(argv) == 0
    err = capsys.readouterr().err
    assert ("macrl-pretrain: warning: --bf16: this CPU" in err) == (not cpu_runs_bf16_fast()), err
    assert json.loads((out / "results.json").read_text())["steps"] == 1
