"""Processes that train together: how many there are and where this one stands (`process_layout`), the group they
agree on host numbers in (`host_group`), and the cross-process pieces of the contrastive head: gathering keys, and
BatchNorm over the global batch."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


@dataclass(frozen=True)
class ProcessLayout:
    """Where this process stands among the processes that train together."""

    rank: int  # this process's place, 0 .. processes - 1
    processes: int  # that train together (the world size)
    local_processes: int  # of those, on this machine


def process_layout() -> ProcessLayout:
    """The one answer to "how many processes, and which one is this": torch.distributed's group once it is
    initialised, else what the launcher set before it is (torchrun and `accelerate launch` set RANK, WORLD_SIZE and
    LOCAL_WORLD_SIZE), else one process alone."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return ProcessLayout(dist.get_rank(), dist.get_world_size(), local)
    return ProcessLayout(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local)


def is_distributed() -> bool:
    """Whether a process group of several processes is running now (collectives would reach the others)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_host_groups: dict = {}  # the default group's id -> (that group, its gloo twin): one twin per default group


def host_group():
    """A group of every process whose collectives run on host (CPU) tensors, for the few numbers the processes agree
    on every step (the clock's time, a stop signal) without a device synchronisation: the default group where it is
    gloo's already, else a gloo group made once (a collective: every process calls this, in the same order). Only
    with `is_distributed()`."""
    if dist.get_backend() == "gloo":
        return None  # the default group
    world = dist.group.WORLD
    if id(world) not in _host_groups:  # the group is kept with its twin, so its id is never another's
        _host_groups[id(world)] = (world, dist.new_group(backend="gloo"))
    return _host_groups[id(world)][1]


def leave_process_group() -> None:
    """Destroy every process group of this process once it has no collective left (each process calls it for
    itself). Left to the interpreter's exit, gloo's worker threads can still hold tensors while Python is torn down,
    and the process aborts after its work is done (`terminate called without an active exception`, SIGABRT:
    about one two-process run in 50 on a 2-core CPU; pytorch/pytorch#190489). No-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        _host_groups.clear()
        dist.destroy_process_group()


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0. Keys carry no gradient, so no autograd is needed."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` whose training statistics span the batch of every process, as MoCo v3's SyncBatchNorm does.

    torch's `SyncBatchNorm` has no CPU kernel, so several CPU processes (gloo) would each normalise with their own
    shard's statistics and train a different model than one process with the same global batch. The parameters and
    buffers are those of `nn.BatchNorm1d`, so checkpoints are interchangeable with it.

    It normalises in its own dtype (float32 but in a model cast to half precision) whatever autocast made of its
    input: a bf16 sum over the global batch keeps 8 bits of it, and float32 running statistics take float32 updates
    only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own = next((t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()), None)
        # [N, C]; a no-op in fp32 training, and [N, C] is small next to the encoder's activations
        x = x.to(own.dtype if own is not None else torch.float32)
        if not (self.training and is_distributed()):
            return super().forward(x)
        # two differentiable all-reduces: the global mean, then the global variance around it
        count = torch.tensor([x.shape[0]], dtype=x.dtype, device=x.device)
        total = dist_nn.all_reduce(torch.cat([x.sum(dim=0), count]))
        num = total[-1]
        mean = total[:-1] / num  # [C]
        var = dist_nn.all_reduce((x - mean).pow(2).sum(dim=0)) / num  # [C], biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = var * num / (num - 1).clamp(min=1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y
