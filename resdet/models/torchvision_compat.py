"""Load torchvision's Faster / Mask R-CNN (ResNet-FPN) models and checkpoints into resdet detectors
(DeepLabV3 / FCN: :mod:`resdet.models.torchvision_segmentation`).

resdet keeps torchvision's parameter names (``backbone.body.*``, ``backbone.fpn.inner_blocks.i.0``,
``rpn.head.conv.i.0``, ``roi_heads.box_head.fc6``, ``roi_heads.mask_head.i.0`` ...), so converting a
checkpoint only brings torchvision's *older* key layouts (still used by the published COCO v1 files)
to the current ones. The v2 models (``fasterrcnn_resnet50_fpn_v2`` / ``maskrcnn_resnet50_fpn_v2``) put
BatchNorm after the FPN and head convolutions; the heads take it as is (``box_head_norm="bn"``,
``mask_head_norm="bn"``), and :func:`from_torchvision` gives resdet's FPN the same conv + BatchNorm
blocks (resdet's FPN builder offers only GroupNorm).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from .builders import faster_rcnn, mask_rcnn

__all__ = ["convert_torchvision_state_dict", "from_torchvision", "infer_torchvision_options"]

_OLD_LAYOUTS = (
    # FeaturePyramidNetwork before Conv2dNormActivation: inner_blocks.i.weight -> inner_blocks.i.0.weight
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    # RPNHead before conv_depth: conv.weight -> conv.0.0.weight
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
)
_MASK_FCN = re.compile(r"^(roi_heads\.mask_head)\.mask_fcn(\d+)\.(weight|bias)$")
_BODY_LAYOUTS = {
    # (bottleneck, blocks per stage, groups, layer1 bottleneck width) -> resdet backbone name
    (False, (2, 2, 2, 2), 1, 64): "resnet18",
    (False, (3, 4, 6, 3), 1, 64): "resnet34",
    (True, (3, 4, 6, 3), 1, 64): "resnet50",
    (True, (3, 4, 23, 3), 1, 64): "resnet101",
    (True, (3, 8, 36, 3), 1, 64): "resnet152",
    (True, (3, 4, 6, 3), 32, 128): "resnext50_32x4d",
    (True, (3, 4, 6, 3), 1, 128): "wide_resnet50_2",
}


def convert_torchvision_state_dict(state_dict: Mapping[str, Tensor], *, fold_bn: bool = False) -> dict[str, Tensor]:
    """Renames a torchvision detection state dict's keys to resdet's.

    Args:
        state_dict: ``model.state_dict()`` of torchvision's FasterRCNN / MaskRCNN on a ResNet-FPN
            backbone, in any torchvision key layout (the published COCO v1 files use the old one).
        fold_bn: fold the BatchNorm that follows each FPN convolution (``inner_blocks.i.1`` /
            ``layer_blocks.i.1``, torchvision v2) into the convolution, giving the keys of resdet's
            norm-free FPN. Valid for inference only (the folded statistics no longer adapt).

    Returns:
        A new dict; tensors are shared with ``state_dict`` except folded ones.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for pattern, repl in _OLD_LAYOUTS:
            key = pattern.sub(repl, key)
        m = _MASK_FCN.match(key)
        if m:  # MaskRCNNHeads before version 2: mask_fcn{k} -> {k-1}.0
            key = f"{m.group(1)}.{int(m.group(2)) - 1}.0.{m.group(3)}"
        out[key] = value
    if fold_bn:
        out = _fold_state_dict_bn(out)
    return out


def _fold_state_dict_bn(sd: dict[str, Tensor], eps: float = 1e-5) -> dict[str, Tensor]:
    pattern = re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.1\.running_var$")
    for key in [k for k in sd if pattern.match(k)]:
        prefix = pattern.match(key).group(1)
        conv_w = sd[f"{prefix}.0.weight"].double()
        var = sd[f"{prefix}.1.running_var"].double()
        scale = sd[f"{prefix}.1.weight"].double() * (var + eps).rsqrt()
        shift = sd[f"{prefix}.1.bias"].double() - sd[f"{prefix}.1.running_mean"].double() * scale
        bias = sd.get(f"{prefix}.0.bias")
        if bias is not None:
            shift = shift + bias.double() * scale
        dtype = sd[f"{prefix}.0.weight"].dtype
        # [O] -> [O, 1, 1, 1] scales every output filter.
        sd[f"{prefix}.0.weight"] = (conv_w * scale.view(-1, *([1] * (conv_w.dim() - 1)))).to(dtype)
        sd[f"{prefix}.0.bias"] = shift.to(dtype)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            sd.pop(f"{prefix}.1.{name}", None)
    return sd


