"""The docs stay true: the site builds in strict mode (a broken link, anchor or API name fails it), and every Python
snippet of docs/*.md and README.md runs, on the tiny preset (docs/writing-docs.md: what a snippet finds when it runs,
and the `<!-- docs-test: ... -->` comments that change what runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.image_folders import write_class_folders
from tests.tiny_models import save_tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(\{.*\})\s*-->\s*$")
HUB_REPO = "you/macrl-fmnist"


@dataclass
class Snippet:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    directive: dict

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_snippets(page: Path) -> list[Snippet]:
    """The ```python blocks of `page`, each with the `docs-test` directive on the line before its fence ({} if none)."""
    lines = page.read_text().splitlines()
    snippets, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        if fence.group(1) == "python":
            before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            directive = DIRECTIVE.match(before.strip())
            snippets.append(Snippet(page, index + 1, "\n".join(lines[index + 1 : end]) + "\n",
                                    json.loads(directive.group(1)) if directive else {}))
        index = end + 1
    return snippets


SNIPPETS = [snippet for page in PAGES for snippet in python_snippets(page)]


def test_the_docs_have_snippets_and_every_directive_is_known():
    assert len(SNIPPETS) >= 8 and any(s.page.name == "README.md" for s in SNIPPETS)
    for snippet in SNIPPETS:
        assert set(snippet.directive) <= {"replace", "skip", "continue"}, snippet.name
        for old in snippet.directive.get("replace", {}):
            assert old in snippet.code, f"{snippet.name}: docs-test replaces {old!r}, which the snippet does not hold"


@pytest.fixture(scope="module")
def docs_inputs(tmp_path_factory) -> Path:
    """What every snippet finds in its working folder (docs/writing-docs.md), made once."""
    folder = tmp_path_factory.mktemp("docs-inputs")
    save_tiny_encoder(folder / "outputs" / "macrl-fmnist" / "encoder")
    subprocess.run([sys.executable, "-m", "macrl.convert", "onnx", str(folder / "outputs" / "macrl-fmnist" / "encoder"),
                    str(folder / "encoder-onnx")], check=True, capture_output=True)
    write_class_folders(folder / "images", 64)
    write_class_folders(folder / "labelled" / "train", 64, start=1000)
    write_class_folders(folder / "labelled" / "test", 32, start=2000, split="test")
    shutil.copy(next((folder / "images").rglob("*.png")), folder / "shirt.png")
    return folder


_namespaces: dict[Path, dict] = {}


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda snippet: snippet.name)
def test_snippet_runs(snippet: Snippet, docs_inputs, hub_server, tmp_path, monkeypatch):
    if "skip" in snippet.directive:
        pytest.skip(f"{snippet.name}: {snippet.directive['skip']}")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(HUB_REPO)
    api.upload_folder(repo_id=HUB_REPO, folder_path=docs_inputs / "outputs" / "macrl-fmnist" / "encoder")
    for entry in docs_inputs.iterdir():
        (tmp_path / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    monkeypatch.chdir(tmp_path)
    code = snippet.code
    for old, new in snippet.directive.get("replace", {}).items():
        code = code.replace(old, new)
    namespace = _namespaces.get(snippet.page, {}) if snippet.directive.get("continue") else {}
    namespace.setdefault("__name__", "__main__")
    exec(compile(code, snippet.name, "exec"), namespace)
    _namespaces[snippet.page] = namespace


def test_the_site_builds_in_strict_mode(tmp_path):
    for module, package in (("mkdocs", "mkdocs"), ("material", "mkdocs-material"), ("mkdocstrings", "mkdocstrings"),
                            ("mkdocstrings_handlers.python", "mkdocstrings-python")):
        pytest.importorskip(module, reason=f"{package} is not installed: pip install -e '.[docs]' builds the docs")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "training" / "index.html").is_file()
