"""Feature files: what `macrl-extract` writes, atomically (a temp file in the same folder, then `os.replace`).

* `.safetensors`: tensor `features` (float32), tensor `labels` (int64, when the source has labels) and string
  metadata: `model`, `revision`, `pool`, `dtype`, `count`, `ids` / `skipped` / `class_names` (JSON).
* `.npy`: the features array, plus a sidecar `<name>.ids.json` with the same metadata and the labels.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from . import __version__
from .atomic_files import atomic_path
from .errors import InputError
from .feature_extraction import ExtractionResult

__all__ = ["OUTPUT_EXTENSIONS", "FeatureFileError", "check_output_path", "save_features"]

OUTPUT_EXTENSIONS: tuple[str, ...] = (".safetensors", ".npy")


class FeatureFileError(InputError):
    """The features file cannot be written there: an unsupported extension, a folder, or a read-only place."""


def check_output_path(output: str | Path) -> Path:
    """Validate a features file path before any work is done: extension, and a writable folder.

    The folder may not exist yet (``save_features`` creates it); then its nearest existing
    ancestor must be a writable folder.

    Raises:
        FeatureFileError: unsupported extension, output is a folder, or the folder is not writable.
    """
    output = Path(output).expanduser()
    if output.suffix.lower() not in OUTPUT_EXTENSIONS:
        raise FeatureFileError(
            f"{output}: unsupported extension {output.suffix or '(none)'!r}; "
            f"use {' or '.join(OUTPUT_EXTENSIONS)}"
        )
    if output.is_dir():
        raise FeatureFileError(f"{output}: is a folder")
    ancestor = output.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FeatureFileError(f"{output}: {ancestor} is not a folder")
    try:
        # A real file rather than os.access: access() says yes to root and misses read-only mounts.
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise FeatureFileError(f"{output}: folder {ancestor} is not writable ({e.strerror or e})") from e
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
