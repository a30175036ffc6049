"""A process of the two-process GlobalBatchNorm1d test: its own module, so a spawned process imports only this, torch
and macrl, not the test module and what it imports."""

import torch
import torch.distributed as dist

from macrl.distributed import GlobalBatchNorm1d


def batch_norm_under_bf16(rank: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    norm = GlobalBatchNorm1d(4)
    x = torch.randn(2 * 6, 4)[rank * 6 : (rank + 1) * 6]  # this process's shard of one global batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(torch.nn.functional.linear(x, torch.eye(4)))  # bf16 under autocast
    y.sum().backward()
    # plain values: a tensor in the queue would need this process alive until the parent reads it
    queue.put((rank, str(y.dtype), str(norm.running_mean.dtype), norm.running_mean.tolist()))
    dist.destroy_process_group()
