"""`macrl-convert KIND ...`: one command in front of the converters of `macrl.conversion` (listed there).

    macrl-convert checkpoint OUTPUT_DIR ./encoder            # the newest checkpoint of a macrl-pretrain run
    macrl-convert timm ./encoder ./encoder-timm --push-to-hub me/macrl-vit-s-timm
    macrl-convert mae mae_pretrain_vit_base.pth ./encoder --encoder-only
    macrl-convert onnx ./encoder ./encoder-onnx                # model.onnx + model.pt2, any batch and image size
    macrl-convert KIND --help                                # each converter's own flags
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .command_line import EXIT_USAGE
from .conversion import CONVERTERS

__all__ = ["main"]

PROG = "macrl-convert"


def _usage() -> str:
    kinds = "\n".join(f"  {kind:<11} macrl.conversion.{module}" for kind, module in CONVERTERS.items())
    return f"usage: {PROG} KIND [ARGS ...]   (KIND --help for a converter's flags)\n\nKIND:\n{kinds}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `macrl-convert`: the converter's own `main` on the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0
    kind, rest = argv[0], argv[1:]
    if kind not in CONVERTERS:
        print(f"{PROG}: error: unknown KIND {kind!r}; choose from {', '.join(CONVERTERS)} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    converter = importlib.import_module(f"macrl.conversion.{CONVERTERS[kind]}")
    return converter.main(rest)


if __name__ == "__main__":
    sys.exit(main())
