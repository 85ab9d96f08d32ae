"""Per-pixel classification loss of the semantic heads and models.

Shapes: N images, K classes, H×W pixels.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

__all__ = ["sem_seg_cross_entropy"]


def sem_seg_cross_entropy(logits: Tensor, targets: Tensor, *, ignore_index: int, top_k: float = 1.0) -> Tensor:
    """Mean cross-entropy of logits Tensor[N, K, H, W] against targets Tensor[N, H, W] over the pixels that
    are not ``ignore_index``.

    Args:
        top_k: Fraction of those pixels, the hardest ones (highest loss), the mean is taken over: 1.0 is
            plain cross-entropy; below it, hard pixel mining (detectron2's DeepLab ``hard_pixel_mining``
            takes 0.2).

    Returns:
        A scalar; a zero still connected to the logits when every pixel is ignored.
    """
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k must be in (0, 1], got {top_k}")
    valid = targets != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    if top_k >= 1.0:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    pixels = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")[valid]  # [P]
    k = max(1, math.ceil(top_k * pixels.numel()))
    return pixels.topk(k, sorted=False).values.mean()
