"""Lets a converter run as a file, the way transformers' converters are run:
`python conversion/convert_vit_mae_to_macrl.py --help` from a checkout (or from the installed copy's folder).

Run as a file, a module has no package, and Python puts its own folder on `sys.path`, so the converters' relative
imports (`from .common import ...`, and `common`'s `from ..command_line import ...`) would fail. A converter imports
this module first when it has no package, and takes `PACKAGE` as its own, as `python -m macrl.conversion.convert_X`
would have given it:

    if not __package__:
        import as_file

        __package__ = as_file.PACKAGE

Importing it puts the `macrl` that sits beside this folder first on `sys.path` (a checkout's root; the installed
package's parent) and loads this folder as `macrl.conversion`, as the package-dir mapping of pyproject.toml installs
it.
"""

import importlib.util
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
# a checkout: conversion/ beside macrl/; an installed copy: macrl/conversion/
ROOT = FOLDER.parent if (FOLDER.parent / "macrl" / "__init__.py").is_file() else FOLDER.parent.parent
PACKAGE = "macrl.conversion"

sys.path.insert(0, str(ROOT))
if PACKAGE not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        PACKAGE, FOLDER / "__init__.py", submodule_search_locations=[str(FOLDER)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
