"""Security: no pickles, no unsafe torch.load, no trust_remote_code in the library, no code run from model folders,
and PIL's decompression-bomb limit left on.

The source checks parse every Python file of macrl/, conversion/, benchmarks/ and tests/ (the AST, so strings and
comments that merely mention a name do not count).
"""

from __future__ import annotations

import ast
import functools
import pickle  # noqa: F401 - only to build the malicious file below; allow-listed for this file
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForPreTraining, pipeline

import macrl  # noqa: F401 - registers MACRL with the Auto classes
from macrl import MACRLConfig, MACRLForPreTraining, MACRLImageProcessor, MACRLModel
from tests.tiny_models import TINY

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("macrl", "conversion", "benchmarks", "tests")
# files allowed to import pickle: this one builds a malicious pickle to show it is refused
PICKLE_ALLOWED = {"tests/test_security.py"}
# tests that pass trust_remote_code=True, in a subprocess without macrl, to show released folders work there
REMOTE_CODE_ALLOWED = {"tests/test_save_and_auto.py", "tests/test_hub_roundtrip.py"}


@functools.cache
def _python_files() -> dict[str, ast.AST]:
    files = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[path.relative_to(ROOT).as_posix()] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return files


def _dotted(node: ast.AST) -> str:
    """`torch.serialization.load` for the expression of a call's function, '' if it is not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


def test_the_scan_covers_the_repository():
    files = _python_files()
    assert {"macrl/pretrain.py", "macrl/hub.py", "macrl/data/image_folder.py", "tests/test_security.py"} <= set(files)
    assert any(name.startswith("conversion/") for name in files) and any(name.startswith("benchmarks/") for name in files)


def test_no_pickle_imports():
    found = []
    for name, tree in _python_files().items():
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            for module in modules:
                if module.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib"):
                    found.append((name, node.lineno, module))
    assert [f for f in found if f[0] not in PICKLE_ALLOWED] == []
    assert [(name, module) for name, _, module in found] == [("tests/test_security.py", "pickle")]  # seen: it works


def test_every_torch_load_is_weights_only():
    unsafe, seen = [], 0
    for name, tree in _python_files().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            function = _dotted(node.func)
            if function in ("torch.load", "torch.serialization.load", "load") and (
                function != "load" or _keyword(node, "weights_only") is not None
            ):
                seen += 1
                if _keyword(node, "weights_only") is not True:
                    unsafe.append(f"{name}:{node.lineno}")
            if function.endswith("np.load") or function.endswith("numpy.load"):
                if _keyword(node, "allow_pickle") not in (None, False):
                    unsafe.append(f"{name}:{node.lineno} (allow_pickle)")
    assert unsafe == []
    assert seen >= 1  # conversion/common.py reads original checkpoints with torch.load(weights_only=True)


def test_no_trust_remote_code_in_code():
    """No call passes trust_remote_code=True (or a variable), except tests that run it in a subprocess without macrl."""
    found = []
    for name, tree in _python_files().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and any(k.arg == "trust_remote_code" for k in node.keywords):
                if _keyword(node, "trust_remote_code") is not False:
                    found.append(name)
    assert found == []
    # the allow-listed tests hold it only in the source of a subprocess (a string), next to that subprocess
    strings = set()
    for name, tree in _python_files().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "trust_remote_code=True" in node.value:
                if name.startswith("tests/") and "import macrl" not in node.value and (
                    ".from_pretrained(" in node.value or "pipeline(" in node.value
                ):
                    strings.add(name)  # a script that loads with remote code
    assert strings == REMOTE_CODE_ALLOWED
    for name in REMOTE_CODE_ALLOWED:
        assert "subprocess.run(" in (ROOT / name).read_text(), name


def test_decompression_bomb_limit_is_never_disabled():
    """No code assigns Image.MAX_IMAGE_PIXELS or LOAD_TRUNCATED_IMAGES; importing every macrl module leaves PIL's
    default limit in place (a fresh interpreter, so no other test's monkeypatch can hide a change)."""
    assigned = []
    for name, tree in _python_files().items():
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in ("MAX_IMAGE_PIXELS", "LOAD_TRUNCATED_IMAGES"):
                    assigned.append(f"{name}:{node.lineno}")
    assert assigned == []

    script = textwrap.dedent(
        """
        import importlib, pkgutil
        from PIL import Image, ImageFile
        default = Image.MAX_IMAGE_PIXELS
        import macrl
        modules = [m.name for m in pkgutil.walk_packages(macrl.__path__, "macrl.")]
        for module in modules:
            importlib.import_module(module)
        assert default is not None and Image.MAX_IMAGE_PIXELS == default, Image.MAX_IMAGE_PIXELS
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
        print(len(modules), Image.MAX_IMAGE_PIXELS)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    count, limit = result.stdout.split()[-2:]
    assert int(count) >= 10 and int(limit) == 89_478_485  # PIL's default: ~89.5 megapixels
    assert Image.MAX_IMAGE_PIXELS is not None  # and in this process, after `import macrl`


HOSTILE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("code from the model folder ran")
raise RuntimeError("code from the model folder ran")
"""


@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    """A saved MACRL pre-training folder (auto_map + code files) whose code files would leave a marker if run."""
    folder = tmp_path / "model"
    torch.manual_seed(0)
    config = MACRLConfig(**TINY)
    MACRLForPreTraining(config).save_pretrained(folder)
    MACRLImageProcessor.from_model_config(config).save_pretrained(folder)
    assert "auto_map" in (folder / "config.json").read_text()
    code_files = sorted(folder.glob("*.py"))
    assert {"configuration_macrl.py", "modeling_macrl.py", "image_processing_macrl.py"} <= {p.name for p in code_files}
    for path in code_files:
        path.write_text(HOSTILE_CODE.format(marker=str(tmp_path / f"ran_{path.stem}")))
    return folder


def _assert_no_code_ran(tmp_path: Path, dynamic_before: set[str]) -> None:
    assert not list(tmp_path.glob("ran_*"))
    assert {m for m in sys.modules if m.startswith("transformers_modules")} == dynamic_before


def test_import_macrl_loads_folders_without_remote_code(hostile_folder, tmp_path):
    dynamic_before = {m for m in sys.modules if m.startswith("transformers_modules")}
    loaded = [
        AutoConfig.from_pretrained(hostile_folder),
        AutoModel.from_pretrained(hostile_folder),
        AutoModelForPreTraining.from_pretrained(hostile_folder),
        AutoImageProcessor.from_pretrained(hostile_folder),
        MACRLModel.from_pretrained(hostile_folder),
        pipeline("image-feature-extraction", model=str(hostile_folder)).model,
    ]
    for thing in loaded:
        assert type(thing).__module__.startswith("macrl."), type(thing)
    assert type(loaded[1]) is MACRLModel and type(loaded[2]) is MACRLForPreTraining
    _assert_no_code_ran(tmp_path, dynamic_before)


def test_loading_from_the_hub_runs_no_repository_code(hostile_folder, tmp_path, hub_server):
    from huggingface_hub import HfApi

    HfApi().create_repo("tester/hostile")
    HfApi().upload_folder(repo_id="tester/hostile", folder_path=hostile_folder)
    dynamic_before = {m for m in sys.modules if m.startswith("transformers_modules")}
    model = AutoModel.from_pretrained("tester/hostile")
    processor = AutoImageProcessor.from_pretrained("tester/hostile")
    assert type(model) is MACRLModel and type(processor) is MACRLImageProcessor
    _assert_no_code_ran(tmp_path, dynamic_before)


class _Payload:
    """Unpickling this runs `Path(marker).touch()`: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_a_malicious_pickle_in_a_model_folder_is_refused(hostile_folder, tmp_path):
    """transformers reads a pytorch_model.bin with torch.load(weights_only=True): the payload never runs."""
    (hostile_folder / "model.safetensors").unlink()
    marker = tmp_path / "pickle_ran"
    with open(hostile_folder / "pytorch_model.bin", "wb") as file:
        pickle.dump({"macrl.norm.weight": _Payload(str(marker))}, file)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        MACRLModel.from_pretrained(hostile_folder)
    assert not marker.exists()
