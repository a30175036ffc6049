"""PNG pictures of a run: the loss curves from the JSONL log, and a reconstruction grid of held-out images."""

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..modeling_macrl import MACRLForPreTraining

CURVES = (("loss", (31, 119, 180)), ("reconstruction_loss", (44, 160, 44)), ("contrastive_loss", (214, 39, 40)))


def plot_loss_curves(log_path: Path, output_path: Path, size: tuple[int, int] = (900, 520)) -> Path:
    """Line plot of the total, reconstruction and contrastive losses against the step, each scaled to its range."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 12), "MACRL pre-training losses (each curve scaled to its own min-max)", fill="black", font=font)
    steps = [record["step"] for record in records]
    if not steps:
        draw.text((left + 10, top + 10), "no logged steps", fill="black", font=font)
        image.save(output_path)
        return Path(output_path)
    first, last = min(steps), max(steps)
    span = max(last - first, 1)
    for tick in range(5):
        step = first + span * tick / 4
        x = left + (width - left - right) * tick / 4
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step:.0f}", fill="black", font=font)
    draw.text(((width - 40) // 2, height - 18), "step", fill="black", font=font)
    for row, (name, colour) in enumerate(CURVES):
        points = [(record["step"], record[name]) for record in records if name in record]
        if not points:
            continue
        values = [value for _, value in points]
        low, high = min(values), max(values)
        scale = (high - low) or 1.0
        xy = [
            (
                left + (width - left - right) * (step - first) / span,
                top + (height - top - bottom) * (1 - (value - low) / scale),
            )
            for step, value in points
        ]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        else:
            draw.ellipse([xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3], fill=colour)
        label = f"{name}: {values[0]:.4f} -> {values[-1]:.4f} (range {low:.4f}..{high:.4f})"
        draw.text((left + 10, top + 8 + 14 * row), label, fill=colour, font=font)
    image.save(output_path)
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
    tokens, mask, ids_restore, _ = model.macrl.forward_encoder(pixel_values, model.config.mask_ratio, noise.to(device))
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