def _add_fpn_batchnorm(fpn: nn.Module) -> None:
    """Turns every FPN block ``Sequential(conv)`` into ``Sequential(conv without bias, BatchNorm2d)``."""
    for blocks in (fpn.inner_blocks, fpn.layer_blocks):
        for block in blocks:
            conv = block[0]
            block[0] = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, bias=False
            )
            block.append(nn.BatchNorm2d(conv.out_channels))


def _body_name(sd: Mapping[str, Tensor], prefix: str = "backbone.body.") -> str:
    """resdet's name of the ResNet whose keys are under ``prefix`` (``backbone.`` in torchvision's segmentation)."""
    blocks = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{stage}\.(\d+)\.")
        blocks.append(len({int(m.group(1)) for k in sd if (m := pattern.match(k))}))
    bottleneck = f"{prefix}layer1.0.conv3.weight" in sd
    conv2 = sd[f"{prefix}layer1.0.conv2.weight"]  # [width, width / groups, 3, 3]
    width, groups = conv2.shape[0], conv2.shape[0] // conv2.shape[1]
    key = (bottleneck, tuple(blocks), groups, width)
    name = _BODY_LAYOUTS.get(key)
    if name is None:
        raise ValueError(f"unsupported torchvision backbone layout (bottleneck, blocks, groups, width) = {key}")
    return name


def _structure_options(sd: Mapping[str, Tensor]) -> dict:
    """Architecture options readable from (converted) state-dict keys and shapes."""
    opts: dict = {"num_classes": int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0])}
    opts["rpn_conv_depth"] = len({k.split(".")[3] for k in sd if k.startswith("rpn.head.conv.")})
    opts["fpn_out_channels"] = int(sd["rpn.head.cls_logits.weight"].shape[1])
    if "roi_heads.box_head.fc6.weight" in sd:
        opts["box_head"] = "2fc"
        opts["box_representation_size"] = int(sd["roi_heads.box_head.fc6.weight"].shape[0])
    else:
        opts["box_head"] = "4conv1fc"
        opts["box_head_norm"] = "bn" if "roi_heads.box_head.0.1.running_var" in sd else None
        fc = [k for k in sd if k.startswith("roi_heads.box_head.") and sd[k].dim() == 2]
        opts["box_representation_size"] = int(sd[fc[0]].shape[0])
    if "roi_heads.mask_predictor.mask_fcn_logits.weight" in sd:
        opts["mask_predictor_channels"] = int(sd["roi_heads.mask_predictor.conv5_mask.weight"].shape[1])
        layers = sorted({int(k.split(".")[2]) for k in sd if re.match(r"^roi_heads\.mask_head\.\d+\.0\.weight$", k)})
        opts["mask_layers"] = tuple(int(sd[f"roi_heads.mask_head.{i}.0.weight"].shape[0]) for i in layers)
        opts["mask_head_norm"] = "bn" if "roi_heads.mask_head.0.1.running_var" in sd else None
    return opts


def infer_torchvision_options(model: nn.Module) -> dict:
    """resdet builder options reproducing a torchvision detector's settings (transform, RPN, RoI heads)."""
    t, rpn, roi = model.transform, model.rpn, model.roi_heads
    anchors = rpn.anchor_generator
    ratios = {tuple(a) for a in anchors.aspect_ratios}
    if len(ratios) != 1:
        raise ValueError(f"resdet uses one aspect-ratio set for all levels, torchvision model has {ratios}")
    opts = dict(
        min_size=tuple(t.min_size),
        max_size=t.max_size,
        image_mean=tuple(t.image_mean),
        image_std=tuple(t.image_std),
        size_divisible=t.size_divisible,
        rpn_anchor_sizes=tuple(tuple(s) for s in anchors.sizes),
        rpn_aspect_ratios=ratios.pop(),
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"],
        rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"],
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.proposal_matcher.high_threshold,
        rpn_bg_iou_thresh=rpn.proposal_matcher.low_threshold,
        rpn_batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.fg_bg_sampler.positive_fraction,
        rpn_score_thresh=rpn.score_thresh,
        box_roi_output_size=roi.box_roi_pool.output_size[0],
        box_sampling_ratio=roi.box_roi_pool.sampling_ratio,
        box_score_thresh=roi.score_thresh,
        box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_img,
        box_fg_iou_thresh=roi.proposal_matcher.high_threshold,
        box_bg_iou_thresh=roi.proposal_matcher.low_threshold,
        box_batch_size_per_image=roi.fg_bg_sampler.batch_size_per_image,
        box_positive_fraction=roi.fg_bg_sampler.positive_fraction,
        bbox_reg_weights=tuple(roi.box_coder.weights),
    )
    if getattr(roi, "mask_roi_pool", None) is not None:
        opts["mask_roi_output_size"] = roi.mask_roi_pool.output_size[0]
        opts["mask_sampling_ratio"] = roi.mask_roi_pool.sampling_ratio
    body = model.backbone.body
    frozen = 0 if body.conv1.weight.requires_grad else 1
    for stage in range(1, 5):
        layer = getattr(body, f"layer{stage}", None)
        if frozen == stage and layer is not None and not any(p.requires_grad for p in layer.parameters()):
            frozen = stage + 1
    opts["frozen_stages"] = frozen
    return opts


