"""Real WebDataset tar shards of Fashion-MNIST images, written by the tests (`write_shards`)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from macrl.data.fashion_mnist import load_fashion_mnist


def fashion_samples(count: int, start: int = 0) -> list[tuple[str, bytes, int]]:
    """(key, PNG bytes, label) of Fashion-MNIST training images start .. start + count - 1."""
    images, labels = load_fashion_mnist("train")
    samples = []
    for index in range(start, start + count):
        buffer = io.BytesIO()
        Image.fromarray(images[index].numpy(), mode="L").save(buffer, format="PNG")
        samples.append((f"fmnist_{index:06d}", buffer.getvalue(), int(labels[index])))
    return samples


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, images: int = 192, shards: int = 4, start: int = 0) -> str:
    """`images` Fashion-MNIST images as `shards` tars `folder/train-00000{0..N-1}.tar` (PNG + cls); returns the
    brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = fashion_samples(images, start)
    per_shard = -(-images // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, png, label in samples[shard * per_shard:(shard + 1) * per_shard]:
                _add(tar, f"{key}.png", png)
                _add(tar, f"{key}.cls", str(label).encode())
    return str(folder / f"train-{{000000..{shards - 1:06d}}}.tar")
