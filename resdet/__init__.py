"""resdet: ResNet-backbone detection and segmentation for PyTorch."""
__version__ = "0.1.0"

from . import backbones  # noqa: E402,F401  (registers the resdet_* models with timm)
from .layers.policy import fast_paths  # noqa: E402

__all__ = ["backbones", "fast_paths", "__version__"]