def _bn_eps(model: nn.Module | None, sd: Mapping[str, Tensor], v2: bool) -> float:
    if model is not None:
        for m in model.backbone.body.modules():
            if hasattr(m, "running_var") and hasattr(m, "eps"):
                return float(m.eps)
    if v2 or any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in sd):
        return 1e-5  # saved from nn.BatchNorm2d
    return 0.0  # frozen BatchNorm: the published COCO v1 weights run with eps=0 (torchvision overwrite_eps)


def from_torchvision(
    model_or_state_dict: nn.Module | Mapping[str, Tensor], *, bn_eps: float | None = None, **options
) -> nn.Module:
    """A resdet model that behaves like the given torchvision detector or segmentation model in inference.

    Args:
        model_or_state_dict: a torchvision ``FasterRCNN`` / ``MaskRCNN`` on a ResNet-FPN backbone
            (``fasterrcnn_resnet50_fpn``, ``maskrcnn_resnet50_fpn``, their ``_v2`` forms, or any depth
            built with ``resnet_fpn_backbone``), or its state dict. Mask R-CNN is detected from the keys.
            torchvision's ``DeepLabV3`` / ``FCN`` (``deeplabv3_resnet50/101``, ``fcn_resnet50/101``) or
            their state dicts give a resdet :class:`~resdet.models.deeplab.DeepLab`
            (:func:`resdet.models.torchvision_segmentation.segmentation_from_torchvision`).
        bn_eps: epsilon of the backbone's frozen BatchNorm. Default: read from the model; for a state
            dict 1e-5 when it has ``num_batches_tracked`` entries or is v2, else 0.0 (the value
            torchvision sets for the published COCO v1 weights).
        **options: :func:`resdet.models.faster_rcnn` / ``mask_rcnn`` options overriding the settings
            read from the model (for a state dict, torchvision's defaults apply).

    Returns:
        The resdet model in eval mode, with frozen BatchNorm in the backbone.
    """
    model = model_or_state_dict if isinstance(model_or_state_dict, nn.Module) else None
    raw = model.state_dict() if model is not None else dict(model_or_state_dict)
    from .torchvision_segmentation import is_torchvision_segmentation, segmentation_from_torchvision

    if is_torchvision_segmentation(raw):
        if bn_eps is not None:
            raise TypeError("bn_eps is an option of the detectors; DeepLabV3 / FCN keep torchvision's BatchNorm")
        return segmentation_from_torchvision(model if model is not None else raw, **options)
    sd = convert_torchvision_state_dict(raw)
    fpn_bn = any(k.startswith("backbone.fpn.") and k.endswith("running_var") for k in sd)
    v2 = fpn_bn or "roi_heads.box_head.fc6.weight" not in sd
    settings = _structure_options(sd)
    settings["backbone"] = _body_name(sd)
    settings["norm"] = "frozen_bn"
    settings["frozen_stages"] = 2
    if model is not None:
        settings.update(infer_torchvision_options(model))
    settings.update(options)
    builder = mask_rcnn if "mask_predictor_channels" in settings else faster_rcnn
    ours = builder(**settings)
    if fpn_bn:
        _add_fpn_batchnorm(ours.backbone.fpn)
    eps = bn_eps if bn_eps is not None else _bn_eps(model, sd, v2)
    for m in ours.backbone.body.modules():
        if "FrozenBatchNorm" in type(m).__name__:
            m.eps = eps
    body_nbt = [k for k in sd if k.startswith("backbone.body.") and k.endswith("num_batches_tracked")]
    sd = {k: v for k, v in sd.items() if k not in body_nbt}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"torchvision checkpoint does not fit the resdet model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return ours.eval()
