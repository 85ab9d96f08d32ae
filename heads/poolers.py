"""Multi-scale RoIAlign: pools every RoI from the FPN level its size maps to.

Shape shorthand:
    N  images
    C  feature channels
    R  RoIs of the whole batch (R_i of image i)
    S  output size (7 for the box head, 14 for the mask head)

Level mapping is eq. 1 of the FPN paper, ``k = floor(k0 + log2(sqrt(area) / 224) + eps)`` clamped to the
pooled levels, and each level's scale is inferred as ``2 ** round(log2(feature_h / image_h))`` from the
largest unpadded image size, as torchvision's ``MultiScaleRoIAlign``.

Pooling is :func:`resdet.layers.roi_align.multi_level_roi_align`: on CPU all levels through one sparse
product (the registered ``resdet::roi_align`` ops), forward and backward, several times faster than
torchvision's per-level ``roi_align`` loop, which runs elsewhere (CUDA, scripting, tracing, ONNX export,
``resdet.fast_paths(False)``); :mod:`resdet.layers.policy` decides per call, ``impl`` forces either.
"""
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_area

from resdet.layers.roi_align import multi_level_roi_align

__all__ = ["MultiScaleRoIAlign", "map_levels"]


def map_levels(
    boxes: Tensor, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4, eps: float = 1e-6
) -> Tensor:
    """FPN level index (0 = level ``k_min``) of each box, Tensor[R] int64.

    Args:
        boxes: Tensor[R, 4] in input-image pixels.
        k_min: finest pooled level (2 for p2).
        k_max: coarsest pooled level (5 for p5).
        canonical_scale: box size that maps to ``canonical_level``.
        canonical_level: level of a ``canonical_scale`` box.
        eps: guards exact powers of two against rounding down.
    """
    s = torch.sqrt(box_area(boxes))
    levels = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    return (torch.clamp(levels, min=k_min, max=k_max).to(torch.int64) - k_min).to(torch.int64)


def _infer_scale(feature: Tensor, image_size: tuple[int, int]) -> float:
    """Power-of-two scale from input pixels to this feature map, from the heights."""
    approx = float(feature.shape[-2]) / float(image_size[0])
    return 2.0 ** round(math.log2(approx))


_IMPLS = ("auto", "sparse", "torchvision")


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over several feature levels with FPN level assignment.

    Args:
        featmap_names: the feature keys pooled from, finest first (pooled in the order of the input dict).
        output_size: S, or ``(Sh, Sw)``.
        sampling_ratio: RoIAlign sampling points per bin side (``<= 0``: adaptive).
        aligned: RoIAlign half-pixel alignment (torchvision's detectors: False).
        canonical_scale: see :func:`map_levels`.
        canonical_level: see :func:`map_levels`.
        impl: ``"auto"`` (the sparse op for CPU features where :mod:`resdet.layers.policy` allows,
            torchvision's otherwise), ``"sparse"`` (the sparse op on any device, float32/bfloat16/float16, where
            the policy allows) or ``"torchvision"`` (always torchvision's ``roi_align``, one call per level).
    """

    def __init__(
        self,
        featmap_names: Sequence[str] = ("p2", "p3", "p4", "p5"),
        output_size: int | tuple[int, int] = 7,
        sampling_ratio: int = 2,
        *,
        aligned: bool = False,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"MultiScaleRoIAlign impl must be one of {_IMPLS}, got {impl!r}")
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = list(featmap_names)
        self.output_size = tuple(output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.impl = impl

    def forward(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
        *,
        tables: dict[tuple[str, ...], Tensor] | None = None,
    ) -> Tensor:
        """Pool every box.

        Args:
            features: level features Tensor[N, C, Hl, Wl] by name (other keys are ignored).
            boxes: per image Tensor[R_i, 4] in input pixels.
            image_sizes: per image ``(h, w)`` before padding (used to infer the level scales).
            tables: a dict the caller keeps for one forward pass of several poolers over the same
                ``features`` (the box and mask branches): the sparse op's pixel table of these levels
                is built once, stored there under the level names, and reused.

        Returns:
            Tensor[R, C, Sh, Sw], RoIs in image order (channels-last strides from the sparse op).
        """
        levels_x = [v for k, v in features.items() if k in self.featmap_names]
        if not levels_x:
            raise ValueError(f"MultiScaleRoIAlign found none of {self.featmap_names} in features {list(features)}")
        if not image_sizes:
            raise ValueError("MultiScaleRoIAlign needs at least one image size")
        max_size = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
        scales = [_infer_scale(x, max_size) for x in levels_x]

        # [R, 5] rois: (image index, x1, y1, x2, y2).
        all_boxes = torch.cat(boxes, dim=0)
        image_ids = torch.cat([torch.full_like(b[:, :1], i, dtype=all_boxes.dtype) for i, b in enumerate(boxes)])
        rois = torch.cat([image_ids, all_boxes], dim=1)

        if len(levels_x) == 1:
            level = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
        else:
            level = map_levels(all_boxes, int(-math.log2(scales[0])), int(-math.log2(scales[-1])),
                               self.canonical_scale, self.canonical_level)
        key = tuple(k for k in features if k in self.featmap_names)
        return multi_level_roi_align(levels_x, rois, level, scales, self.output_size, self.sampling_ratio,
                                     self.aligned, impl=self.impl, tables=tables, key=key)
