"""Look inside an encoder: where its CLS token attends, and what its patch tokens hold.

Two pictures that users of self-supervised ViTs draw before they trust one:

* **attention maps** (DINO's `visualize_attention.py`): the CLS token's softmax attention over the patch tokens in
  the last block, one map per head, laid over the image, one square per patch;
* **feature PCA** (DINOv2's Figure 1, dinov2 issues #23 / #45): a PCA over each image's patch tokens; the patches
  that score above 0 on its first component are the foreground, and a second PCA over the foreground patches of all
  the images together gives three components shown as red, green and blue (the background black).

`encoder_maps` computes both from one forward pass with `output_attentions=True` (computed eagerly for that call, so
the maps are the same whatever `attn_implementation` the model runs with); `feature_pca` does the PCA;
`plot_attention_maps` and `plot_feature_pca` draw them (a matplotlib `Figure`, written with Agg); `encoder_pictures` does it all for a batch
and writes both files. They take a `MACRLModel`, a `MACRLBackbone` (a `MACRLModel` subclass) or a model that holds one
as `.macrl` (`MACRLForPreTraining`, `MACRLForImageClassification`).

Token order is timm's: CLS, then `config.num_register_tokens` registers (0 where the config has none), then the
patches in row order; the maps and features are the patches only.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .modeling_macrl import MACRLModel

__all__ = [
    "ATTENTION_MAPS_FILE",
    "FEATURE_PCA_FILE",
    "EncoderMaps",
    "FeaturePCA",
    "Tile",
    "draw_grid",
    "encoder_maps",
    "encoder_of",
    "encoder_pictures",
    "feature_pca",
    "grid_figure_size",
    "plot_attention_maps",
    "plot_feature_pca",
    "to_display",
]

ATTENTION_MAPS_FILE = "attention_maps.png"
FEATURE_PCA_FILE = "feature_pca.png"

# the size of one picture square and of the margins for the row titles and the figure title (inches, at DPI)
TILE_INCHES, ROW_TITLE_INCHES, TITLE_INCHES, DPI = 1.6, 1.2, 0.8, 100


def encoder_of(model: nn.Module) -> MACRLModel:
    """The `MACRLModel` that holds the blocks: `model` itself (a `MACRLModel` or `MACRLBackbone`), or its `.macrl`
    (`MACRLForPreTraining`, `MACRLForImageClassification`)."""
    if isinstance(model, MACRLModel):
        return model
    inner = getattr(model, "macrl", None)
    if isinstance(inner, MACRLModel):
        return inner
    raise TypeError(f"expected a MACRL model (MACRLModel, MACRLBackbone or one holding .macrl), got {type(model)}")


@dataclass
class EncoderMaps:
    """What `encoder_maps` returns for a batch of `N` images on a grid of `h x w` patches.

    Attributes:
        attention: `[N, heads, h, w]`, the CLS token's softmax attention over the patches in the chosen block (each
            head's row sums to 1 over every token, CLS and registers included, so a map sums to at most 1).
        patch_tokens: `[N, h, w, D]`, the patch tokens of the last block after the final LayerNorm (the
            `last_hidden_state` that features are pooled from), float32.
        block: the 1-based index of the block the attention comes from.
    """

    attention: torch.Tensor
    patch_tokens: torch.Tensor
    block: int


@contextmanager
def _eval_mode(model: nn.Module):
    """`model` in eval mode for the block (no dropout or drop path), then in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def encoder_maps(model: nn.Module, pixel_values: torch.Tensor, block: int = -1) -> EncoderMaps:
    """The CLS attention maps of `block` (default: the last) and the patch tokens of `pixel_values` `[N, C, H, W]`
    (normalised, H and W multiples of the patch size), from one forward pass in eval mode on the model's device."""
    encoder = encoder_of(model)
    config = encoder.config
    parameter = encoder.patch_embed.proj.weight
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    grid = (pixel_values.shape[2] // config.patch_size, pixel_values.shape[3] // config.patch_size)
    with _eval_mode(encoder):
        # MACRLModel's own forward, also for a MACRLBackbone (a MACRLModel whose forward returns feature maps)
        output = MACRLModel.forward(encoder, pixel_values, interpolate_pos_encoding=True, output_attentions=True)
    tokens = output.last_hidden_state  # [N, prefix + L, D]
    skip = config.num_prefix_tokens  # CLS and registers, in timm's order
    block_index = range(len(output.attentions))[block]
    attention = output.attentions[block_index][:, :, 0, skip:]  # [N, heads, L]: the CLS row, patch columns
    attention = attention.float().reshape(*attention.shape[:2], *grid)  # [N, heads, h, w]
    patch_tokens = tokens[:, skip:].float().reshape(tokens.shape[0], *grid, -1)  # [N, h, w, D]
    return EncoderMaps(attention.cpu(), patch_tokens.cpu(), block_index + 1)


@dataclass
class FeaturePCA:
    """What `feature_pca` returns for `N` images on a grid of `h x w` patches.

    Attributes:
        first_component: `[N, h, w]`, each patch's score on the first principal component of its image's patch
            tokens (centred, so the image's mean patch scores 0), signed so that the patches on the image border score
            lower on average than the inner ones (a background usually touches the border).
        foreground: `[N, h, w]` bool, the patches kept: `first_component > threshold` (all of them without one).
        rgb: `[N, h, w, 3]` in [0, 1], the first three principal components of the foreground patches (a second PCA
            over them alone), each scaled to [0, 1] over all the images; background patches are 0 (black).
        threshold: the threshold on the first component, or None when every patch was kept.
    """

    first_component: torch.Tensor
    foreground: torch.Tensor
    rgb: torch.Tensor
    threshold: float | None


def _principal_scores(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`[M, D]` -> `[M, count]`: the scores on the first `count` principal components (zero columns past the rank),
    each signed so that its largest loading is positive (scikit-learn's `svd_flip`), so equal inputs get equal
    colours."""
    centred = rows.double() - rows.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # rows of vh: the components, by variance
    components = vh[:count]  # [k, D]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))  # [k, 1]
    scores = (centred @ (components * signs).T).float()  # [M, k]
    return torch.cat([scores, scores.new_zeros(rows.shape[0], count - scores.shape[1])], dim=1)


def _border(height: int, width: int) -> torch.Tensor:
    """`[h, w]` bool, True on the outer ring of patches."""
    inner = torch.zeros(height, width, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    return ~inner


def feature_pca(patch_tokens: torch.Tensor, threshold: float | None = 0.0) -> FeaturePCA:
    """DINOv2's picture from `[N, h, w, D]` patch tokens: each image's first principal component over its own
    patches, thresholded at `threshold` for the foreground (DINOv2's paper removes the patches "with a negative score
    of the first PCA component"; per image, as dinov2 issue #45 reads it, so that the differences between the images
    do not take the first component; `None` keeps every patch), then the first three components of the foreground
    patches of all the images together, as RGB (one colour scale for every image)."""
    count, height, width, dim = patch_tokens.shape
    border = _border(height, width)
    first = torch.stack([_principal_scores(tokens.reshape(-1, dim), 1)[:, 0] for tokens in patch_tokens.float()])
    first = first.reshape(count, height, width)
    if not border.all():  # a component's sign is arbitrary: point each image's at its inner patches
        flip = first[:, border].mean(dim=1) > first[:, ~border].mean(dim=1)  # [N]
        first = torch.where(flip[:, None, None], -first, first)
    foreground = first > threshold if threshold is not None else torch.ones_like(first, dtype=torch.bool)
    rows = patch_tokens.reshape(-1, dim).float()  # [N*h*w, D]
    kept = foreground.reshape(-1)
    if kept.sum() < 2:  # no foreground to speak of: the colours of every patch instead
        kept = torch.ones_like(kept)
    scores = _principal_scores(rows[kept], 3)  # [M, 3]
    low, high = scores.min(dim=0).values, scores.max(dim=0).values
    rgb = torch.zeros(rows.shape[0], 3)
    rgb[kept] = (scores - low) / (high - low).clamp_min(1e-12)
    rgb[~foreground.reshape(-1)] = 0.0
    return FeaturePCA(first, foreground, rgb.reshape(count, height, width, 3), threshold)


# ---------------------------------------------------------------------------------------------------------------------
# drawing


def to_display(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised `[N, C, H, W]` pixels -> `[N, H, W, 3]` RGB floats in [0, 1] (a grayscale channel repeated)."""
    pixels = pixel_values.detach().float().cpu()
    mean_t, std_t = torch.tensor(list(mean)).view(1, -1, 1, 1), torch.tensor(list(std)).view(1, -1, 1, 1)
    pixels = (pixels * std_t + mean_t).clamp(0, 1)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return pixels.permute(0, 2, 3, 1).numpy()


@dataclass
class Tile:
    """One square of a picture grid.

    Attributes:
        image: `[H, W, 3]` RGB in [0, 1], or None.
        overlay: a `[h, w]` map (or `[h, w, 3]` RGB) stretched over the square, one block of pixels per entry
            (nearest neighbour, as DINO upsamples its maps), or None.
        alpha: the overlay's opacity over an image.
        cmap, vmin, vmax: the overlay's colour map and range (None: the map's own minimum and maximum).
    """

    image: np.ndarray | None = None
    overlay: np.ndarray | None = None
    alpha: float = 0.6
    cmap: str = "inferno"
    vmin: float | None = None
    vmax: float | None = None


def grid_figure_size(rows: int, columns: int) -> tuple[int, int]:
    """The size in pixels, `(width, height)`, of a `draw_grid` picture of `rows` x `columns` squares."""
    return (
        round((ROW_TITLE_INCHES + columns * TILE_INCHES) * DPI),
        round((TITLE_INCHES + rows * TILE_INCHES) * DPI),
    )


def draw_grid(
    tiles: Sequence[Sequence[Tile]],
    output_path: str | Path,
    title: str,
    row_titles: Sequence[str] = (),
    column_titles: Sequence[str] = (),
) -> Path:
    """A PNG of `tiles` (rows of squares) with a title, a title to the left of each row and above each column; its
    size is `grid_figure_size(rows, columns)`."""
    # a Figure of its own, not pyplot's: written with Agg, and a caller's pyplot backend (a notebook's) is left alone
    from matplotlib.figure import Figure

    num_rows, num_columns = len(tiles), max(len(row) for row in tiles)
    width, height = grid_figure_size(num_rows, num_columns)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    left, top = ROW_TITLE_INCHES * DPI / width, 1 - TITLE_INCHES * DPI / height
    tile_width, tile_height = TILE_INCHES * DPI / width, TILE_INCHES * DPI / height
    pad = 0.04  # of a square, between squares
    for row, row_tiles in enumerate(tiles):
        for column, tile in enumerate(row_tiles):
            axis = figure.add_axes((
                left + (column + pad / 2) * tile_width,
                top - (row + 1 - pad / 2) * tile_height,
                tile_width * (1 - pad),
                tile_height * (1 - pad) * 0.86,  # room for a column title above the first row
            ))
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            extent = None
            if tile.image is not None:
                axis.imshow(tile.image, interpolation="nearest")
                extent = (-0.5, tile.image.shape[1] - 0.5, tile.image.shape[0] - 0.5, -0.5)
            if tile.overlay is not None:
                axis.imshow(
                    tile.overlay, cmap=tile.cmap, vmin=tile.vmin, vmax=tile.vmax, interpolation="nearest",
                    alpha=tile.alpha if tile.image is not None else 1.0, extent=extent,
                )
            if row == 0 and column < len(column_titles):
                name = column_titles[column]
                axis.set_title(name if len(name) <= 24 else name[:21] + "...", fontsize=9)
            if column == 0 and row < len(row_titles):
                axis.set_ylabel(textwrap.fill(row_titles[row], 18), fontsize=8, rotation=0, ha="right", va="center")
    figure.suptitle(textwrap.fill(title, int(width / DPI * 11)), fontsize=10, y=1 - 0.12 * TITLE_INCHES * DPI / height)
    output_path = Path(output_path)
    figure.savefig(output_path, dpi=DPI)
    return output_path


def plot_attention_maps(
    images: np.ndarray,
    maps: EncoderMaps,
    output_path: str | Path,
    labels: Sequence[str] = (),
    num_blocks: int | None = None,
) -> Path:
    """One row per image: the image, then each head's CLS attention map laid over it (each map on its own colour
    scale, from its least to its most attended patch). `images` are `to_display`'s, `labels` name the rows."""
    attention = maps.attention.numpy()  # [N, heads, h, w]
    heads = attention.shape[1]
    tiles = [
        [Tile(image=image)] + [Tile(image=image, overlay=attention[index, head]) for head in range(heads)]
        for index, image in enumerate(images)
    ]
    of_blocks = f" of {num_blocks}" if num_blocks else ""
    title = (
        f"Where the CLS token looks: its attention over the {attention.shape[2]}x{attention.shape[3]} patches in "
        f"block {maps.block}{of_blocks}, per head (bright: attended; each map on its own scale)"
    )
    columns = ["image"] + [f"head {head + 1}" for head in range(heads)]
    return draw_grid(tiles, output_path, title, row_titles=list(labels), column_titles=columns)


def plot_feature_pca(
    images: np.ndarray, pca: FeaturePCA, output_path: str | Path, labels: Sequence[str] = ()
) -> Path:
    """Three rows, one column per image: the image; the first principal component of its patch tokens (red above 0,
    blue below); the first three components of the foreground patches of all the images as RGB."""
    first = pca.first_component.numpy()
    limit = float(np.abs(first).max()) or 1.0
    kept = "every patch" if pca.threshold is None else f"the patches above {pca.threshold:g} on its 1st component"
    rows = [
        [Tile(image=image) for image in images],
        [Tile(overlay=component, cmap="coolwarm", vmin=-limit, vmax=limit) for component in first],
        [Tile(overlay=colours) for colours in pca.rgb.numpy()],
    ]
    row_titles = [
        "image",
        "1st principal component of the image (red > 0 > blue)",
        "components 1-3 of all the foreground as R, G, B",
    ]
    title = (
        f"What the patch tokens hold: a PCA of each image's {first.shape[1]}x{first.shape[2]} patch tokens finds the "
        f"foreground ({kept}), a PCA of the foreground patches of all {len(images)} images colours them (background "
        "black)"
    )
    return draw_grid(rows, output_path, title, row_titles=row_titles, column_titles=list(labels))


def encoder_pictures(
    model: nn.Module,
    pixel_values: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    folder: str | Path,
    labels: Sequence[str] = (),
    threshold: float | None = 0.0,
) -> list[Path]:
    """Draw `ATTENTION_MAPS_FILE` and `FEATURE_PCA_FILE` of `pixel_values` (normalised with `mean` / `std`) into
    `folder` (created); returns their paths. `labels` name the images (e.g. their file names)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    maps = encoder_maps(model, pixel_values)
    images = to_display(pixel_values, mean, std)
    num_blocks = encoder_of(model).config.num_hidden_layers
    return [
        plot_attention_maps(images, maps, folder / ATTENTION_MAPS_FILE, labels, num_blocks),
        plot_feature_pca(images, feature_pca(maps.patch_tokens, threshold), folder / FEATURE_PCA_FILE, labels),
    ]
