"""Images/s of the pre-training data pipeline alone (decode + the two views + the mask) per DataLoader worker, for a
folder, WebDataset shards and a streaming `datasets` dataset, beside the images/s of the model's training step and
its FLOPs: how many workers keep the model fed.

The images: ``--images`` JPEGs of 500 x 375 px (ImageNet's most common size), Fashion-MNIST garments scaled up and
tinted, written once as a folder, as 4 tar shards and as 4 parquet files; every source reads the same bytes. One
worker is one process with one torch thread (``torch.set_num_threads(1)``), reading with ``num_workers=0``; the views
are the per-image torchvision pipeline at ``--image-size`` (images of mixed sizes, as real data sets have, cannot be
batched). The model step (forward, backward, AdamW; fp32 and bf16 autocast) uses every core; its FLOPs per image are
counted by ``torch.utils.flop_counter`` next to those of a supervised timm ``vit_base_patch16_224`` training step, so
a published GPU rate of that step converts to MACRL's (README, "Data at scale").

    python benchmarks/data_pipeline.py                         # ViT-B/16 at 224 px, 96 images per source
    python benchmarks/data_pipeline.py --images 32 --model-steps 0   # the pipeline only
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from macrl.data import (  # noqa: E402
    AugmentationConfig,
    ImageFolderSource,
    StreamingTwoViewDataset,
    TwoViewDataset,
    build_strong_transform,
    build_weak_transform,
    open_stream,
)
from macrl.data.fashion_mnist import load_fashion_mnist  # noqa: E402


def write_images(root: Path, count: int) -> dict[str, str]:
    """The same `count` JPEGs as a folder, 4 tar shards and 4 parquet files; the `--data` of each."""
    from PIL import Image

    images, labels = load_fashion_mnist("train")
    folder, shards, parquet = root / "folder", root / "shards", root / "parquet"
    for path in (folder, shards, parquet):
        path.mkdir(parents=True)
    encoded = []
    for index in range(count):
        garment = Image.fromarray(images[index].numpy(), mode="L").resize((500, 375), Image.BICUBIC)
        tint = Image.new("RGB", garment.size, (40 + 50 * (index % 4), 90, 200 - 40 * (index % 3)))
        picture = Image.composite(garment.convert("RGB"), tint, garment)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        encoded.append((f"img_{index:06d}", buffer.getvalue(), int(labels[index])))
        (folder / f"img_{index:06d}.jpg").write_bytes(buffer.getvalue())
    per = -(-count // 4)
    for shard in range(4):
        with tarfile.open(shards / f"train-{shard:06d}.tar", "w") as tar:
            for key, data, label in encoded[shard * per:(shard + 1) * per]:
                for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    try:
        import datasets

        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        for shard in range(4):
            rows = encoded[shard * per:(shard + 1) * per]
            table = datasets.Dataset.from_dict(
                {"image": [{"bytes": data, "path": None} for _, data, _ in rows], "label": [r[2] for r in rows]},
                features=features,
            )
            table.to_parquet(str(parquet / f"train-{shard}.parquet"))
        streaming = str(parquet)
    except ImportError:
        streaming = None
    return {"folder": str(folder), "shards": str(shards / "train-{000000..000003}.tar"), "streaming": streaming}


def pipeline_rate(kind: str, data: str, count: int, augmentation: AugmentationConfig, num_patches: int) -> float:
    """Images/s of one single-threaded reader: decode, both views and the mask of `count` images."""
    strong, weak = build_strong_transform(augmentation), build_weak_transform(augmentation)
    if kind == "folder":
        dataset = TwoViewDataset(ImageFolderSource(data, mode="RGB"), strong, weak, num_patches=num_patches)
        samples = (dataset[index] for index in range(count))
    else:
        views = TwoViewDataset(None, strong, weak, num_patches=num_patches)
        dataset = StreamingTwoViewDataset(open_stream(data, "RGB"), views, "RGB", buffer_size=16, rank=0, processes=1)
        samples = (sample for _, sample in zip(range(count), dataset))
    next(samples)  # opening the first file, the first import of a codec
    start = time.perf_counter()
    done = sum(1 for _ in samples)
    return done / (time.perf_counter() - start)


def step_flops(model, batch: dict) -> float:
    """FLOPs of one forward + backward of `model` on `batch` (torch.utils.flop_counter), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        output = model(**batch)
        loss = output.loss if hasattr(output, "loss") else output.float().pow(2).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / next(iter(batch.values())).shape[0]


