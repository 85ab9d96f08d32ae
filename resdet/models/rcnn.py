"""Two-stage detector composition: transform → backbone (ResNet + FPN) → RPN → RoI heads → postprocess.

Shape shorthand:
    N   images in the batch;  C image channels;  H, W original size of one image
    G   ground-truth objects of one image
    D   detections of one image
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from resdet.layers.tracing import is_tracing

from .transform import DetectionTransform
from .validation import validate_inputs

__all__ = ["GeneralizedRCNN"]


class GeneralizedRCNN(nn.Module):
    """Faster / Mask R-CNN: built parts composed, with the input transform inside the model.

    Train mode: ``model(images, targets)`` returns a dict of losses (``loss_objectness``,
    ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg`` and for Mask R-CNN ``loss_mask``).
    Eval mode: ``model(images)`` returns per image a dict with ``boxes`` (Tensor[D, 4] xyxy in original
    pixels), ``labels`` (int64 Tensor[D]), ``scores`` (Tensor[D]) and, with a mask head, ``masks``
    (Tensor[D, 1, H, W] probabilities).

    ``torch.jit.trace`` / ``torch.onnx.export`` of the eval-mode model on one image record a graph valid
    for any image size (``resdet.export`` wraps it; every size stays symbolic, see
    :mod:`resdet.layers.tracing`).

    Args:
        backbone: ``BackboneWithFPN`` returning features named p2..p6, with ``out_channels``.
        rpn: ``RegionProposalNetwork``.
        roi_heads: ``RoIHeads`` (with or without the mask branch).
        transform: ``DetectionTransform``.
        num_classes: classes including background; read from ``roi_heads.box_predictor.cls_score``
            when omitted. Used to validate labels.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module,
        transform: DetectionTransform,
        *,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        if num_classes is None:
            num_classes = int(roi_heads.box_predictor.cls_score.out_features)
        self.num_classes = num_classes

    @property
    def has_masks(self) -> bool:
        """Whether the RoI heads carry a mask branch."""
        return getattr(self.roi_heads, "mask_predictor", None) is not None

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """See the class docstring; ``images`` are Tensor[C, H, W] float in [0, 1], any sizes."""
        validate_inputs(
            images,
            targets,
            num_classes=self.num_classes,
            in_chans=self.transform.in_chans,
            training=self.training,
            require_masks=self.has_masks,
        )
        if not self.training:
            targets = None
        original_sizes = [(im.shape[-2], im.shape[-1]) for im in images]  # ints (traced: 0-dim tensors)
        batch, image_sizes, targets = self.transform(images, targets)
        features = self.backbone(batch)
        if self.transform.channels_last and (batch.device.type != "cpu" or is_tracing()):
            # torchvision's RoIAlign (CUDA; any device in a trace) reads NCHW memory: convert each level
            # once, not once per call. In eager CPU runs resdet's RoIAlign gathers channels-last pixels,
            # and the RPN convolutions stay channels-last.
            features = {k: v.contiguous() for k, v in features.items()}
        proposals, rpn_losses = self.rpn(batch, image_sizes, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_sizes, original_sizes)

    @torch.no_grad()
    def optimize_for_inference(self, *, channels_last: bool | None = None) -> GeneralizedRCNN:
        """Makes CPU/GPU inference faster without changing results beyond float rounding.

        * Folds eval-mode / frozen BatchNorm into the preceding convolutions (``resdet.layers.fuse``).
        * With ``channels_last``: the backbone and the convolutional RoI heads (mask head, ``4conv1fc``
          box head) run in channels-last memory format, and 1×1 stride-1 backbone convolutions run as
          one matrix product over pixels (``PointwiseConv2d``); on CUDA, FPN outputs are handed to
          torchvision's RoIAlign in NCHW once per level (on CPU they stay channels-last).
          ``None`` (default): channels-last unless the model is on CPU where resdet's Winograd
          convolutions can run (:func:`resdet.layers.policy.winograd_possible`), which read NCHW; there
          the conversions cost more than channels-last saves (README, Measured).

        Puts the model in eval mode and returns it. Calling it again is harmless (the second call
        changes nothing, or only the memory format). The result is for inference only: BatchNorm
        entries leave the state dict and training would not update BatchNorm statistics. Call it
        after loading weights.
        """
        from resdet.layers.fuse import fuse_bn, pointwise_convs_as_matmul
        from resdet.layers.policy import winograd_possible

        self.eval()
        fuse_bn(self)
        if channels_last is None:
            devices = {p.device for p in self.parameters()}
            channels_last = not (len(devices) == 1 and winograd_possible(devices.pop()))
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.backbone.to(memory_format=memory_format)
            pointwise_convs_as_matmul(self.backbone)
        for name in ("box_head", "mask_head", "mask_predictor"):
            head = getattr(self.roi_heads, name, None)
            if head is None or not any(isinstance(m, nn.Conv2d) for m in head.modules()):
                continue
            if channels_last:
                head.to(memory_format=memory_format)
            if name == "mask_predictor":  # its input is the mask head's output, already in that format
                continue
            handle = getattr(head, "_channels_last_hook", None)
            if handle is not None:  # a previous call's hook: replaced, never doubled
                handle.remove()
                del head._channels_last_hook
            if channels_last:
                head._channels_last_hook = head.register_forward_pre_hook(_to_channels_last)
        self.transform.channels_last = channels_last
        return self


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, *args[1:])
