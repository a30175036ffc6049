"""Encoding images with a MACRL encoder: `extract_features` runs a frozen `MACRLModel` over an `ImageSource`.

Images are decoded by the data layer (every mode it reads: RGB, L, RGBA, palette, 16-bit, CMYK, animated), resized
and normalised by the model's own image processor in DataLoader workers, and encoded in batches under
`torch.inference_mode()`. Features come back as float32 on the CPU, row i for image i of the source.

`prepare_for_inference` is the one way a model is readied for that (by `extract_features`, `macrl-extract`,
`macrl-eval` and the Python API): on its device, in eval mode, its weights cast to bf16 / fp16 where the device has
kernels for them (else float32 weights under autocast), optionally `torch.compile`d in place. A compiled model sees
one batch shape only: `extract_features` pads a smaller batch (the last one, or one with unreadable images) to the
batch size and drops the padded rows, so a run compiles once, and a second run in the same process not at all.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import logging
import re
import time

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import DataError, ImageFolderSource, ImageSource, UnreadableImageError
from .devices import resolve_device
from .modeling_macrl import MACRLModel, pool_tokens
from .precision import cpu_runs_bf16_fast, cpu_runs_fp16_fast

__all__ = [
    "DTYPE_CHOICES",
    "POOL_CHOICES",
    "ExtractionResult",
    "ImageId",
    "InferencePrecision",
    "extract_features",
    "inference_precision",
    "is_compiled",
    "prepare_for_inference",
    "source_ids",
]

logger = logging.getLogger(__name__)

POOL_CHOICES: tuple[str, ...] = ("cls", "mean", "none")
DTYPE_CHOICES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ImageId = str | int


@dataclass
class ExtractionResult:
    """What ``extract_features`` returns.

    Attributes:
        features: float32 ``[N, D]`` (``cls`` / ``mean``) or ``[N, P + L, D]`` (``none``: every token, the CLS token
            and the ``P - 1`` registers first), on the CPU.
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


def _pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int) -> torch.Tensor:
    """``[B, P + L, D]`` -> ``[B, D]`` (``cls``, ``mean``: as ``MACRLModel.pool``) or, for ``none``, unchanged."""
    return tokens if pool == "none" else pool_tokens(tokens, pool, num_prefix_tokens)


@dataclass(frozen=True)
class InferencePrecision:
    """How a `dtype` choice runs on a device: the dtype of the weights (and of the inputs), and an autocast dtype
    on top of them, or None."""

    weights: torch.dtype
    autocast: torch.dtype | None = None

    def context(self, device: torch.device):
        """The autocast context of this precision on `device` (a no-op without one)."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast)


def inference_precision(device: str | torch.device, dtype: str) -> InferencePrecision:
    """`fp32`: float32. `bf16` / `fp16`: weights and inputs in that dtype, cast once, where the device has kernels for
    it (an accelerator; a CPU whose oneDNN has them); on a CPU without them, float32 weights under autocast, as
    before (many times slower than fp32 there: the commands warn).

    Cast weights beat autocast, which converts the weights of every matmul again at every call
    (benchmarks/results/extraction-speed.md). One layer is kept in float32, the encoder's final norm
    (`_keep_float32_modules`): the features then match fp32's kNN accuracy (tests/test_bf16_quality.py).
    """
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_CHOICES)}, got {dtype!r}")
    wanted = DTYPE_CHOICES[dtype]
    if wanted == torch.float32:
        return InferencePrecision(torch.float32)
    if torch.device(device).type == "cpu" and not (cpu_runs_bf16_fast() if dtype == "bf16" else cpu_runs_fp16_fast()):
        return InferencePrecision(torch.float32, wanted)
    return InferencePrecision(wanted)


def is_compiled(model: nn.Module) -> bool:
    """Whether `model` is a `torch.compile` wrapper, or it or a submodule was compiled in place (`Module.compile`)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return True
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules())


