"""Scripts that convert MAE, MoCo v3, ViTMAE, timm and MACRL training checkpoints to MACRL folders (and back)."""
