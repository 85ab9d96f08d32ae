"""resdet: ResNet-backbone detection and segmentation for PyTorch."""
__version__ = "0.1.0"

# backbones registers the resdet_* models with timm; models registers the model.arch / model.options check
# with resdet.config (which imports no model code), so every config loaded through resdet is checked.
from . import backbones, models  # noqa: E402,F401
from .layers.policy import fast_paths  # noqa: E402

__all__ = ["backbones", "fast_paths", "__version__"]
