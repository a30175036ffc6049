"""Real Hub downloads through an offline olah mirror (see tests/olah_mirror.py).

Every test talks HTTP to an olah process on 127.0.0.1 through the real
huggingface_hub / transformers client code; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

import pytest
import huggingface_hub
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from tests.olah_mirror import OlahServer, hf_mirror, olah_server  # noqa: F401  (fixtures)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _safetensors_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    return save({"w": torch.randn(64, 96, generator=g), "b": torch.arange(96, dtype=torch.int64)})


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    """A model folder with text, binary, nested and LFS-attributed files."""
    root = tmp_path_factory.mktemp("src")
    (root / "config.json").write_text(json.dumps({"model_type": "demo", "hidden": 8}, indent=2) + "\n")
    (root / "model.safetensors").write_bytes(_safetensors_bytes())
    # Random bytes incl. NUL/CR/LF: any text conversion or LFS filter would corrupt them.
    (root / "blob.bin").write_bytes(bytes(range(256)) * 3 + b"\r\n\x00" + os.urandom(4096))
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "notes.txt").write_text("line 1\r\nline 2\n")
    # Hub repos carry this; it must be an ordinary file here (no git-lfs involved).
    (root / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs -text\n")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _http(method: str, url: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with _NO_PROXY.open(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def test_server_is_offline_loopback_and_layout(olah_server: OlahServer, source_dir: Path):
    sha = olah_server.add_repo("layout/check", source_dir)
    repo = olah_server.repo_path("layout/check")
    assert repo == olah_server.mirrors_dir / "models" / "layout" / "check"
    assert (repo / ".git").is_dir()
    config = tomllib.loads(olah_server.config_path.read_text())
    assert config["accessibility"]["offline"] is True
    assert config["basic"]["host"] == "127.0.0.1"
    assert config["basic"]["mirrors-path"] == [str(olah_server.mirrors_dir)]
    assert config["basic"]["hf-netloc"] == "127.0.0.1:9"  # no route to huggingface.co at all
    assert olah_server.url == f"http://127.0.0.1:{config['basic']['port']}"
    # Plain blobs (no LFS pointers) and a deterministic author.
    out = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "-p", f"{sha}:model.safetensors"], capture_output=True, check=True
    ).stdout
    assert out == (source_dir / "model.safetensors").read_bytes()
    author = subprocess.run(
        ["git", "-C", str(repo), "log", "-1", "--format=%an <%ae> %at", sha], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert author == "macrl-tests <macrl-tests@example.invalid> 1704067200"
    assert "huggingface.co" not in olah_server.log_tail(100_000)


def test_hf_hub_download_text_and_binary_bit_identical(hf_mirror: OlahServer, source_dir: Path, tmp_path: Path):
    sha = hf_mirror.add_repo("acme/dl", source_dir)
    for name in ["config.json", "model.safetensors", "blob.bin", "sub/deeper/notes.txt", ".gitattributes"]:
        path = hf_hub_download("acme/dl", name)
        assert Path(path).read_bytes() == (source_dir / name).read_bytes(), name
        # Landed in this test's fresh cache, in the snapshot of the served commit.
        assert Path(path).parent.parts[-1 - name.count("/")] == sha
        assert str(tmp_path / "hf-cache") in path
    from safetensors.torch import load_file

    tensors = load_file(hf_hub_download("acme/dl", "model.safetensors"))
    assert tensors["w"].shape == (64, 96) and tensors["b"][-1].item() == 95


def test_head_metadata_headers(hf_mirror: OlahServer, source_dir: Path):
    sha = hf_mirror.add_repo("acme/head", source_dir)
    meta = get_hf_file_metadata(hf_hub_url("acme/head", "model.safetensors"))
    data = (source_dir / "model.safetensors").read_bytes()
    assert meta.commit_hash == sha  # X-Repo-Commit
    assert meta.size == len(data)  # Content-Length
    # ETag = git blob id (the Hub sends sha256 for LFS files; the client only keys its cache on it).
    assert meta.etag == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_snapshot_download_whole_repo(hf_mirror: OlahServer, source_dir: Path, tmp_path: Path):
    sha = hf_mirror.add_repo("acme/snap", source_dir)
    folder = Path(snapshot_download("acme/snap"))
    assert folder.name == sha
    assert _files(folder) == _files(source_dir)
    # Filtered, into a plain local_dir.
    local = Path(snapshot_download("acme/snap", allow_patterns=["*.json", "sub/*"], local_dir=tmp_path / "local"))
    got = {k: v for k, v in _files(local).items() if not k.startswith(".cache/")}
    assert got == {k: v for k, v in _files(source_dir).items() if k == "config.json" or k.startswith("sub/")}


def test_revisions_commit_sha_branch_and_tag(hf_mirror: OlahServer):
    first = hf_mirror.add_repo("acme/revs", {"config.json": '{"v": 1}', "only_v1.txt": b"old"}, tag="v1")
    second = hf_mirror.add_repo("acme/revs", {"config.json": '{"v": 2}', "w.bin": b"\x00\x01\x02"})
    dev = hf_mirror.add_repo("acme/revs", {"config.json": '{"v": "dev"}'}, branch="dev")
    assert len({first, second, dev}) == 3
    assert hf_mirror.refs("acme/revs") == {"main": second, "dev": dev, "v1": first}

    def read(revision=None, name="config.json"):
        return json.loads(Path(hf_hub_download("acme/revs", name, revision=revision)).read_text())

    assert read() == {"v": 2}
    assert read("main") == {"v": 2}
    assert read(first) == {"v": 1}
    assert read(first[:10]) == {"v": 1}  # git resolves short SHAs
    assert read("dev") == {"v": "dev"}
    assert read("v1") == {"v": 1}
    assert Path(hf_hub_download("acme/revs", "only_v1.txt", revision=first)).read_bytes() == b"old"

    old = Path(snapshot_download("acme/revs", revision=first))
    assert old.name == first and sorted(_files(old)) == ["config.json", "only_v1.txt"]
    assert Path(snapshot_download("acme/revs", revision="dev")).name == dev

    api = HfApi(endpoint=hf_mirror.url)
    assert api.model_info("acme/revs").sha == second  # no revision: needs the metadata seeding
    assert api.model_info("acme/revs", revision="dev").sha == dev
    assert sorted(api.list_repo_files("acme/revs", revision=first)) == ["config.json", "only_v1.txt"]
    assert huggingface_hub.model_info("acme/revs").sha == second  # module-level HfApi was repointed
    refs = api.list_repo_refs("acme/revs")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "dev": dev}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": first}


def test_missing_repo_file_and_revision_errors(hf_mirror: OlahServer):
    sha = hf_mirror.add_repo("acme/errs", {"config.json": "{}"})
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("acme/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hf_mirror.url).model_info("acme/does-not-exist")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/errs", "missing.bin")  # branch revision: needs the seeding
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/errs", "missing.bin", revision=sha)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/errs", "sub/missing.txt")
    # olah answers an unknown revision with 401 RepoNotFound (the Hub: 404 RevisionNotFound).
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/errs", "config.json", revision="no-such-branch")


def test_raw_http_answers(olah_server: OlahServer):
    """What olah 0.5.4 sends on the wire (pins the behaviour the docstring describes)."""
    sha = olah_server.add_repo("acme/raw", {"a.txt": "hello\n"})
    base = olah_server.url
    status, headers, body = _http("HEAD", f"{base}/acme/raw/resolve/main/a.txt")
    assert (status, headers["x-repo-commit"], headers["content-length"]) == (200, sha, "6")
    status, headers, body = _http("GET", f"{base}/acme/raw/resolve/{sha}/a.txt")
    assert (status, body) == (200, b"hello\n")
    status, headers, _ = _http("HEAD", f"{base}/acme/raw/resolve/main/nope.txt")
    assert (status, headers["x-error-code"]) == (404, "EntryNotFound")
    status, headers, _ = _http("HEAD", f"{base}/acme/nothing/resolve/main/a.txt")
    assert (status, headers["x-error-code"]) == (401, "RepoNotFound")
    status, headers, _ = _http("GET", f"{base}/api/models/acme/raw/revision/nope")
    assert (status, headers["x-error-code"]) == (401, "RepoNotFound")
    status, _, body = _http("GET", f"{base}/api/models/acme/raw/revision/main")
    assert status == 200 and json.loads(body)["sha"] == sha
    # olah bug: GET (without the client's preceding HEAD) of a missing file is a 500.
    status, _, _ = _http("GET", f"{base}/acme/raw/resolve/main/nope.txt")
    assert status == 500


def test_dataset_repo(hf_mirror: OlahServer):
    hf_mirror.add_repo("acme/data", {"train.csv": "a,b\n1,2\n"}, repo_type="dataset")
    assert (hf_mirror.mirrors_dir / "datasets" / "acme" / "data" / ".git").is_dir()
    path = hf_hub_download("acme/data", "train.csv", repo_type="dataset")
    assert Path(path).read_text() == "a,b\n1,2\n"


def test_subprocess_client_via_hf_endpoint_env(olah_server: OlahServer, tmp_path: Path):
    sha = olah_server.add_repo("acme/env", {"x.bin": bytes(range(200))})
    code = textwrap.dedent(
        """
        from huggingface_hub import hf_hub_download
        print(hf_hub_download("acme/env", "x.bin"))
        """
    )
    env = olah_server.client_env(tmp_path / "cache", base={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.read_bytes() == bytes(range(200)) and sha in path.parts


def test_transformers_from_pretrained(hf_mirror: OlahServer, tmp_path: Path):
    import torch
    from transformers import AutoConfig, AutoModel, ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    config.to_json_file(config_only / "config.json")
    hf_mirror.add_repo("acme/vit-config", config_only)
    loaded = AutoConfig.from_pretrained("acme/vit-config")
    assert type(loaded) is ViTConfig
    assert (loaded.hidden_size, loaded.num_hidden_layers, loaded.patch_size) == (32, 1, 8)

    torch.manual_seed(0)
    model = ViTModel(config).eval()
    model.save_pretrained(tmp_path / "vit")
    sha = hf_mirror.add_repo("acme/vit", tmp_path / "vit")
    remote = AutoModel.from_pretrained("acme/vit").eval()
    assert type(remote) is ViTModel
    snapshot = tmp_path / "hf-cache" / "models--acme--vit" / "snapshots" / sha
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(remote(pixels).last_hidden_state, model(pixels).last_hidden_state)


def test_transformers_pipeline(hf_mirror: OlahServer, tmp_path: Path):
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor, ViTModel, pipeline

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    hf_mirror.add_repo("acme/vit-pipe", tmp_path / "vit")
    extractor = pipeline("image-feature-extraction", model="acme/vit-pipe")
    features = extractor(Image.new("RGB", (48, 40), (10, 200, 30)), return_tensors=True)
    assert tuple(features.shape) == (1, 17, 32)  # CLS + (32/8)^2 patches, hidden 32