def prepare_for_inference(
    model: nn.Module,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    compile: bool = False,
    batch_size: int | None = None,
) -> nn.Module:
    """Ready `model` for encoding: on `device`, in eval mode, weights cast as `inference_precision(device, dtype)`
    says (but for the modules the model keeps in float32, its final norm), and with `compile`, `torch.compile`d in place (`Module.compile`: it stays a `MACRLModel`, so it also goes
    into `pipeline("image-feature-extraction", model=...)`).

    Like `Module.to`, this changes `model` itself and returns it; a model already compiled is not compiled again.
    With `compile` and `batch_size`, one batch of zeros of that size is run at once, so the compile time is paid (and
    logged) here, not in the first batch of images. Compiling is torch's default `dynamic=None`: the first shape is
    compiled static; callers that may see another batch size (the pipeline) get one more, dynamic, compile.

    Raises:
        ValueError: an unknown `dtype`.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    precision = inference_precision(device, dtype)
    model = model.to(device=device, dtype=precision.weights).eval()
    if precision.weights != torch.float32:
        _keep_float32_modules(model)
    if not compile or is_compiled(model):
        return model
    model.compile()
    config = getattr(model, "config", None)
    if batch_size is not None and config is not None:
        started = time.perf_counter()
        shape = (batch_size, config.num_channels, config.image_size, config.image_size)
        with torch.inference_mode(), precision.context(device):
            model(pixel_values=torch.zeros(shape, device=device, dtype=precision.weights))
        logger.info("torch.compile: compiled for batches of %d in %.1f s", batch_size, time.perf_counter() - started)
    return model


def _keep_float32_modules(model: nn.Module) -> None:
    """Put back in float32 the parameters a model keeps in float32 when it is loaded in half precision (its
    `_keep_in_fp32_modules_strict`, as `from_pretrained(dtype=...)` does): `Module.to(dtype)` casts everything.

    A name matches as it does in transformers' loader: searched for anywhere in the parameter's full name."""
    names = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    patterns = [re.compile(name.replace("*", ".*")) for name in names]
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = [prefix + name for name, _ in module.named_parameters(recurse=False)]  # e.g. "norm.weight"
        if any(pattern.search(name) for name in own for pattern in patterns):
            module.float()


def _pad_batch(pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`pixel_values` with rows of zeros appended up to `batch_size`: the one shape a compiled model has seen."""
    missing = batch_size - pixel_values.shape[0]
    if missing <= 0:
        return pixel_values
    return torch.cat([pixel_values, pixel_values.new_zeros((missing, *pixel_values.shape[1:]))])


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
    compile: bool = False,
) -> ExtractionResult:
    """Encode every image of ``source`` with ``model``.

    Args:
        model: a ``MACRLModel``, readied by ``prepare_for_inference`` (in place: moved to ``device``, put in eval
            mode, its weights cast for ``dtype``, compiled with ``compile``).
        processor: its image processor (``MACRLImageProcessor`` or anything callable the same way).
        source: the images (``ImageFolderSource``, ``HFDatasetSource``, ...), in the model's mode.
        pool: ``cls``, ``mean`` or ``none`` (all tokens).
        batch_size: images per forward pass.
        device: ``cpu``, ``cuda``, ``mps``, ``auto`` or a ``torch.device``.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (``inference_precision``: cast weights where the device has the kernels,
            else autocast); features are returned as float32.
        num_workers: DataLoader worker processes that decode and preprocess.
        skip_unreadable: leave undecodable images out (listed in ``skipped``) instead of raising.
        progress: show a tqdm bar; ``None`` shows it only on a terminal.
        compile: ``torch.compile`` the model (once per process: a model compiled already is reused). Smaller batches
            are padded to ``batch_size`` for a compiled model (also one compiled by the caller), so it compiles once.

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

    precision = inference_precision(device, dtype)
    model = prepare_for_inference(model, device, dtype, compile=compile, batch_size=batch_size)
    pad = is_compiled(model)
    # the CLS token and the registers before the patches (1 for a model without registers or a config)
    num_prefix_tokens = getattr(getattr(model, "config", None), "num_prefix_tokens", 1)
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
                count = batch.pixel_values.shape[0]
                pixel_values = batch.pixel_values.to(device, dtype=precision.weights, non_blocking=True)
                if pad:
                    pixel_values = _pad_batch(pixel_values, batch_size)
                with precision.context(device):
                    tokens = model(pixel_values=pixel_values).last_hidden_state[:count]
                chunks.append(_pool_tokens(tokens.float(), pool, num_prefix_tokens).cpu())
                kept.extend(batch.indices)
            bar.update(len(batch.indices) + len(batch.errors))

    if not kept:
        raise DataError(f"No readable images in {getattr(source, 'name', 'the source')}: all {len(source)} failed")
    labels = None
    if source.labels is not None:
        labels = torch.tensor([source.labels[i] for i in kept], dtype=torch.int64)
    return ExtractionResult(torch.cat(chunks), [ids[i] for i in kept], labels, skipped)