def model_rates(config_name: str, batch_size: int, steps: int) -> dict:
    from macrl import MACRLForPreTraining
    from macrl.presets import load_config

    config = load_config(config_name)
    model = MACRLForPreTraining(config).train()
    size = config.image_size

    def batch(n):
        return {
            "pixel_values": torch.randn(n, config.num_channels, size, size),
            "momentum_pixel_values": torch.randn(n, config.num_channels, size, size),
            "noise": torch.rand(n, config.num_patches),
        }

    result = {"macrl_flops": step_flops(model, batch(2))}
    try:
        import timm

        supervised = timm.create_model("vit_base_patch16_224", num_classes=1000)
        result["vit_b_supervised_flops"] = step_flops(supervised, {"x": torch.randn(2, 3, 224, 224)})
    except ImportError:
        pass
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    inputs = batch(batch_size)
    for precision in ("fp32", "bf16"):
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**inputs).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.update_momentum_branch(0.0)
            times.append(time.perf_counter() - start)
        result[f"step_{precision}"] = batch_size / sorted(times[1:])[len(times[1:]) // 2]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="images per source")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--config", default="vit-base-patch16-224", help="the model of the step column")
    parser.add_argument("--model-steps", type=int, default=2, help="timed model steps per precision (0: skip)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the model step")
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    load_before = os.getloadavg()[0]
    augmentation = AugmentationConfig(image_size=args.image_size, num_channels=3)
    num_patches = (args.image_size // 16) ** 2
    with tempfile.TemporaryDirectory() as root:
        sources = write_images(Path(root), args.images)
        torch.set_num_threads(1)
        rates = {kind: pipeline_rate(kind, data, args.images, augmentation, num_patches)
                 for kind, data in sources.items() if data is not None}
    torch.set_num_threads(threads)
    model = model_rates(args.config, args.batch_size, args.model_steps) if args.model_steps else {}

    print(f"command: python benchmarks/data_pipeline.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {cpu}, {os.cpu_count()} logical cores; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; torch {torch.__version__}")
    print(f"images: {args.images} JPEGs of 500x375 per source; views at {args.image_size} px (per-image pipeline)\n")
    print("| data pipeline, 1 worker (1 thread) | images/s |")
    print("|---|---|")
    for kind, rate in rates.items():
        print(f"| {kind} | {rate:.1f} |")
    if model:
        print(f"\n| model step ({args.config}, batch {args.batch_size}, {threads} threads) | images/s |")
        print("|---|---|")
        print(f"| fp32 | {model['step_fp32']:.2f} |")
        print(f"| bf16 autocast | {model['step_bf16']:.2f} |")
        print(f"\nFLOPs per image, forward + backward: MACRL {model['macrl_flops'] / 1e9:.1f} GFLOP", end="")
        if "vit_b_supervised_flops" in model:
            ratio = model["vit_b_supervised_flops"] / model["macrl_flops"]
            print(f"; supervised timm vit_base_patch16_224 {model['vit_b_supervised_flops'] / 1e9:.1f} GFLOP "
                  f"(a MACRL step is {ratio:.2f}x the images/s of a supervised step at equal FLOP/s)")
        else:
            print()
        slowest = min(rates.values())
        fastest_step = max(model["step_fp32"], model["step_bf16"])
        print(f"\nworkers to feed this CPU's model step: {fastest_step / slowest:.2f} (slowest source)")


if __name__ == "__main__":
    main()
