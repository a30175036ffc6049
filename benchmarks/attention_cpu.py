"""Attention on a CPU: PyTorch's sdpa (its flash kernel) against the eager computation, forward and backward.

    python benchmarks/attention_cpu.py            # the kernel alone at MACRL's shapes, then the main job's step

Why `MACRLAttention` computes eagerly when sdpa would run a half-precision backward on a CPU
(`macrl.modeling_macrl.sdpa_backward_is_slow`): the table gives both for the shapes of the main job (16 + 1 tokens,
batch 256; the main branch sees 4 + 1) and of ViT-S/16 at 224 px (196 + 1), in bf16 and fp32, each case timed
round-robin with the other (median of the last 8 of 12 calls), then a whole pre-training step of the main job's model
(bf16 autocast, batch 256, fused AdamW, EMA) with sdpa as PyTorch runs it and with the rule.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

# (batch, heads, tokens, head dim): the main job's encoder on visible / all tokens, its decoder, ViT-S/16
SHAPES = ((256, 3, 5, 64), (256, 3, 17, 64), (256, 4, 17, 32), (64, 6, 50, 64), (16, 6, 197, 64))


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    weights = (query @ key.transpose(-2, -1)) * query.shape[-1] ** -0.5  # [B, H, T, T]
    return weights.softmax(-1, dtype=torch.float32).to(query.dtype) @ value  # [B, H, T, D]


def time_kernels(shape: tuple[int, ...], dtype: torch.dtype, backward: bool, calls: int = 12) -> dict[str, float]:
    """Milliseconds per call of sdpa and of the eager computation, round-robin, median of the last 8 calls."""
    times: dict[str, list[float]] = {"sdpa": [], "eager": []}
    for _ in range(calls):
        for name, function in (("sdpa", F.scaled_dot_product_attention), ("eager", eager_attention)):
            q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=backward) for _ in range(3))
            with torch.set_grad_enabled(backward):
                started = time.perf_counter()
                out = function(q, k, v)
                if backward:
                    out.float().sum().backward()
                times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values[-8:]) for name, values in times.items()}


def time_training_steps(steps: int = 20) -> dict[str, float]:
    """Seconds per pre-training step of the main job's model in bf16: sdpa throughout vs MACRL's rule."""
    import macrl.modeling_macrl as modeling
    from macrl import MACRLForPreTraining
    from macrl.presets import load_config

    rule = modeling.sdpa_backward_is_slow
    model = MACRLForPreTraining(load_config("fmnist")).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    strong, weak = torch.randn(256, 1, 28, 28), torch.randn(256, 1, 28, 28)
    times: dict[str, list[float]] = {"sdpa throughout": [], "eager where the backward is slow (MACRL)": []}
    try:
        for _ in range(steps):
            for name in times:
                modeling.sdpa_backward_is_slow = rule if name.startswith("eager") else (lambda query: False)
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(strong, weak).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                model.update_momentum_branch(0.5)
                times[name].append(time.perf_counter() - started)
    finally:
        modeling.sdpa_backward_is_slow = rule
    return {name: statistics.median(values[steps // 4 :]) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--no-step", action="store_true", help="the kernels only, not the pre-training step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print("| batch, heads, tokens, head dim | dtype | pass | sdpa ms | eager ms | sdpa / eager |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for backward in (False, True):
                ms = time_kernels(shape, dtype, backward)
                print(f"| {', '.join(map(str, shape))} | {str(dtype)[6:]} | {'fwd+bwd' if backward else 'fwd'} | "
                      f"{ms['sdpa']:.2f} | {ms['eager']:.2f} | {ms['sdpa'] / ms['eager']:.2f} |", flush=True)
    if not args.no_step:
        seconds = time_training_steps()
        print("\n| main job's pre-training step, bf16 autocast, batch 256 | s / step |")
        print("|---|---|")
        for name, value in seconds.items():
            print(f"| {name} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
