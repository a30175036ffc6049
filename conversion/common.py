"""Helpers shared by the conversion scripts: key renaming, q/k/v fusion, loading, output checks, saving, pushing.

Every script follows the same order: build the `MACRLConfig`, rename the source keys, split or merge q/k/v, load the
result strictly, compare the outputs with the source model (allclose), `save_pretrained` (model + image processor),
and optionally push the folder to the Hub.

Installed as `macrl.conversion`; `macrl-convert KIND` (macrl/convert.py) fronts the converters, each a module with
`build_parser` and `main`, under the command contract of `macrl.command_line`: exit 0 done, 1 outputs that disagree
(`OutputMismatchError`) or a failed push, 2 a source or option that cannot be used (`KeyMismatchError`, a missing
or unreadable file, a config that does not validate). torch, transformers and timm are imported inside the functions,
so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..command_line import OneLineErrors, UsageError, run_command
from ..errors import InputError, MACRLError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from macrl import MACRLConfig, MACRLImageProcessor

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAMES = ("pytorch_model.bin", "model.pth", "checkpoint.pth", "checkpoint.pth.tar")
MAX_LISTED_KEYS = 40
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4


logger = logging.getLogger(__name__)


class KeyMismatchError(InputError):
    """The source's keys do not match the layout a script converts; the message lists every difference.

    Attributes:
        missing: keys the target layout needs that the source lacks.
        unexpected: source keys that the target layout has no place for.
        mismatched: `(key, source shape, expected shape)` of keys present in both with different shapes.
    """

    def __init__(
        self,
        source: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple, tuple]] = (),
        hint: str | None = None,
    ):
        self.source = source
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        parts = []  # one line: a command shows the first line of an error
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {_list_keys(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {_list_keys(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{key} {tuple(got)} (expected {tuple(want)})" for key, got, want in self.mismatched]
            parts.append(f"mismatched shapes ({len(shapes)}): {_list_keys(shapes)}")
        if hint:
            parts.append(f"hint: {hint}")
        super().__init__(f"{source} does not match the expected layout: " + "; ".join(parts))


class OutputMismatchError(MACRLError, ValueError):
    """The converted model's outputs differ from the source model's beyond the tolerance."""


def _list_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f", ... and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else "")


def log(message: str) -> None:
    """What a conversion is doing, one line (`macrl-convert` shows the `macrl` logger's info lines)."""
    logger.info(message)


# ---------------------------------------------------------------------------------------------------------------------
# key handling


def rename_keys(
    state_dict: Mapping[str, Any],
    rules: Sequence[tuple[str, str | None]],
    *,
    source: str = "checkpoint",
    hint: str | None = None,
) -> dict[str, Any]:
    """Rename every key with the first `(regex, replacement)` rule that matches it in full.

    The replacement may use the groups of the regex (`\\1`); a `None` replacement drops the key. Keys that no rule
    matches raise a `KeyMismatchError` listing them as unexpected, as do two keys renamed to the same name.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed: dict[str, Any] = {}
    unexpected = []
    for key, value in state_dict.items():
        for pattern, replacement in compiled:
            match = pattern.fullmatch(key)
            if match:
                if replacement is not None:
                    new_key = match.expand(replacement)
                    if new_key in renamed:
                        raise KeyMismatchError(source, unexpected=[key], hint=f"{key} renames to {new_key} twice")
                    renamed[new_key] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise KeyMismatchError(source, unexpected=unexpected, hint=hint)
    return renamed


def check_keys(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    source: str = "checkpoint",
    hint: str | None = None,
) -> None:
    """Raise a `KeyMismatchError` unless `state_dict` has exactly the keys (and shapes) of `expected`."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        (key, tuple(value.shape), tuple(expected[key].shape))
        for key, value in state_dict.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        raise KeyMismatchError(source, missing, unexpected, mismatched, hint=hint)


def select_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries whose key starts with `prefix`, with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def strip_common_prefix(state_dict: Mapping[str, Any], prefixes: Sequence[str] = ("module.", "_orig_mod.")) -> dict:
    """Remove DDP's `module.` (and torch.compile's `_orig_mod.`) when every key carries it."""
    state_dict = dict(state_dict)
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in prefixes:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = select_prefix(state_dict, prefix)
                changed = True
    return state_dict


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Separate q, k, v projections -> timm's fused `attn.qkv` (rows: all of q, then k, then v)."""
    import torch

    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k and v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return torch.cat([q, k, v], dim=0)


def merge_qkv_keys(
    state_dict: Mapping[str, Any],
    names: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj"),
    fused: str = "qkv",
    *,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Replace every `P.{q}.{weight,bias}`, `P.{k}...`, `P.{v}...` triple by `P.{fused}.{weight,bias}`.

    A q without its k or v (or the other way round) raises a `KeyMismatchError` naming the missing partners.
    """
    q_name, k_name, v_name = names
    pattern = re.compile(rf"(.*)\.(?:{re.escape(q_name)}|{re.escape(k_name)}|{re.escape(v_name)})\.(weight|bias)")
    out: dict[str, Any] = {}
    groups: dict[tuple[str, str], None] = {}
    for key, value in state_dict.items():
        match = pattern.fullmatch(key)
        if match:
            groups[match.groups()] = None
        else:
            out[key] = value
    missing = []
    for prefix, kind in groups:
        parts = [f"{prefix}.{name}.{kind}" for name in names]
        absent = [part for part in parts if part not in state_dict]
        if absent:
            missing += absent
            continue
        out[f"{prefix}.{fused}.{kind}"] = merge_qkv(*(state_dict[part] for part in parts))
    if missing:
        raise KeyMismatchError(source, missing=missing, hint="q, k and v projections must come together")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# loading


def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint file: safetensors with `safetensors`, anything else with `torch.load(weights_only=True)`.

    `argparse.Namespace` (the `args` that MAE's and MoCo v3's training scripts store) is the one extra class allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    import torch

    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def find_weights(folder: str | Path) -> Path:
    """The weights file of a folder: model.safetensors (or its index) first, then a torch file."""
    folder = Path(folder)
    for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, *TORCH_WEIGHTS_NAMES):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder} holds no weights: expected one of {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
        + ", ".join(TORCH_WEIGHTS_NAMES)
    )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file or of a folder (safetensors preferred, sharded safetensors supported)."""
    path = Path(path)
    if path.is_dir():
        path = find_weights(path)
    if path.name.endswith(".index.json"):
        from safetensors.torch import load_file

        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state_dict: dict = {}
        for shard in shards:
            state_dict.update(load_file(path.parent / shard, device="cpu"))
        return state_dict
    checkpoint = load_checkpoint(path)
    return unwrap_state_dict(checkpoint, source=str(path))


def unwrap_state_dict(checkpoint: Any, keys: Sequence[str] = ("model", "state_dict"), source: str = "checkpoint"):
    """The tensor dict inside a training checkpoint (`{"model": ...}` or `{"state_dict": ...}`), without `module.`."""
    import torch

    if isinstance(checkpoint, Mapping):
        for key in keys:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{source} holds no state dict (a mapping of tensors, possibly under {' or '.join(keys)})")
    return strip_common_prefix(checkpoint)


def checkpoint_args(checkpoint: Any) -> dict[str, Any]:
    """The training arguments a checkpoint stores (`args` as a Namespace or dict), else `{}`."""
    if not isinstance(checkpoint, Mapping):
        return {}
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


# ---------------------------------------------------------------------------------------------------------------------
# configs, inputs and output checks


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """`["mask_ratio=0.5", "reconstruction_loss=l2"]` -> `{"mask_ratio": 0.5, "reconstruction_loss": "l2"}`.

    Values are read as JSON (numbers, true/false, null) and kept as strings otherwise; unknown fields raise.
    """
    overrides: dict[str, Any] = {}
    from macrl import MACRLConfig

    known = MACRLConfig.macrl_fields()
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in known:
            raise ValueError(f"--set {key}: not a MACRLConfig field; known fields: {', '.join(known)}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def read_macrl_config(folder: str | Path, overrides: Mapping[str, Any] | None = None) -> MACRLConfig:
    """The `MACRLConfig` of a saved MACRL folder (its config.json, `model_type` "macrl"), `overrides` on top."""
    from macrl.presets import load_config

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: expected a MACRL folder (save_pretrained)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "macrl":
        raise ValueError(f"{config_file} has model_type {model_type!r}, expected 'macrl'")
    return load_config(str(folder), **dict(overrides or {}))


def build_config(fields: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> MACRLConfig:
    """`MACRLConfig(**fields)` with `overrides` on top (its validation names any bad field)."""
    from macrl import MACRLConfig

    return MACRLConfig(**{**fields, **(overrides or {})})


def random_pixels(config: MACRLConfig, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """Reproducible normalised-looking pixels `[B, C, H, W]` for output comparisons."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    size = config.image_size
    return torch.randn(batch_size, config.num_channels, size, size, generator=generator)


def random_noise(config: MACRLConfig, batch_size: int = 2, seed: int = 1) -> torch.Tensor:
    """Reproducible masking noise `[B, num_patches]` (the patches with the smallest noise stay visible)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, config.num_patches, generator=generator)


@contextmanager
def temporarily(obj: Any, **values: Any) -> Iterator[None]:
    """Set attributes (e.g. config fields) for the duration of a `with` block, then restore them."""
    saved = {name: getattr(obj, name) for name in values}
    try:
        for name, value in values.items():
            setattr(obj, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def compare_outputs(
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    name: str = "output",
) -> float:
    """Check `allclose(a, b, atol, rtol)` in float32; raise `OutputMismatchError` naming `name` otherwise.

    Returns the largest absolute difference (0.0 when both are None).
    """
    import torch

    if a is None or b is None:
        if a is None and b is None:
            return 0.0
        raise OutputMismatchError(f"{name}: one model returned None, the other a tensor")
    a = torch.as_tensor(a).detach().float().cpu()
    b = torch.as_tensor(b).detach().float().cpu()
    if a.shape != b.shape:
        raise OutputMismatchError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise OutputMismatchError(f"{name}: non-finite values")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        raise OutputMismatchError(f"{name}: max |a - b| = {diff:.3g} exceeds atol={atol:g} + rtol={rtol:g} * |b|")
    log(f"  {name}: allclose (max |diff| {diff:.2e})")
    return diff


def compare_state_dicts(a: Mapping[str, Any], b: Mapping[str, Any], name: str = "weights") -> None:
    """Raise `OutputMismatchError` unless `a` and `b` hold the same keys and bit-identical tensors."""
    import torch

    check_keys(a, b, source=name)
    different = [key for key in a if not torch.equal(a[key], b[key])]
    if different:
        raise OutputMismatchError(f"{name}: tensors differ for {_list_keys(different)}")


# ---------------------------------------------------------------------------------------------------------------------
# saving and pushing


def default_processor(config: MACRLConfig) -> MACRLImageProcessor:
    """The image processor of a model converted from elsewhere: `macrl.loading.load_image_processor`'s default."""
    from ..loading import load_image_processor

    return load_image_processor(None, config)


def load_processor(folder: str | Path | None, config: MACRLConfig) -> MACRLImageProcessor:
    """The MACRL image processor saved in `folder` if there is one, else the default one for `config`."""
    from macrl import MACRLImageProcessor

    if folder is not None and Path(folder, "preprocessor_config.json").is_file():
        return MACRLImageProcessor.from_pretrained(folder)
    return default_processor(config)


def save_pretrained(
    model: nn.Module, output_dir: str | Path, processor: MACRLImageProcessor | None = None, verify: bool = True
) -> Path:
    """`model.save_pretrained(output_dir)` plus its image processor (`MACRLImageProcessor.from_model_config` unless
    given); with `verify`, reload the folder and check that the weights come back bit-identical."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    (processor if processor is not None else default_processor(model.config)).save_pretrained(output_dir)
    if verify:
        reloaded = type(model).from_pretrained(output_dir)
        compare_state_dicts(reloaded.state_dict(), model.state_dict(), name=f"{output_dir} reloaded")
    log(f"saved {type(model).__name__} to {output_dir}")
    return output_dir


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload converted model",
) -> str:
    """Upload `folder` to `repo_id` with `macrl.hub`: a MACRL folder with `push_encoder_to_hub` (its checks), any
    other one (a timm export) with `push_folder`; pickles are never uploaded, a README on the Hub is kept.
    Returns the commit URL."""
    from ..hub import push_encoder_to_hub, push_folder

    folder = Path(folder)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    push = push_encoder_to_hub if model_type == "macrl" else push_folder
    url = push(folder, repo_id, private=private, token=token, commit_message=commit_message)
    log(f"pushed {folder} to {repo_id}: {url}")
    return url


# ---------------------------------------------------------------------------------------------------------------------
# command line


def add_common_arguments(parser: argparse.ArgumentParser, overrides: bool = True, hub: bool = True) -> None:
    """The options every script shares: tolerances, seed, `--set` (with `overrides`), `--push-to-hub` and
    `--private` (with `hub`: for a converter whose output is a model folder)."""
    group = parser.add_argument_group("checks, output and Hub")
    group.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="absolute tolerance of the output checks")
    group.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="relative tolerance of the output checks")
    group.add_argument(
        "--seed", type=int, default=0, help="seed of the freshly initialised parts and of the check inputs"
    )
    if overrides:
        group.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a MACRLConfig field of the result (repeatable; JSON values), e.g. "
            "--set reconstruction_loss=l2 --set contrastive_weight=0",
        )
    if hub:
        group.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output folder to this Hub repository")
        group.add_argument("--private", action="store_true", help="create the Hub repository as private")


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments every converter function takes from `add_common_arguments`' flags."""
    return dict(overrides=parse_overrides(args.overrides), atol=args.atol, rtol=args.rtol, seed=args.seed)


def push_if_asked(args: argparse.Namespace, commit_message: str) -> None:
    """`--push-to-hub REPO_ID` (and `--private`) of the converted `args.output_dir`."""
    if args.push_to_hub:
        push_to_hub(args.output_dir, args.push_to_hub, private=args.private, commit_message=commit_message)


class ConversionParser(OneLineErrors, argparse.ArgumentParser):
    """The converters' parser: one-line usage errors, defaults in `--help`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def run_cli(convert, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run `convert(args)`, and keep the command contract (module docstring): a file that is missing
    or unreadable and a value that does not validate (the `OSError` / `ValueError` of torch, safetensors, timm and
    `MACRLConfig`, whose messages name the file or field) are usage errors."""
    from transformers.utils import logging as transformers_logging

    def run(args: argparse.Namespace) -> None:
        transformers_logging.disable_progress_bar()
        try:
            convert(args)
        except MACRLError:
            raise
        except (OSError, ValueError) as error:
            raise UsageError(first_line(error)) from error

    return run_command(parser.prog, parser, run, argv)


def mark_position_embedding_type(model, overrides: Mapping[str, Any] | None = None) -> None:
    """Set `model.config.position_embedding_type` from the position tables the converted weights brought: `"sincos"`
    when they are MAE's fixed 2D sin-cos (the model then computes them for every image size), else `"learned"` (used
    as stored, resampled at other sizes). A `--set position_embedding_type=...` is kept as given."""
    if "position_embedding_type" in (overrides or {}):
        return
    model.config.position_embedding_type = "sincos" if model.stored_positions_are_sincos() else "learned"
    log(f"  position_embedding_type: {model.config.position_embedding_type}")


def describe_position_embedding(pos_embed: torch.Tensor, grid_size: int) -> str:
    """Name the layout of a `[1, 1 + grid**2, D]` position embedding (it is always copied as it is)."""
    import torch

    from macrl.modeling_macrl import sincos_position_embedding

    pos_embed = pos_embed.detach().float().cpu()
    dim = pos_embed.shape[-1]
    if dim % 4 or pos_embed.shape[1] != grid_size**2 + 1:
        return "not a 2D sin-cos table (kept as it is)"
    fixed = sincos_position_embedding(grid_size, dim)
    half = dim // 2
    swapped = torch.cat([fixed[..., half:], fixed[..., :half]], dim=-1)
    if torch.allclose(pos_embed, fixed, atol=1e-5):
        return "MAE's fixed 2D sin-cos, [w | h] halves (what MACRL initialises)"
    if torch.allclose(pos_embed, swapped, atol=1e-5):
        return "2D sin-cos with [h | w] halves, transposed against MAE's (kept as it is: the weights were trained so)"
    if not pos_embed.any():
        return "all zeros (an untrained initialisation?), kept as it is"
    return "not MAE's fixed 2D sin-cos (learned or another layout), kept as it is"
