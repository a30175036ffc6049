"""Export a MACRL encoder for deployment: an ONNX file and a `torch.export` program, with dynamic batch, height and
width, each checked against the eager model at two image sizes.

    macrl-convert onnx ./encoder ./encoder-onnx                  # any batch, any size (multiples of the patch size)
    macrl-convert onnx ./encoder ./encoder-onnx --fixed-size     # any batch, the model's own image size
    macrl-convert onnx OUTPUT_DIR ./encoder-onnx                 # the encoder of a macrl-pretrain run

The source is anything `macrl.loading.load_encoder` reads: an encoder, pre-training or classification folder, or a Hub
id. OUTPUT_DIR receives:

* `model.onnx`: input `pixel_values` `[batch, channels, height, width]` (float32, normalised as the image processor
  does), outputs `last_hidden_state` `[batch, tokens, hidden_size]` (CLS first) and `pooler_output`
  `[batch, hidden_size]`; run it with onnxruntime. Made by the dynamo exporter (`torch.onnx.export`) from the
  program below; weights inline (models over 1.5 GB: in `model.onnx.data` beside it);
* `model.pt2`: the same program saved by `torch.export.save`; `torch.export.load(path).module()(pixel_values)` gives
  the same two tensors. `torch.export.load` unpickles parts of the file: load only `.pt2` files you made or trust;
* `preprocessor_config.json`: the image processor (size, mean and std) that prepares the input.

Height and width are dynamic where the model computes its positions for any grid; a model that resamples them for
another size (learned positions, or the bicubic resampling of fixed ones) gives a program that runs at its own size
only, and the check at the second size says so: export it with `--fixed-size` (dynamic batch, `config.image_size`).
The check runs both files at batch 2 and 3, at `config.image_size` and at a non-square size of a few more patches
(`--fixed-size`: at `config.image_size` twice), and logs the largest difference from eager for each; a difference
beyond `--atol` + `--rtol` is an error (exit 1), and nothing is written then. A folder's older files are replaced
only once the new ones pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if not __package__:  # run as a file from a checkout, `python conversion/convert_macrl_to_onnx.py` (as_file.py)
    import as_file

    __package__ = as_file.PACKAGE

from .common import (
    ConversionParser,
    OutputMismatchError,
    add_common_arguments,
    compare_outputs,
    log,
    run_cli,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from macrl import MACRLModel

ONNX_FILE, PT2_FILE = "model.onnx", "model.pt2"
INPUT_NAMES, OUTPUT_NAMES = ["pixel_values"], ["last_hidden_state", "pooler_output"]
MAX_BATCH, MAX_GRID = 4096, 256  # the dynamic dimensions' ranges: up to 256 x 256 patches (4096 px at 16-px patches)
EXTERNAL_DATA_BYTES = 1.5e9  # an ONNX file holds at most 2 GB (protobuf): larger weights go to model.onnx.data


def export_module(encoder: MACRLModel, any_size: bool) -> nn.Module:
    """`encoder` with a plain signature for export: `pixel_values` -> `(last_hidden_state, pooler_output)`, at any
    image size with `any_size` (`interpolate_pos_encoding`)."""
    from torch import nn

    class MACRLExport(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            output = self.encoder(pixel_values, interpolate_pos_encoding=any_size, return_dict=True)
            return output.last_hidden_state, output.pooler_output

    return MACRLExport().eval()


def dynamic_shapes(patch_size: int, any_size: bool) -> dict:
    """`torch.export`'s dynamic shapes of `pixel_values`: the batch, and with `any_size` height and width as
    multiples of the patch size."""
    from torch.export import Dim

    shapes = {0: Dim("batch", min=1, max=MAX_BATCH)}
    if any_size:
        shapes[2] = patch_size * Dim("patch_rows", min=1, max=MAX_GRID)
        shapes[3] = patch_size * Dim("patch_columns", min=1, max=MAX_GRID)
    return {"pixel_values": shapes}


def check_sizes(config, any_size: bool) -> list[tuple[int, int, int]]:
    """The `(batch, height, width)` the exported files are checked at: batch 2 at the model's size, batch 3 at a
    non-square size a few patches larger (`any_size`) or at the model's size again."""
    size, patch = config.image_size, config.patch_size
    return [(2, size, size), (3, size + patch, size + 2 * patch) if any_size else (3, size, size)]


def _export_files(wrapper: nn.Module, example: torch.Tensor, shapes: dict, folder: Path, external_data: bool) -> None:
    """`torch.export` once; save the program (`PT2_FILE`) and its ONNX translation (`ONNX_FILE`) into `folder`."""
    import torch

    program = torch.export.export(wrapper, (example,), dynamic_shapes=shapes)
    torch.export.save(program, folder / PT2_FILE)
    torch.onnx.export(
        program, f=str(folder / ONNX_FILE), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamo=True,
        external_data=external_data, verbose=False,
    )


