"""Encoding images with a MACRL encoder: `extract_features` runs a frozen `MACRLModel` over an `ImageSource`.

Images are decoded by the data layer (every mode it reads: RGB, L, RGBA, palette, 16-bit, CMYK, animated), resized
and normalised by the model's own image processor in DataLoader workers, and encoded in batches under
`torch.inference_mode()`. Features come back as float32 on the CPU, row i for image i of the source.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import DataError, ImageFolderSource, ImageSource, UnreadableImageError
from .devices import resolve_device
from .modeling_macrl import MACRLModel, pool_tokens

__all__ = ["DTYPE_CHOICES", "POOL_CHOICES", "ExtractionResult", "ImageId", "extract_features", "source_ids"]

POOL_CHOICES: tuple[str, ...] = ("cls", "mean", "none")
DTYPE_CHOICES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ImageId = str | int


@dataclass
class ExtractionResult:
    """What ``extract_features`` returns.

    Attributes:
        features: float32 ``[N, D]`` (``cls`` / ``mean``) or ``[N, 1 + L, D]`` (``none``), on the CPU.
        ids: one id per row of ``features``: a path relative to the data folder, or an index.
        labels: int64 ``[N]`` when the source has labels, else ``None``.
        skipped: ``(id, reason)`` of every unreadable image left out (``skip_unreadable=True``).
    """

    features: torch.Tensor
    ids: list[ImageId]
    labels: torch.Tensor | None = None
    skipped: list[tuple[ImageId, str]] = field(default_factory=list)


def source_ids(source: ImageSource) -> list[ImageId]:
    """Stable ids of a source's images: POSIX paths relative to an image folder's root, else indices."""
    if isinstance(source, ImageFolderSource):
        return [path.relative_to(source.root).as_posix() for path in source.paths]
    return list(range(len(source)))


@dataclass
class _Sample:
    """One image as loaded by a worker: the image, or why it could not be decoded."""

    index: int
    image: Image.Image | None
    error: str | None


class _LoadImages(Dataset):
    """Loads image ``i`` of a source, turning a decode failure into a value instead of an exception.

    A worker's exception reaches the main process re-wrapped with a traceback in its
    message; returning the error keeps the message one clean line, whatever ``num_workers``,
    and lets the caller decide between stopping and skipping.
    """

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> _Sample:
        try:
            return _Sample(index, self.source.load_image(index), None)
        except UnreadableImageError as e:
            return _Sample(index, None, str(e))


@dataclass
class _Batch:
    indices: list[int]
    pixel_values: torch.Tensor | None  # None when every image of the batch was unreadable
    errors: list[tuple[int, str]]


class _PreprocessBatch:
    """DataLoader ``collate_fn``: runs the image processor on the readable images of a batch.

    A class rather than a closure so that it pickles into worker processes, where the
    resizing then happens in parallel.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, samples: list[_Sample]) -> _Batch:
        readable = [s for s in samples if s.image is not None]
        errors = [(s.index, s.error or "unreadable") for s in samples if s.image is None]
        pixel_values = None
        if readable:
            pixel_values = self.processor(images=[s.image for s in readable], return_tensors="pt")["pixel_values"]
        return _Batch([s.index for s in readable], pixel_values, errors)


def _pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """``[B, 1 + L, D]`` -> ``[B, D]`` (``cls``, ``mean``: as ``MACRLModel.pool``) or, for ``none``, unchanged."""
    return tokens if pool == "none" else pool_tokens(tokens, pool)


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    # Autocast keeps numerically fragile ops (softmax, layer norm) in float32.
    return torch.autocast(device_type=device.type, dtype=DTYPE_CHOICES[dtype])


def extract_features(
    model: MACRLModel,
    processor: Any,
    source: ImageSource,
    pool: str = "cls",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    num_workers: int = 0,
    skip_unreadable: bool = False,
    progress: bool | None = None,
) -> ExtractionResult:
    """Encode every image of ``source`` with ``model``.

    Args:
        model: a ``MACRLModel`` (moved to ``device`` and put in eval mode).
        processor: its image processor (``MACRLImageProcessor`` or anything callable the same way).
        source: the images (``ImageFolderSource``, ``HFDatasetSource``, ...), in the model's mode.
        pool: ``cls``, ``mean`` or ``none`` (all tokens).
        batch_size: images per forward pass.
        device: ``cpu``, ``cuda``, ``mps``, ``auto`` or a ``torch.device``.
        dtype: ``fp32``, or ``bf16`` / ``fp16`` autocast; features are returned as float32.
        num_workers: DataLoader worker processes that decode and preprocess.
        skip_unreadable: leave undecodable images out (listed in ``skipped``) instead of raising.
        progress: show a tqdm bar; ``None`` shows it only on a terminal.

    Raises:
        ValueError: bad ``pool`` / ``dtype`` / ``batch_size`` / ``num_workers``.
        DataError: no image of the source is readable (``skip_unreadable`` left nothing).
        UnreadableImageError: an image cannot be decoded and ``skip_unreadable`` is False;
            the message names it.
    """
    if pool not in POOL_CHOICES:
        raise ValueError(f"pool must be one of {POOL_CHOICES}, got {pool!r}")
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_CHOICES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    device = device if isinstance(device, torch.device) else resolve_device(device)

    model = model.to(device).eval()
    ids = source_ids(source)
    loader = DataLoader(
        _LoadImages(source),
        batch_size=batch_size,
        shuffle=False,  # row i of the output must be image i of the source
        num_workers=num_workers,
        collate_fn=_PreprocessBatch(processor),
        pin_memory=device.type == "cuda",
    )

    chunks: list[torch.Tensor] = []
    kept: list[int] = []
    skipped: list[tuple[ImageId, str]] = []
    disable_bar = None if progress is None else not progress  # tqdm: None = only on a TTY
    with torch.inference_mode(), tqdm(total=len(source), unit="img", disable=disable_bar) as bar:
        for batch in loader:
            for index, reason in batch.errors:
                if not skip_unreadable:
                    raise UnreadableImageError(reason)
                skipped.append((ids[index], reason))
            if batch.pixel_values is not None:
                pixel_values = batch.pixel_values.to(device, non_blocking=True)
                with _autocast(device, dtype):
                    tokens = model(pixel_values=pixel_values).last_hidden_state
                chunks.append(_pool_tokens(tokens, pool).float().cpu())
                kept.extend(batch.indices)
            bar.update(len(batch.indices) + len(batch.errors))

    if not kept:
        raise DataError(f"No readable images in {getattr(source, 'name', 'the source')}: all {len(source)} failed")
    labels = None
    if source.labels is not None:
        labels = torch.tensor([source.labels[i] for i in kept], dtype=torch.int64)
    return ExtractionResult(torch.cat(chunks), [ids[i] for i in kept], labels, skipped)
