"""Real Fashion-MNIST images as PNG files in class subfolders, like a user's own labelled data."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from macrl.data.fashion_mnist import load_fashion_mnist


def write_class_folders(
    root: Path,
    images: int,
    *,
    split: str = "test",
    start: int = 0,
    size: int | None = None,
    mode: str = "L",
    labelled: bool = True,
) -> Path:
    """Fashion-MNIST `split` images start .. start + images - 1 as `root/class_<label>/<index>.png`, in PIL `mode`,
    resized to `size` px when given; with `labelled=False` flat in `root` (a folder without labels). Returns `root`."""
    pixels, labels = load_fashion_mnist(split)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + images):
        folder = root / f"class_{int(labels[index])}" if labelled else root
        folder.mkdir(exist_ok=True)
        image = Image.fromarray(pixels[index].numpy()).convert(mode)
        if size is not None:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / f"{index:05d}.png")
    return root