def _check_files(encoder: MACRLModel, folder: Path, any_size: bool, atol: float, rtol: float, seed: int) -> dict:
    """Run both files at `check_sizes` against eager; returns the largest difference of each, by name."""
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the failure of a run is raised, not also logged by onnxruntime
    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    program = torch.export.load(folder / PT2_FILE).module()
    config = encoder.config
    generator = torch.Generator().manual_seed(seed)
    largest: dict[str, float] = {}
    for batch, height, width in check_sizes(config, any_size):
        pixels = torch.randn(batch, config.num_channels, height, width, generator=generator)
        with torch.no_grad():
            expected = encoder(pixels, interpolate_pos_encoding=any_size)
            runs = {}
            try:
                runs[PT2_FILE] = program(pixels)
                runs[ONNX_FILE] = [torch.from_numpy(array) for array in session.run(None, {"pixel_values": pixels.numpy()})]
            except (AssertionError, RuntimeError, onnxruntime.capi.onnxruntime_pybind11_state.Fail,
                    onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument) as error:  # fmt: skip
                failed = ONNX_FILE if PT2_FILE in runs else PT2_FILE
                raise OutputMismatchError(
                    f"the exported {failed} does not run at batch {batch}, {height}x{width}: "
                    f"{str(error).strip().splitlines()[0]} (a model whose positions are resampled for other image "
                    "sizes exports at its own size only: pass --fixed-size)"
                ) from error
        for name, (tokens, pooled) in runs.items():
            where = f"{name} at batch {batch}, {height}x{width}"
            largest[name] = max(
                largest.get(name, 0.0),
                compare_outputs(tokens, expected.last_hidden_state, atol, rtol, f"{where}: last_hidden_state"),
                compare_outputs(pooled, expected.pooler_output, atol, rtol, f"{where}: pooler_output"),
            )
    return largest


def export_encoder(
    source: str,
    output_dir: str | Path,
    *,
    fixed_size: bool = False,
    revision: str | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Export the encoder of `source` to `output_dir` (module docstring) and check both files against eager; returns
    the largest absolute difference of each file (`{"model.onnx": ..., "model.pt2": ...}`).

    Raises:
        OutputMismatchError: an exported file differs from eager beyond the tolerance, or does not run at a checked
            size; nothing is written then.
        ModelLoadError: `source` is not a MACRL model.
    """
    import torch

    from macrl.loading import check_model_reference, load_encoder, load_image_processor

    log(f"loading {source}")
    encoder = load_encoder(source, revision).eval()
    config = encoder.config
    any_size = not fixed_size
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights_bytes = sum(tensor.numel() * tensor.element_size() for tensor in encoder.state_dict().values())
    example = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".export-"))
    try:
        log(
            f"exporting with a dynamic batch{', height and width' if any_size else ''} "
            f"({'multiples of ' + str(config.patch_size) + ' px' if any_size else f'{config.image_size} px'})"
        )
        shapes = dynamic_shapes(config.patch_size, any_size)
        _export_files(export_module(encoder, any_size), example, shapes, staging, weights_bytes > EXTERNAL_DATA_BYTES)
        log("checking both files against the eager model")
        largest = _check_files(encoder, staging, any_size, atol, rtol, seed)
        for path in staging.iterdir():
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    load_image_processor(check_model_reference(source), config, revision).save_pretrained(output_dir)
    for name, difference in largest.items():
        log(f"{output_dir / name}: largest difference from eager {difference:.2e}")
    return largest


# ---------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = ConversionParser(
        prog="macrl-convert onnx",
        description="Export a MACRL encoder (folder or Hub id) as model.onnx and model.pt2 (torch.export) with a "
        "dynamic batch, height and width; both are checked against the eager model at two image sizes.",
    )
    parser.add_argument("source", help="MACRL encoder, pre-training or classification folder, or Hub id")
    parser.add_argument("output_dir", help="folder to write model.onnx, model.pt2 and preprocessor_config.json to")
    parser.add_argument(
        "--fixed-size", action="store_true",
        help="height and width fixed at the model's image size (for a model that resamples its positions)",
    )
    parser.add_argument("--revision", help="Hub branch, tag or commit of the source")
    add_common_arguments(parser, overrides=False, hub=False)
    parser.set_defaults(atol=1e-4)  # ONNX kernels sum in another order than torch's
    return parser


def _run(args: argparse.Namespace) -> None:
    export_encoder(
        args.source, args.output_dir, fixed_size=args.fixed_size, revision=args.revision,
        atol=args.atol, rtol=args.rtol, seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
