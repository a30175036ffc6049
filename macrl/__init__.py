"""MACRL: Masked Contrastive Representation Learning (MAE + MoCo v3) for vision transformers.

Importing `macrl` registers the MACRL classes with transformers' Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForPreTraining`, `AutoModelForImageClassification`, `AutoBackbone` and `AutoImageProcessor` load MACRL
folders (and a `MACRLConfig` serves as the `backbone_config` of dense-prediction models such as UperNet), and
`save_pretrained` writes the code files (the image processor's and the backbone's too) and `auto_map` that
`trust_remote_code=True` needs where macrl is absent.
"""

# first of all: how a macrl command's OpenMP threads wait (OpenMP reads its settings when torch is loaded)
from .openmp_waiting import choose_waiting_in_commands

choose_waiting_in_commands()

from transformers import (  # noqa: E402
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_macrl import MACRLConfig  # noqa: E402
from .image_processing_macrl import MACRLImageProcessor  # noqa: E402
from .modeling_macrl import (  # noqa: E402
    MACRLForImageClassification,
    MACRLForPreTraining,
    MACRLModel,
    MACRLPreTrainedModel,
)
from .modeling_macrl_backbone import MACRLBackbone  # noqa: E402

__version__ = "0.1.0"

AutoConfig.register(MACRLConfig.model_type, MACRLConfig, exist_ok=True)
AutoModel.register(MACRLConfig, MACRLModel, exist_ok=True)
AutoModelForPreTraining.register(MACRLConfig, MACRLForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(MACRLConfig, MACRLForImageClassification, exist_ok=True)
AutoBackbone.register(MACRLConfig, MACRLBackbone, exist_ok=True)
AutoImageProcessor.register(MACRLConfig, image_processor_classes={"torchvision": MACRLImageProcessor}, exist_ok=True)

# Saved folders carry the code and `auto_map`, for loading with trust_remote_code=True where macrl is not installed.
MACRLConfig.register_for_auto_class()
MACRLModel.register_for_auto_class("AutoModel")
MACRLForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MACRLForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MACRLBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "MACRLConfig",
    "MACRLImageProcessor",
    "MACRLPreTrainedModel",
    "MACRLModel",
    "MACRLForPreTraining",
    "MACRLForImageClassification",
    "MACRLBackbone",
]
