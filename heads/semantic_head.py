"""Panoptic-FPN semantic segmentation branch (Kirillov et al., "Panoptic Feature Pyramid Networks").

Shape shorthand:
    N       images in the batch
    C       FPN channels (``in_shapes[name].channels``)
    D       head channels (``conv_dims``)
    K       semantic classes (``num_classes``)
    Hi, Wi  size of FPN level i (stride s_i)
    H4, W4  size at ``common_stride`` (1/4 of the padded input for p2)
    Hp, Wp  padded input size = (H4, W4) * common_stride

Each level p2..p5 runs ``max(1, log2(s_i / common_stride))`` stages of 3×3 conv → norm → ReLU, each
stage but p2's followed by a 2× bilinear upsample, so every level arrives at 1/4 scale with D channels.
The levels are summed, a 1×1 conv predicts K logits, and the logits are upsampled ×common_stride to
the padded input size, where the cross-entropy (``ignore_index`` pixels excluded) is taken.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from resdet.layers.blocks import conv_norm_act, init_convs_msra
from resdet.layers.sem_seg_loss import sem_seg_cross_entropy
from resdet.layers.shape_spec import ShapeSpec

__all__ = ["SemanticFPNHead"]


class SemanticFPNHead(nn.Module):
    """Semantic branch of Panoptic FPN: per-level conv towers to 1/4 scale, summed, 1×1 classifier.

    Args:
        in_shapes: Channels and stride of each input level, e.g. ``{"p2": ShapeSpec(256, 4), ...}``;
            every stride must be ``common_stride`` times a power of two. Extra levels of the FPN
            output (such as p6) are ignored if they are not listed here.
        num_classes: Number of semantic classes K (including background where the dataset has one).
        conv_dims: Channels D of every tower conv.
        norm: "gn" (GroupNorm, 32 groups), "bn", "sync_bn", "frozen_bn", or None (convs get a bias).
        common_stride: Stride at which the towers meet; logits are upsampled by it to the input.
        loss_weight: Factor on the cross-entropy.
        ignore_index: Target value excluded from the loss.
        loss_top_k: Fraction of the hardest pixels the cross-entropy averages (1.0: all).
    """

    def __init__(
        self,
        in_shapes: dict[str, ShapeSpec],
        *,
        num_classes: int,
        conv_dims: int = 128,
        norm: str | None = "gn",
        common_stride: int = 4,
        loss_weight: float = 1.0,
        ignore_index: int = 255,
        loss_top_k: float = 1.0,
    ) -> None:
        super().__init__()
        if not in_shapes:
            raise ValueError("in_shapes is empty; expected FPN levels such as p2..p5")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}; expected >= 1")
        self.in_features = list(in_shapes)
        self.num_classes = num_classes
        self.common_stride = common_stride
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self.loss_top_k = loss_top_k

        self.scale_heads = nn.ModuleDict()
        for name, shape in in_shapes.items():
            ratio = shape.stride / common_stride
            if ratio < 1 or not math.log2(ratio).is_integer():
                raise ValueError(
                    f"level {name!r} has stride {shape.stride}; expected common_stride={common_stride} "
                    "times a power of two"
                )
            num_stages = max(1, int(math.log2(ratio)))
            stages: list[nn.Module] = []
            for k in range(num_stages):
                # conv → norm → ReLU (names 0, 1, 2), then the optional upsample as the block's last child.
                layers = list(conv_norm_act(shape.channels if k == 0 else conv_dims, conv_dims, norm=norm))
                if shape.stride != common_stride:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
                stages.append(nn.Sequential(*layers))
            self.scale_heads[name] = nn.Sequential(*stages)
        self.predictor = nn.Conv2d(conv_dims, num_classes, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MSRA fill (fan_out, ReLU) for tower convs, N(0, 0.001) for the classifier, zero biases."""
        init_convs_msra(self.scale_heads)
        for module in self.scale_heads.modules():
            if isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def layers(self, features: dict[str, Tensor]) -> Tensor:
        """Summed towers and classifier: logits Tensor[N, K, H4, W4] at ``common_stride``."""
        missing = [name for name in self.in_features if name not in features]
        if missing:
            raise KeyError(f"features lack levels {missing}; got {list(features)}")
        x: Tensor | None = None
        for name in self.in_features:
            y = self.scale_heads[name](features[name])  # [N, D, H4, W4]
            if x is None:
                x = y
            else:
                # Odd level sizes can leave a 1-pixel difference after ×2 upsampling; align to p2's grid.
                if y.shape[-2:] != x.shape[-2:]:
                    y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
                x = x + y
        assert x is not None
        return self.predictor(x)

    def forward(
        self, features: dict[str, Tensor], targets: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Predicts logits at the padded input size and, given targets, the loss.

        Args:
            features: FPN levels by name; those in ``in_shapes`` are used.
            targets: Tensor[N, Hp, Wp] int64 class indices at the padded input size, ``ignore_index``
                on pixels (and padding) that do not count.

        Returns:
            ``(logits Tensor[N, K, Hp, Wp], losses)``; losses is ``{"loss_sem_seg": scalar}`` when
            targets are given, else empty.
        """
        logits = self.layers(features)
        logits = F.interpolate(logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            if targets.shape[-2:] != logits.shape[-2:]:
                raise ValueError(
                    f"targets of size {tuple(targets.shape[-2:])} do not match the logits of size "
                    f"{tuple(logits.shape[-2:])}; pad targets to the padded input size"
                )
            losses["loss_sem_seg"] = self.losses(logits, targets)
        return logits, losses

    def losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy of logits Tensor[N, K, Hp, Wp] against targets Tensor[N, Hp, Wp]."""
        loss = sem_seg_cross_entropy(logits, targets, ignore_index=self.ignore_index, top_k=self.loss_top_k)
        return loss * self.loss_weight
