"""PNG pictures of a run: the loss curves from the JSONL log, and a reconstruction grid of held-out images."""

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..modeling_macrl import MACRLForPreTraining
from ..visualization import Tile, draw_grid, to_display

# one panel each, top to bottom: (JSONL keys, title); the learning-rate panel also shows the momentum, and the
# live quality signals share one panel (each line named by its key's label)
PANELS = (
    (("loss",), "total loss"),
    (("reconstruction_loss",), "reconstruction loss (hidden patches)"),
    (("contrastive_loss",), "contrastive loss (InfoNCE)"),
    (("learning_rate",), "learning rate and EMA momentum"),
    (("knn_monitor_accuracy", "online_probe_accuracy"), "held-out accuracy (%)"),
)
LABELS = {"knn_monitor_accuracy": "kNN monitor", "online_probe_accuracy": "online linear probe"}


def curve_panels(records: list[dict]) -> list[tuple[list[str], str]]:
    """The panels `plot_loss_curves` draws for these log records: (the keys of `PANELS` they hold, title), top to
    bottom, a panel without any of its keys left out."""
    panels = [([key for key in keys if any(key in record for record in records)], title) for keys, title in PANELS]
    return [(keys, title) for keys, title in panels if keys]


def plot_loss_curves(log_path: Path, output_path: Path) -> Path:
    """The run's curves from its JSONL log, one panel per quantity on its own real y axis, against the step: the
    losses, the learning rate with the momentum (right axis), and the kNN monitor and the online probe, side by side
    on one panel, when the run had them."""
    import matplotlib

    matplotlib.use("Agg")  # headless: a file, never a window
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    panels = curve_panels(records)
    figure, axes = plt.subplots(max(len(panels), 1), 1, figsize=(8, 2.2 * max(len(panels), 1)), sharex=True,
                                squeeze=False)
    for axis, (keys, title) in zip(axes[:, 0], panels):
        for key, color in zip(keys, ("tab:blue", "tab:green")):
            steps, values = zip(*[(record["step"], record[key]) for record in records if key in record])
            axis.plot(steps, values, marker="o" if len(steps) < 20 else None, color=color, label=LABELS.get(key))
        if any(key in LABELS for key in keys):
            axis.legend(fontsize=8, loc="lower right")
        axis.set_title(title, fontsize=10, loc="left")
        axis.grid(alpha=0.3)
        if keys == ["learning_rate"]:
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


@torch.no_grad()
def reconstruction_grid(
    model: MACRLForPreTraining,
    pixel_values: torch.Tensor,
    mean: list[float],
    std: list[float],
    output_path: Path,
    seed: int = 0,
    labels: Sequence[str] = (),
) -> Path:
    """Rows: original, masked input (hidden patches grey), reconstruction with the visible patches pasted back; one
    column per image (`labels` name them). A `draw_grid` picture of 3 x N squares."""
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
    rows = [[Tile(image=image) for image in to_display(batch, mean, std)] for batch in (pixel_values, masked, pasted)]
    hidden = int(mask[0].sum().item())
    title = (
        f"MAE reconstruction: {hidden} of the {mask.shape[1]} patches hidden from the encoder (grey), the decoder "
        "predicts them"
    )
    row_titles = ["original", "masked input (hidden patches grey)", "reconstruction (visible patches pasted back)"]
    return draw_grid(rows, output_path, title, row_titles=row_titles, column_titles=list(labels))
