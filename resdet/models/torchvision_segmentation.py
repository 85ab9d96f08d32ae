"""torchvision's DeepLabV3 and FCN (``torchvision.models.segmentation``) as resdet models.

resdet's :class:`~resdet.models.deeplab.DeepLab` keeps torchvision's parameter names (``backbone.*``,
``classifier.*``, ``aux_classifier.*``), so a state dict loads as it is; what has to be read from the model
(or assumed for a bare state dict: torchvision's builders) is the layout: backbone depth, output stride,
ASPP rates, whether there is an auxiliary head.

torchvision's model takes normalized tensors; resdet's takes images in [0, 1] and normalizes them with
ImageNet's mean and standard deviation, as the transforms of torchvision's published weights do. The
resize of those transforms (shorter side 520) is ``min_size=520``; by default the input is kept as it is,
as torchvision's model does, and batches are padded no further than their largest image
(``size_divisible=1``), so the outputs equal torchvision's.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .deeplab import DeepLab, deeplabv3, fcn
from .torchvision_compat import _body_name

__all__ = ["is_torchvision_segmentation", "segmentation_from_torchvision"]


def is_torchvision_segmentation(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a state dict is torchvision's DeepLabV3 / FCN (``backbone.conv1`` and ``classifier.*`` keys)."""
    return "backbone.conv1.weight" in state_dict and any(k.startswith("classifier.") for k in state_dict)


def _settings(model: nn.Module | None, sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    """(arch, builder options) of a torchvision segmentation model or state dict."""
    deeplab = "classifier.0.convs.0.0.weight" in sd
    opts: dict = {"backbone": _body_name(sd, prefix="backbone."), "aux_loss": "aux_classifier.0.weight" in sd,
                  "num_classes": int(sd["classifier.4.weight"].shape[0])}
    output_stride, rates, dropout = 8, (12, 24, 36), 0.5  # torchvision's builders
    if model is not None:
        body = model.backbone
        output_stride = 32
        for stage in ("layer4", "layer3"):
            first = getattr(body, stage)[0]
            strided = first.conv2 if hasattr(first, "conv3") else first.conv1
            if strided.stride == (1, 1):
                output_stride //= 2
        if deeplab:
            aspp = model.classifier[0]
            rates = tuple(int(aspp.convs[i][0].dilation[0]) for i in (1, 2, 3))
            dropout = float(aspp.project[3].p)
    opts["output_stride"] = output_stride
    if deeplab:
        opts.update(aspp_rates=rates, aspp_dropout=dropout,
                    aspp_channels=int(sd["classifier.0.project.0.weight"].shape[0]))
    return ("deeplabv3" if deeplab else "fcn"), opts


def segmentation_from_torchvision(model_or_state_dict: nn.Module | Mapping[str, Tensor], **options) -> DeepLab:
    """A resdet DeepLabV3 / FCN equal to torchvision's ``deeplabv3_resnet50/101`` or ``fcn_resnet50/101``.

    Args:
        model_or_state_dict: torchvision's ``DeepLabV3`` / ``FCN`` on a ResNet (with or without the
            auxiliary head), or its state dict (torchvision's builders' layout assumed: output stride 8,
            ASPP rates 12/24/36).
        **options: :func:`resdet.models.deeplabv3` / ``fcn`` options overriding those read from the model
            (e.g. ``output_stride=16`` to fine-tune, ``min_size=520`` for the weights' resize).

    Returns:
        The resdet model in eval mode.
    """
    model = model_or_state_dict if isinstance(model_or_state_dict, nn.Module) else None
    sd = dict(model.state_dict() if model is not None else model_or_state_dict)
    if not is_torchvision_segmentation(sd):
        raise ValueError("not a torchvision DeepLabV3 / FCN state dict: expected backbone.conv1.* and "
                         "classifier.* keys")
    arch, settings = _settings(model, sd)
    settings.update(min_size=None, max_size=None, size_divisible=1)
    settings.update(options)
    ours = (deeplabv3 if arch == "deeplabv3" else fcn)(**settings)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"torchvision {arch} checkpoint does not fit the resdet model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return ours.eval()
