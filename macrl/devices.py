"""The one `--device` rule of every command (`auto` takes the best accelerator there is, a named one must exist), and
what a device offers a training run: TF32 matmuls, a fused AdamW, how many data-loading workers feed it."""

import os

import torch

from .errors import InputError

__all__ = ["DEVICE_CHOICES", "DeviceError", "default_num_workers", "has_fused_adamw", "has_tf32", "resolve_device"]

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")


class DeviceError(InputError):
    """An unknown device name, or an accelerator this machine does not have."""


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` -> cuda, else mps, else cpu; `cpu`, `cuda` (also `cuda:N`) or `mps` must be available.

    Raises:
        DeviceError: the name is not one of `DEVICE_CHOICES` (or `cuda:N`), or that device is not available.
    """
    if isinstance(name, torch.device):
        return name
    kind, _, index = name.partition(":")
    if kind not in DEVICE_CHOICES or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"unknown device {name!r}; choose from {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available (use --device cpu or auto)")
    return torch.device(name)


# data-loading workers per GPU: enough to decode and augment 224-px images for a ViT-B step, few enough that eight
# GPUs on one machine do not oversubscribe its cores
MAX_WORKERS_PER_GPU = 8


def has_tf32(device: torch.device) -> bool:
    """True for a CUDA device with TF32 tensor cores (Ampere, compute capability 8.0, and newer)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def has_fused_adamw(device: torch.device) -> bool:
    """True where torch has the fused (one kernel for all parameters) AdamW: CUDA and the CPU (torch >= 2.4)."""
    return device.type in ("cuda", "cpu")


def default_num_workers(device: torch.device, processes_per_machine: int = 1) -> int:
    """Data-loading workers per training process when `--num-workers` is not given.

    On a GPU the step is so fast that decoding and augmenting the next batch is what it waits for: this process's
    share of the cores the machine lets it use, at most `MAX_WORKERS_PER_GPU`. On a CPU the model needs the cores,
    and one worker overlaps the loading with the step.
    """
    if device.type != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # one core stays with the training process itself, which launches the GPU work
    return max(1, min(MAX_WORKERS_PER_GPU, cores // max(processes_per_machine, 1) - 1))
