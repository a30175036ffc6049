"""`macrl-extract`: encode a folder of images or a `datasets` dataset into a features file.

    macrl-extract --model ./macrl-vit-small --data ./photos --output feats.safetensors --pool mean

The work is the library's: `macrl.loading` (model and processor), `macrl.data.open_source` (the images),
`macrl.feature_extraction.extract_features` and `macrl.feature_files.save_features` (the file format). Ids are the
image paths relative to the data folder (POSIX), or the dataset indices.
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
    add_encoder_flags,
    about,
    int_at_least,
    progress_bars,
    run_command,
)
from .data import HFDatasetSource, open_source
from .devices import resolve_device
from .feature_extraction import DTYPE_CHOICES, POOL_CHOICES, ExtractionResult, extract_features
from .feature_files import check_output_path, save_features
from .loading import load_encoder_and_processor
from .precision import slow_precision_warning

__all__ = ["build_parser", "main", "run"]

PROG = "macrl-extract"
logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The `macrl-extract` flags; `--help` states every default."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Encode a folder of images or a `datasets` dataset with a MACRL encoder into a features file.",
        epilog=EXIT_STATUS_HELP,
    )
    add = parser.add_argument
    add_encoder_flags(parser)
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
    add(
        "--dtype", choices=tuple(DTYPE_CHOICES), default="fp32",
        help="compute precision: bf16/fp16 cast the weights once where the device has kernels for them; on a CPU "
        "without them (AVX2 only) they fall back to autocast, many times slower than fp32 (a warning says so); "
        "features are saved as float32 (default: %(default)s)",
    )
    add(
        "--compile", action="store_true",
        help="torch.compile the encoder (its compile time is printed, paid once; the last, smaller batch is padded "
        "so it compiles once) (default: off)",
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
    return parser


def _model_reference(name_or_path: str) -> str:
    """The model as recorded in the metadata: an absolute folder path, or the Hub id."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def run(args: argparse.Namespace) -> ExtractionResult:
    """The command's work once the flags are parsed."""
    with about("--output"):
        output = check_output_path(args.output)  # fail before the slow part
    with about("--device"):
        device = resolve_device(args.device)
    if warning := slow_precision_warning(device, f"--dtype {args.dtype}", args.dtype):
        logger.warning(warning)
    show_progress = not args.no_progress and sys.stderr.isatty()
    with progress_bars(show_progress), about("--model"):
        model, processor = load_encoder_and_processor(args.model, args.revision)
    pool = args.pool or model.config.pooling
    mode = "L" if model.config.num_channels == 1 else "RGB"
    with about("--data"):
        source = open_source(
            args.data, mode, split=args.split, image_column=args.image_column, label_column=args.label_column
        )
        result = extract_features(
            model, processor, source,
            pool=pool, batch_size=args.batch_size, device=device, dtype=args.dtype,
            num_workers=args.num_workers, skip_unreadable=args.skip_unreadable,
            progress=show_progress, compile=args.compile,
        )
    info = {
        "model": _model_reference(args.model),
        "revision": args.revision,
        "data": args.data if not Path(args.data).exists() else str(Path(args.data).resolve()),
        "split": args.split if isinstance(source, HFDatasetSource) else None,
        "pool": pool,
        "dtype": args.dtype,
        "compile": args.compile,
        "class_names": source.class_names,
    }
    with about("--output"):
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
    """Entry point of `macrl-extract`; the exit codes of `macrl.command_line`."""
    return run_command(PROG, build_parser(), run, argv, interrupted="interrupted; no output written")


if __name__ == "__main__":
    sys.exit(main())
