"""Primitives shared by the backbones and the heads (as detectron2's ``layers`` and torchvision's ``ops``).

Nothing here imports ``resdet.backbones``, ``resdet.heads`` or ``resdet.models``; they import from here.

* :mod:`.policy`: when the fast kernels run (device, dtype, sizes, tracing, ``torch.backends.nnpack``,
  the ``fast_paths`` switch and ``RESDET_FAST_PATHS``), their thresholds, their failures.
* :mod:`.winograd`: 3×3 convolutions by Winograd's algorithm on CPU (registered ops ``resdet::conv3x3*``).
* :mod:`.conv`: ``Conv2d`` (its 3×3 stride-1 convolutions through ``resdet::conv3x3``), ``PLAIN_CONVS``.
* :mod:`.norm`: ``FrozenBatchNorm2d``, ``get_norm``, a frozen BatchNorm folded into its convolution.
* :mod:`.fuse`: BatchNorm folding and 1×1 convolutions as matrix products for deployment.
* :mod:`.blocks`: conv-norm-activation blocks and init helpers of the heads.
* :mod:`.shape_spec`: ``ShapeSpec`` (channels and stride of a named feature map).
* :mod:`.roi_align`: RoIAlign on CPU as one sparse linear map (registered ops ``resdet::roi_align*``).
* :mod:`.box_ops`: box coder, matcher, sampler, box losses.
* :mod:`.mask_paste`: RoI masks pasted into full-size images.
* :mod:`.tracing`: whether ``torch.jit.trace`` / ONNX export is recording (inference keeps sizes symbolic).
"""
from .box_ops import BOX_LOSSES, BalancedPositiveNegativeSampler, BoxCoder, Matcher, box_regression_loss
from .conv import PLAIN_CONVS, Conv2d
from .mask_paste import paste_masks
from .norm import NORMS, FrozenBatchNorm2d, get_norm, is_norm
from .policy import fast_paths
from .shape_spec import ShapeSpec

__all__ = [
    "BOX_LOSSES", "NORMS", "PLAIN_CONVS", "BalancedPositiveNegativeSampler", "BoxCoder", "Conv2d",
    "FrozenBatchNorm2d", "Matcher", "ShapeSpec", "box_regression_loss", "fast_paths", "get_norm", "is_norm",
    "paste_masks",
]
