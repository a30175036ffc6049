"""PNG pictures of a run: the loss curves from the JSONL log, and a reconstruction grid of held-out images."""

import json
from pathlib import Path

import torch
from PIL import Image

from ..modeling_macrl import MACRLForPreTraining

# one panel each, top to bottom: (JSONL key, title); the learning-rate panel also shows the momentum
PANELS = (
    ("loss", "total loss"),
    ("reconstruction_loss", "reconstruction loss (hidden patches)"),
    ("contrastive_loss", "contrastive loss (InfoNCE)"),
    ("learning_rate", "learning rate and EMA momentum"),
    ("knn_monitor_accuracy", "kNN monitor accuracy (%)"),
)


def plot_loss_curves(log_path: Path, output_path: Path) -> Path:
    """The run's curves from its JSONL log, one panel per quantity on its own real y axis, against the step: the
    losses, the learning rate with the momentum (right axis), and the kNN monitor when the run had it."""
    import matplotlib

    matplotlib.use("Agg")  # headless: a file, never a window
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    panels = [(key, title) for key, title in PANELS if any(key in record for record in records)]
    figure, axes = plt.subplots(max(len(panels), 1), 1, figsize=(8, 2.2 * max(len(panels), 1)), sharex=True,
                                squeeze=False)
    for axis, (key, title) in zip(axes[:, 0], panels):
        steps, values = zip(*[(record["step"], record[key]) for record in records if key in record])
        axis.plot(steps, values, marker="o" if len(steps) < 20 else None, color="tab:blue")
        axis.set_title(title, fontsize=10, loc="left")
        axis.grid(alpha=0.3)
        if key == "learning_rate":
            momentum = [(record["step"], record["momentum"]) for record in records if "momentum" in record]
            if momentum:
                twin = axis.twinx()
                twin.plot(*zip(*momentum), color="tab:orange")
                twin.set_ylabel("momentum", color="tab:orange")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=axes[0, 0].transAxes)
    axes[-1, 0].set_xlabel("step")
    figure.suptitle("MACRL pre-training", fontsize=11)
    figure.tight_layout()
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return Path(output_path)


def _to_image(pixels: torch.Tensor, mean: list[float], std: list[float]) -> Image.Image:
    """`[C, H, W]` normalised tensor -> PIL image."""
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    array = (pixels * std_t + mean_t).clamp(0, 1).mul(255).round().byte()
    mode = "L" if array.shape[0] == 1 else "RGB"
    data = array[0].numpy() if mode == "L" else array.permute(1, 2, 0).numpy()
    return Image.fromarray(data, mode=mode).convert("RGB")


@torch.no_grad()
def reconstruction_grid(
    model: MACRLForPreTraining,
    pixel_values: torch.Tensor,
    mean: list[float],
    std: list[float],
    output_path: Path,
    seed: int = 0,
    scale: int = 4,
) -> Path:
    """Rows: original, masked input (hidden patches grey), reconstruction with the visible patches pasted back."""
    model.eval()
    device = next(model.parameters()).device
    pixel_values = pixel_values.to(device)
    noise = torch.rand(pixel_values.shape[:1] + (model.config.num_patches,), generator=torch.Generator().manual_seed(seed))
    # the decoder must run to draw it, even for a contrastive-only model
    encoded = model.macrl(pixel_values, mask_ratio=model.config.mask_ratio, noise=noise.to(device))
    tokens, mask, ids_restore = encoded.last_hidden_state, encoded.mask, encoded.ids_restore
    if ids_restore is None:
        mask = torch.zeros(noise.shape, device=device)
        ids_restore = torch.arange(noise.shape[1], device=device).expand(noise.shape[0], -1)
    predicted = model.decoder(tokens, ids_restore)  # [N, L, p*p*C]
    target = model.patchify(pixel_values)
    if model.config.norm_pix_loss:  # predictions are in per-patch normalised units: undo with the true statistics
        mean_p, var_p = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        predicted = predicted * (var_p + 1e-6).sqrt() + mean_p
    patch_mask = mask.unsqueeze(-1)  # [N, L, 1], 1 = hidden
    masked = model.unpatchify(target * (1 - patch_mask))
    pasted = model.unpatchify(target * (1 - patch_mask) + predicted * patch_mask)
    rows = [pixel_values, masked, pasted]
    count, (height, width) = pixel_values.shape[0], pixel_values.shape[2:]
    grid = Image.new("RGB", (count * width * scale, len(rows) * height * scale), "white")
    for row, batch in enumerate(rows):
        for column in range(count):
            tile = _to_image(batch[column].float().cpu(), mean, std).resize((width * scale, height * scale), Image.NEAREST)
            grid.paste(tile, (column * width * scale, row * height * scale))
    grid.save(output_path)
    return Path(output_path)
