"""The one `--device` rule of every command: `auto` takes the best accelerator there is, a named one must exist."""

import torch

from .errors import InputError

__all__ = ["DEVICE_CHOICES", "DeviceError", "resolve_device"]

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
