"""Whether bfloat16 / float16 pay off on the CPU they would run on.

bf16 on a CPU is fast only where oneDNN has bfloat16 kernels (AVX512 and AMX cores). On an AVX2-only CPU torch falls
back to a slow generic kernel, many times slower than fp32 (benchmarks/results/figures-behind-the-code.md). fp16 has
kernels on fewer CPUs still (AVX512-FP16 or AMX-FP16). The commands that take --bf16 / --fp16 / --dtype say so
instead of silently running that much slower.
"""

import torch

__all__ = ["cpu_runs_bf16_fast", "cpu_runs_fp16_fast", "slow_precision_warning"]


def cpu_runs_bf16_fast() -> bool:
    """True when oneDNN has bfloat16 kernels for this CPU (AVX512 bw+vl+dq, or Arm's bf16); True if torch can't tell."""
    # torch's own test for its oneDNN bf16 paths (what the mkldnn bf16 tests skip on); no public API asks this
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())


def cpu_runs_fp16_fast() -> bool:
    """True when oneDNN has float16 kernels for this CPU (AVX512-FP16 / AMX-FP16); False if torch can't tell."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return False if check is None else bool(check())


def slow_precision_warning(device: str | torch.device, flag: str, dtype: str = "bf16") -> str | None:
    """A one-line warning when `flag` (e.g. `--bf16`, `--dtype fp16`) asks for `dtype` (`bf16` or `fp16`; `fp32`
    never warns) on a CPU without kernels for it, else None."""
    if dtype == "fp32" or torch.device(device).type != "cpu":
        return None
    if cpu_runs_bf16_fast() if dtype == "bf16" else cpu_runs_fp16_fast():
        return None
    name = {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    return (
        f"{flag}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no {name} kernels, so {dtype} runs many "
        "times slower than fp32 here; leave it out"
    )
