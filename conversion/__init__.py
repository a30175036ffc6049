"""Converters between MACRL folders and other formats, installed as `macrl.conversion` and run as
`macrl-convert KIND ...` (`python -m macrl.conversion.convert_X ...` works too, and from a checkout
`python conversion/convert_X.py ...`, through `as_file.py`):

| KIND | module | what |
|---|---|---|
| `checkpoint` | `convert_macrl_checkpoint_to_hf` | a `macrl-pretrain` checkpoint -> an encoder (or full model) folder |
| `vit-mae` | `convert_vit_mae_to_macrl` | transformers `ViTMAEForPreTraining` -> `MACRLForPreTraining` |
| `mae` | `convert_mae_original_to_macrl` | a facebookresearch/mae checkpoint -> `MACRLForPreTraining` |
| `mocov3` | `convert_mocov3_to_macrl` | a facebookresearch/moco-v3 ViT checkpoint -> `MACRLForPreTraining` |
| `timm` | `convert_macrl_to_timm` | a MACRL encoder -> a timm `VisionTransformer` folder (`--reverse`: back) |
| `onnx` | `convert_macrl_to_onnx` | a MACRL encoder -> `model.onnx` and `model.pt2` (`torch.export`), dynamic batch, height, width |
"""

CONVERTERS = {
    "checkpoint": "convert_macrl_checkpoint_to_hf",
    "vit-mae": "convert_vit_mae_to_macrl",
    "mae": "convert_mae_original_to_macrl",
    "mocov3": "convert_mocov3_to_macrl",
    "timm": "convert_macrl_to_timm",
    "onnx": "convert_macrl_to_onnx",
}

__all__ = ["CONVERTERS"]
