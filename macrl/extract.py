"""``macrl-extract``: encode a folder of images or a ``datasets`` dataset into a features file.

Images come from the data layer (``ImageFolderSource`` / ``HFDatasetSource``), so every
mode it decodes (RGB, L, RGBA, palette, 16-bit, CMYK, animated) works; the model's own
image processor resizes and normalises them; a frozen ``MACRLModel`` encodes them in
batches under ``torch.inference_mode()``.

Output, written atomically (a temp file in the same folder, then ``os.replace``):

* ``.safetensors``: tensor ``features`` (float32), tensor ``labels`` (int64, when the
  source has labels) and string metadata: ``model``, ``revision``, ``pool``, ``dtype``,
  ``count``, ``ids`` / ``skipped`` / ``class_names`` (JSON).
* ``.npy``: the features array, plus a sidecar ``<name>.ids.json`` with the same
  metadata and the labels.

Ids are the image paths relative to the data folder (POSIX), or the dataset indices.

Example::

    macrl-extract --model ./macrl-vit-small --data ./photos --output feats.safetensors --pool mean
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from macrl import __version__
from macrl.atomic_files import atomic_path
from macrl.configuration_macrl import MACRLConfig
from macrl.data import HFDatasetSource, ImageFolderSource, ImageSource, UnreadableImageError
from macrl.data.hf_datasets import _is_saved_dataset
from macrl.image_processing_macrl import MACRLImageProcessor
from macrl.command_line import OneLineErrorParser, first_line, int_at_least, run_command
from macrl.modeling_macrl import MACRLModel, pool_tokens
from macrl.precision import slow_bf16_warning

__all__ = ["ExtractionResult", "extract_features", "load_model_and_processor", "save_features", "main"]

POOL_CHOICES: tuple[str, ...] = ("cls", "mean", "none")
DTYPE_CHOICES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
OUTPUT_EXTENSIONS: tuple[str, ...] = (".safetensors", ".npy")

# A Hub repo id is "name" or "owner/name" from [A-Za-z0-9_.-]; anything else given to
# --model / --data that does not exist on disk can only be a mistyped local path.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

ImageId = str | int


class ExtractError(Exception):
    """A usage problem (bad flag, missing model, unwritable output): one line, exit code 2."""


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


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- extraction


def _pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """``[B, 1 + L, D]`` -> ``[B, D]`` (``cls``, ``mean``: as ``MACRLModel.pool``) or, for ``none``, unchanged."""
    return tokens if pool == "none" else pool_tokens(tokens, pool)


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    # Autocast keeps numerically fragile ops (softmax, layer norm) in float32.
    return torch.autocast(device_type=device.type, dtype=DTYPE_CHOICES[dtype])


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; a named accelerator must be available."""
    if name not in DEVICE_CHOICES:
        raise ExtractError(f"unknown device {name!r}; choose from {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ExtractError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ExtractError("--device mps: MPS is not available (use --device cpu or auto)")
    return torch.device(name)


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
        ValueError: bad ``pool`` / ``dtype`` / ``batch_size`` / ``num_workers``, or no readable image.
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
        raise ValueError(f"No readable images in {getattr(source, 'name', 'the source')}: all {len(source)} failed")
    labels = None
    if source.labels is not None:
        labels = torch.tensor([source.labels[i] for i in kept], dtype=torch.int64)
    return ExtractionResult(torch.cat(chunks), [ids[i] for i in kept], labels, skipped)


# --------------------------------------------------------------------------- loading


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


def load_model_and_processor(name_or_path: str, revision: str | None = None) -> tuple[MACRLModel, Any]:
    """Load a MACRL encoder and its image processor from a local folder or the Hub.

    A folder without ``preprocessor_config.json`` gets ``MACRLImageProcessor.from_model_config``
    (the default normalisation), with a warning.

    Raises:
        ExtractError: missing folder, not a model folder, not a MACRL model, or unloadable.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExtractError(f"--model {name_or_path}: not a folder")
        if not (path / "config.json").is_file():
            raise ExtractError(f"--model {name_or_path}: not a model folder (no config.json)")
        name_or_path = str(path)
    elif not _looks_like_hub_id(name_or_path):
        raise ExtractError(f"--model {name_or_path}: model folder not found")

    try:
        # Read the raw config first: model_type tells a MACRL folder from any other model's
        # before from_pretrained would load mismatched weights with only a warning.
        config_dict, _ = MACRLConfig.get_config_dict(name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        raise ExtractError(f"--model {name_or_path}: cannot load its config: {first_line(e)}") from e
    model_type = config_dict.get("model_type")
    if model_type != MACRLConfig.model_type:
        raise ExtractError(
            f"--model {name_or_path}: not a MACRL model (config.json has model_type={model_type!r}, "
            f"expected {MACRLConfig.model_type!r})"
        )
    try:
        # float32 weights whatever the checkpoint's dtype: --dtype lowers precision via autocast only.
        model = MACRLModel.from_pretrained(name_or_path, revision=revision, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise ExtractError(f"--model {name_or_path}: cannot load the weights: {first_line(e)}") from e

    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError):
        processor = MACRLImageProcessor.from_model_config(model.config)
        print(
            f"macrl-extract: warning: no image processor (preprocessor_config.json) in {name_or_path}; "
            "using MACRLImageProcessor.from_model_config: the model's size and channels, mean/std 0.5",
            file=sys.stderr,
        )
    return model, processor


def build_source(
    data: str,
    mode: str,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
) -> ImageSource:
    """An image folder -> ``ImageFolderSource``; a ``save_to_disk`` folder or dataset name -> ``HFDatasetSource``.

    Raises:
        ExtractError: missing or empty folder, unknown dataset / split / column.
    """
    path = Path(data).expanduser()
    try:
        if path.is_dir() and not _is_saved_dataset(path):
            return ImageFolderSource(path, mode=mode)
        if not path.exists() and not _looks_like_hub_id(data):
            raise ExtractError(f"--data {data}: folder not found")
        return HFDatasetSource(
            str(path) if path.exists() else data,
            split=split, image_column=image_column, label_column=label_column, mode=mode,
        )
    except (OSError, ValueError, ImportError) as e:  # FileNotFoundError / NotADirectoryError are OSErrors
        raise ExtractError(f"--data {data}: {first_line(e)}") from e


# --------------------------------------------------------------------------- saving


def check_output_path(output: str | Path) -> Path:
    """Validate ``--output`` before any work is done: extension, and a writable folder.

    The folder may not exist yet (``save_features`` creates it); then its nearest existing
    ancestor must be a writable folder.

    Raises:
        ExtractError: unsupported extension, output is a folder, or the folder is not writable.
    """
    output = Path(output).expanduser()
    if output.suffix.lower() not in OUTPUT_EXTENSIONS:
        raise ExtractError(
            f"--output {output}: unsupported extension {output.suffix or '(none)'!r}; "
            f"use {' or '.join(OUTPUT_EXTENSIONS)}"
        )
    if output.is_dir():
        raise ExtractError(f"--output {output}: is a folder")
    ancestor = output.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExtractError(f"--output {output}: {ancestor} is not a folder")
    try:
        # A real file rather than os.access: access() says yes to root and misses read-only mounts.
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise ExtractError(f"--output {output}: folder {ancestor} is not writable ({e.strerror or e})") from e
    return output


def _metadata(result: ExtractionResult, info: dict[str, Any]) -> dict[str, Any]:
    """Everything stored next to the features, as JSON-able values."""
    return {
        **info,
        "count": len(result.ids),
        "shape": list(result.features.shape),
        "ids": result.ids,
        "skipped": [{"id": image_id, "reason": reason} for image_id, reason in result.skipped],
        "macrl_version": __version__,
    }


def save_features(result: ExtractionResult, output: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``result`` to ``output`` (``.safetensors`` or ``.npy`` + ``<name>.ids.json``), atomically.

    ``info`` (model, pool, dtype, ...) goes into the metadata. safetensors metadata must be
    string -> string, so lists and numbers are stored as JSON text there.
    """
    output = check_output_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    metadata = _metadata(result, info or {})
    if output.suffix.lower() == ".safetensors":
        tensors = {"features": result.features.contiguous()}
        if result.labels is not None:
            tensors["labels"] = result.labels.contiguous()
        string_metadata = {
            key: value if isinstance(value, str) else json.dumps(value)
            for key, value in metadata.items()
            if value is not None
        }
        with atomic_path(output) as temp_path:
            save_file(tensors, str(temp_path), metadata={"format": "pt", **string_metadata})
        return output

    sidecar = output.with_suffix(".ids.json")
    metadata["labels"] = result.labels.tolist() if result.labels is not None else None
    # The sidecar is replaced first, so a complete .npy always has its complete sidecar.
    with atomic_path(sidecar) as temp_path:
        temp_path.write_text(json.dumps(metadata, indent=1) + "\n")
    with atomic_path(output) as temp_path:
        with open(temp_path, "wb") as f:  # a file object: np.save(path) would append ".npy" to the temp name
            np.save(f, result.features.numpy())
    return output


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``macrl-extract`` flags; ``--help`` states every default."""
    parser = OneLineErrorParser(
        prog="macrl-extract",
        error_type=ExtractError,
        description="Encode a folder of images or a `datasets` dataset with a MACRL encoder into a features file.",
        epilog="Exit status: 0 done, 1 an image could not be decoded (see --skip-unreadable), 2 usage error.",
    )
    add = parser.add_argument
    add("--model", required=True, help="local model folder or Hub id of a MACRL model (required)")
    add("--revision", default=None, help="Hub branch, tag or commit of --model (default: the default branch)")
    add(
        "--data", required=True,
        help="folder of images (scanned recursively; first-level subfolders are classes), "
        "or a `datasets` save_to_disk folder / dataset name (required)",
    )
    add("--split", default="train", help="dataset split, for datasets only (default: %(default)s)")
    add(
        "--image-column", default=None,
        help="image column, for datasets only (default: the first Image feature, else image/img)",
    )
    add(
        "--label-column", default=None,
        help="label column, for datasets only (default: the first ClassLabel feature, else label/labels)",
    )
    add(
        "--output", required=True,
        help="features file: .safetensors (features, labels, metadata) or .npy (+ <name>.ids.json sidecar); "
        "written atomically (required)",
    )
    add(
        "--pool", choices=POOL_CHOICES, default=None,
        help="cls token, mean of patch tokens, or none (all tokens, [N, 1+L, D]); default: the model's config.pooling",
    )
    add("--batch-size", type=int_at_least(1), default=64, help="images per forward pass (default: %(default)s)")
    add("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda, else mps, else cpu (default: auto)")
    add(
        "--dtype", choices=tuple(DTYPE_CHOICES), default="fp32",
        help="compute precision, bf16/fp16 via autocast; features are saved as float32 (default: %(default)s)",
    )
    add(
        "--num-workers", type=int_at_least(0), default=0,
        help="DataLoader worker processes that decode and preprocess (default: %(default)s)",
    )
    add(
        "--skip-unreadable", action="store_true",
        help="skip images that cannot be decoded (listed at the end and in the metadata) "
        "instead of stopping with an error (default: off)",
    )
    add("--no-progress", action="store_true", help="hide the progress bars (default: shown on a terminal only)")
    return parser


def _model_reference(name_or_path: str) -> str:
    """The model as recorded in the metadata: an absolute folder path, or the Hub id."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


@contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' own bars ("Loading weights") on or off, restoring the previous state.

    They write to stderr even when it is not a terminal, which would bury a one-line error
    in logs; the previous state is restored because ``main`` may run inside another program.
    """
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar)()


def run(args: argparse.Namespace) -> ExtractionResult:
    """The CLI's work once the flags are parsed; raises ``ExtractError`` / ``UnreadableImageError``."""
    output = check_output_path(args.output)  # fail before the slow part
    device = resolve_device(args.device)
    if args.dtype == "bf16" and (warning := slow_bf16_warning(device, "--dtype bf16")):
        print(f"macrl-extract: warning: {warning}", file=sys.stderr)
    show_progress = not args.no_progress and sys.stderr.isatty()
    with _transformers_progress_bars(show_progress):
        model, processor = load_model_and_processor(args.model, args.revision)
    pool = args.pool or model.config.pooling
    mode = "L" if model.config.num_channels == 1 else "RGB"
    source = build_source(args.data, mode, args.split, args.image_column, args.label_column)
    try:
        result = extract_features(
            model, processor, source,
            pool=pool, batch_size=args.batch_size, device=device, dtype=args.dtype,
            num_workers=args.num_workers, skip_unreadable=args.skip_unreadable,
            progress=show_progress,
        )
    except ValueError as e:
        if isinstance(e, UnreadableImageError):
            raise
        raise ExtractError(str(e)) from e
    info = {
        "model": _model_reference(args.model),
        "revision": args.revision,
        "data": args.data if not Path(args.data).exists() else str(Path(args.data).resolve()),
        "split": args.split if isinstance(source, HFDatasetSource) else None,
        "pool": pool,
        "dtype": args.dtype,
        "class_names": source.class_names,
    }
    save_features(result, output, info)
    if result.skipped:
        print(f"Skipped {len(result.skipped)} unreadable image(s):", file=sys.stderr)
        for image_id, reason in result.skipped:
            print(f"  {image_id}: {reason}", file=sys.stderr)
    print(
        f"Wrote {len(result.ids)} features {list(result.features.shape)} to {output}"
        + (f" ({len(result.skipped)} skipped)" if result.skipped else "")
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``macrl-extract``. Returns 0 on success, 1 on an unreadable image, 2 on a usage error."""
    return run_command(
        "macrl-extract", build_parser(), run, argv, (ExtractError,), interrupted="interrupted; no output written"
    )


if __name__ == "__main__":
    sys.exit(main())
