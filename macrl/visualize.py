"""`macrl-visualize`: draw what a MACRL encoder attends to and what its patch tokens hold, for a folder of images.

    macrl-visualize --model ./encoder --images ./photos --output-dir ./pictures
    macrl-visualize --model OUTPUT_DIR --images ./photos    # a macrl-pretrain run: its reconstructions too

Writes `attention_maps.png` (the CLS token's attention over the patches in the last block, per head, laid over each
image) and `feature_pca.png` (the first principal components of the patch tokens as colours), and, for a pre-training
folder (`macrl-pretrain`'s OUTPUT_DIR, or a converted `MACRLForPreTraining`), `reconstructions.png` (original, masked
input, reconstruction). The images (any mode, any size) are resized and normalised by the model's image processor;
they are taken evenly spread over the folder (which lists them by subfolder, then by name). The work is the library's:
`macrl.loading`, `macrl.visualization.encoder_pictures` and `macrl.training.pictures.reconstruction_grid`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .command_line import (
    EXIT_STATUS_HELP,
    OneLineErrorParser,
    UsageError,
    about,
    add_encoder_flags,
    int_at_least,
    progress_bars,
    run_command,
)
from .data import DataError, UnreadableImageError, open_source
from .devices import resolve_device
from .loading import check_model_reference, load_image_processor, load_pretraining_or_encoder
from .modeling_macrl import MACRLForPreTraining
from .training.pictures import reconstruction_grid
from .visualization import encoder_pictures

__all__ = ["build_parser", "main", "run"]

PROG = "macrl-visualize"
RECONSTRUCTIONS_FILE = "reconstructions.png"
logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The `macrl-visualize` flags; `--help` states every default."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Draw a MACRL encoder's attention maps and feature PCA (and a pre-training folder's "
        "reconstructions) for a folder of images.",
        epilog=EXIT_STATUS_HELP,
    )
    add = parser.add_argument
    add_encoder_flags(parser)
    add("--images", required=True, help="folder of images, scanned recursively (required)")
    add("--output-dir", default="pictures", help="folder the pictures are written to (default: %(default)s)")
    add("--num-images", type=int_at_least(1), default=4, help="images drawn, spread over the folder (default: %(default)s)")
    add(
        "--threshold", type=float, default=0.0,
        help="feature PCA: the patches above this score on the first component are the foreground (default: "
        "%(default)s, as DINOv2)",
    )
    add("--no-threshold", action="store_true", help="feature PCA: keep every patch, no foreground (default: off)")
    add("--seed", type=int, default=0, help="seed of the reconstructions' masks (default: %(default)s)")
    add(
        "--skip-unreadable", action="store_true",
        help="leave out images that cannot be decoded (a warning names each) instead of stopping (default: off)",
    )
    return parser


def _read_images(folder: str, mode: str, count: int, skip_unreadable: bool) -> tuple[list, list[str]]:
    """Up to `count` images of `folder`, spread evenly over it, and their paths relative to it."""
    if not Path(folder).expanduser().is_dir():
        raise DataError(f"{folder}: folder not found")
    source = open_source(str(Path(folder).expanduser()), mode)
    count = min(count, len(source))
    images, names = [], []
    for index in (i * len(source) // count for i in range(count)):
        try:
            images.append(source.load_image(index))
        except UnreadableImageError as error:
            if not skip_unreadable:
                raise
            logger.warning("skipping %s", error)
            continue
        names.append(Path(source.describe(index)).name)
    if not images:
        raise DataError(f"{folder}: none of the {count} images read could be decoded")
    return images, names


def run(args: argparse.Namespace) -> list[Path]:
    """The command's work once the flags are parsed; returns the pictures written."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir}: not a folder")
    with about("--device"):
        device = resolve_device(args.device)
    with progress_bars(not args.no_progress and sys.stderr.isatty()), about("--model"):
        model = load_pretraining_or_encoder(args.model, args.revision)
        processor = load_image_processor(check_model_reference(args.model), model.config, args.revision)
    mode = "L" if model.config.num_channels == 1 else "RGB"
    with about("--images"):
        images, names = _read_images(args.images, mode, args.num_images, args.skip_unreadable)
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    mean, std = list(processor.image_mean), list(processor.image_std)
    model = model.to(device).eval()
    threshold = None if args.no_threshold else args.threshold
    written = encoder_pictures(model, pixel_values, mean, std, output_dir, labels=names, threshold=threshold)
    if isinstance(model, MACRLForPreTraining):
        written.append(
            reconstruction_grid(model, pixel_values, mean, std, output_dir / RECONSTRUCTIONS_FILE, args.seed, names)
        )
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `macrl-visualize`; the exit codes of `macrl.command_line`."""
    return run_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
