"""resdet: ResNet-backbone detection and segmentation for PyTorch."""
__version__ = "0.1.0"

from . import backbones  # noqa: E402,F401  (registers the resdet_* models with timm)

__all__ = ["backbones", "__version__"]
