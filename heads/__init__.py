"""Detection and segmentation heads: RPN, RoI box head, mask head, semantic head."""
from resdet.layers.box_ops import BalancedPositiveNegativeSampler, BoxCoder, Matcher, box_regression_loss
from resdet.layers.mask_paste import paste_masks

from .anchors import AnchorGenerator
from .mask_head import MaskHead, MaskPredictor, mask_loss
from .poolers import MultiScaleRoIAlign
from .roi_heads import ConvFCHead, FastRCNNPredictor, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead

__all__ = [
    "AnchorGenerator",
    "BalancedPositiveNegativeSampler",
    "BoxCoder",
    "Matcher",
    "box_regression_loss",
    "MaskHead",
    "MaskPredictor",
    "mask_loss",
    "paste_masks",
    "MultiScaleRoIAlign",
    "ConvFCHead",
    "FastRCNNPredictor",
    "RoIHeads",
    "TwoMLPHead",
    "RegionProposalNetwork",
    "RPNHead",
    # Semantic segmentation (helper F) adds SemanticFPNHead below.
]

from .semantic_head import SemanticFPNHead  # noqa: E402  (helper F)

__all__ += ["SemanticFPNHead"]

from .deeplab_head import ASPP, DeepLabV3Head, DeepLabV3PlusHead, FCNHead  # noqa: E402

__all__ += ["ASPP", "DeepLabV3Head", "DeepLabV3PlusHead", "FCNHead"]
