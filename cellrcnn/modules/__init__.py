"""LightningModules: one shared training/validation step (``base``), one module per model family."""

from .base import InstanceSegModule, load_module
from .maskrcnn_module import MaskRCNNModule
from .unet_module import UNetModule

__all__ = ["InstanceSegModule", "MaskRCNNModule", "UNetModule", "load_module"]
