"""Trace-friendly inference of one image, for ONNX and TorchScript export.

The eager models turn sizes into Python numbers (resize scale, padding, anchor grids, clipping, mask
pasting) and branch on data (empty levels, box chunks); a trace would freeze those values and the
exported graph would only work at the example size. The modules here run the same inference on one
image with every size kept as a tensor, reusing the model's own sub-modules (backbone, heads, box
coder, thresholds), so ``torch.onnx.export`` / ``torch.jit.trace`` give a graph valid for any H×W.
They also run eagerly and give the model's results (``tests/test_export.py`` checks both).

Shape shorthand:
    H, W    original image size;  h, w  resized;  Hp, Wp  padded to ``size_divisible``
    L       pyramid levels;  Hl, Wl  size of level l;  A  anchors per location
    P       proposals;  D  detections;  K  classes;  M  mask size (28);  Mp = M + 2
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, remove_small_boxes, roi_align

__all__ = ["TraceableDetector", "TraceableSemanticFPN", "resize_and_pad", "paste_masks_traceable"]


def _size(image: Tensor) -> tuple[Tensor, Tensor]:
    """(H, W) of an image [..., H, W] as int64 scalars that stay symbolic in a trace."""
    shape = torch._shape_as_tensor(image)
    return shape[-2], shape[-1]


def resize_and_pad(
    image: Tensor,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    min_size: int | None,
    max_size: int | None,
    size_divisible: int,
    normalize_first: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize, resize (shortest side ``min_size``, longest at most ``max_size``), pad bottom-right.

    The scale and the output size are computed in float64, as Python does in the eager transforms, so
    the resized size is the same integer (``floor(H * scale)``).

    Args:
        image: Tensor[3, H, W] in [0, 1].
        normalize_first: normalize before resizing (detectors) or after (semantic FPN), as the eager
            transform of the model does.

    Returns:
        ``(batch Tensor[1, 3, Hp, Wp], h, w)`` with h, w int64 scalars (the unpadded resized size).
    """
    m = torch.tensor(mean, dtype=image.dtype)[:, None, None]  # [C] -> [C, 1, 1]
    s = torch.tensor(std, dtype=image.dtype)[:, None, None]
    x = (image - m) / s if normalize_first else image
    h, w = _size(image)
    if min_size is not None:
        hf, wf = h.to(torch.float64), w.to(torch.float64)
        scale = torch.tensor(float(min_size), dtype=torch.float64) / torch.minimum(hf, wf)
        if max_size is not None:
            scale = torch.minimum(scale, torch.tensor(float(max_size), dtype=torch.float64) / torch.maximum(hf, wf))
        h = torch.floor(hf * scale).to(torch.int64)
        w = torch.floor(wf * scale).to(torch.int64)
        # [C, H, W] -> [1, C, H, W] for interpolate; a size-based resize uses the ratio in/out, as the
        # eager scale_factor resize with recompute_scale_factor=True does.
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if not normalize_first:
        x = (x - m) / s
    d = int(size_divisible)
    pad_h = (h + d - 1) // d * d - h
    pad_w = (w + d - 1) // d * d - w
    return F.pad(x, (0, pad_w, 0, pad_h))[None], h, w  # [1, C, Hp, Wp]


def _clip(boxes: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """Clamp boxes [..., 4] to [0, w] x [0, h] (sizes may be tensors)."""
    zero = torch.zeros((), dtype=boxes.dtype)
    x = torch.minimum(torch.maximum(boxes[..., 0::2], zero), w.to(boxes.dtype))
    y = torch.minimum(torch.maximum(boxes[..., 1::2], zero), h.to(boxes.dtype))
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def _flatten(x: Tensor, channels: int) -> Tensor:
    """[1, A * channels, Hl, Wl] -> [Hl * Wl * A, channels], ordered (y, x, anchor)."""
    return x[0].reshape(-1, channels, x.shape[-2], x.shape[-1]).permute(2, 3, 0, 1).reshape(-1, channels)


class TraceableDetector(nn.Module):
    """A resdet ``GeneralizedRCNN`` as a function of one image, for export.

    ``forward(image Tensor[3, H, W] in [0, 1])`` returns ``(boxes Tensor[D, 4] xyxy in original pixels,
    labels int64 Tensor[D], scores Tensor[D])`` and, with a mask branch, ``masks Tensor[D, 1, H, W]``
    probabilities: the eval-mode outputs of ``model([image])[0]``.

    Args:
        model: the detector (its sub-modules are shared, not copied).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        t = model.transform
        self.has_masks = bool(getattr(model, "has_masks", False))
        self.output_names = ["boxes", "labels", "scores"] + (["masks"] if self.has_masks else [])
        shapes = model.backbone.output_shape()
        pool = model.roi_heads.box_roi_pool
        self.pool_strides = [int(shapes[name].stride) for name in pool.featmap_names]
        self._transform_args = dict(mean=t.image_mean, std=t.image_std, min_size=t.min_size[-1],
                                    max_size=t.max_size, size_divisible=t.size_divisible)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        height, width = _size(image)
        batch, h, w = resize_and_pad(image, **self._transform_args)
        if model.transform.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = model.backbone(batch)
        if model.transform.channels_last:
            features = {k: v.contiguous() for k, v in features.items()}
        proposals = self.proposals(batch, features, h, w)
        boxes, labels, scores = self.detections(features, proposals, h, w)
        # Back to original pixels: ratios as float32 divisions of the sizes, as resize_boxes does.
        ratio_h = height.to(torch.float32) / h.to(torch.float32)
        ratio_w = width.to(torch.float32) / w.to(torch.float32)
        out_boxes = boxes * torch.stack((ratio_w, ratio_h, ratio_w, ratio_h))
        if not self.has_masks:
            return out_boxes, labels, scores
        heads = model.roi_heads
        mask_logits = heads.mask_predictor(heads.mask_head(self.pool(heads.mask_roi_pool, features, boxes)))
        index = torch.arange(mask_logits.shape[0])
        probs = mask_logits[index, labels][:, None].sigmoid()  # [D, K, M, M] -> [D, 1, M, M]
        return out_boxes, labels, scores, paste_masks_traceable(probs, out_boxes, height, width)

    def proposals(self, batch: Tensor, features: dict[str, Tensor], h: Tensor, w: Tensor) -> Tensor:
        """RPN proposals Tensor[P, 4] of the image (top-k per level, decode, clip, filter, NMS, top-k)."""
        rpn = self.model.rpn
        levels = list(features.values())
        logits, deltas = rpn.head(levels)
        hp, wp = _size(batch)
        top_boxes, top_scores, top_levels = [], [], []
        for level, (feature, lg, dl, base) in enumerate(zip(levels, logits, deltas, rpn.anchor_generator.cell_anchors)):
            gh, gw = _size(feature)
            # Anchors of the level, (y, x, anchor) order; strides from the padded size as the eager generator.
            shift_x = torch.arange(gw, dtype=torch.int64) * (wp // gw)
            shift_y = torch.arange(gh, dtype=torch.int64) * (hp // gh)
            sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)  # [Hl * Wl, 1, 4]
            anchors = (shifts + base.reshape(1, -1, 4)).reshape(-1, 4).to(feature.dtype)  # [Hl * Wl * A, 4]
            objectness = _flatten(lg, 1)[:, 0]  # [Hl * Wl * A]
            k = torch.minimum(torch._shape_as_tensor(objectness)[0], torch.tensor(rpn.pre_nms_top_n_test))
            idx = objectness.topk(k).indices
            top_scores.append(torch.sigmoid(objectness[idx]))
            top_boxes.append(rpn.box_coder.decode(_flatten(dl, 4)[idx], anchors[idx]))
            top_levels.append(torch.full_like(idx, level))
        boxes = _clip(torch.cat(top_boxes), h, w)
        scores, lvl = torch.cat(top_scores), torch.cat(top_levels)
        keep = remove_small_boxes(boxes, rpn.min_size)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = torch.where(scores >= rpn.score_thresh)[0]
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes, scores, lvl, rpn.nms_thresh)[: rpn.post_nms_top_n_test]
        return boxes[keep]

    def pool(self, pooler: nn.Module, features: dict[str, Tensor], boxes: Tensor) -> Tensor:
        """Multi-scale RoIAlign of boxes Tensor[R, 4] -> Tensor[R, C, S, S], each box from its FPN level.

        Level scales are 1 / stride, what the eager pooler infers from the sizes.
        """
        from resdet.heads.poolers import map_levels

        feats = [v for k, v in features.items() if k in pooler.featmap_names]
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)  # [R, 5]: (image 0, x1, y1, x2, y2)

        def align(x: Tensor, r: Tensor, stride: int) -> Tensor:
            return roi_align(x, r, pooler.output_size, spatial_scale=1.0 / stride,
                             sampling_ratio=pooler.sampling_ratio, aligned=pooler.aligned)

        if len(feats) == 1:
            return align(feats[0], rois, self.pool_strides[0])
        k_min = self.pool_strides[0].bit_length() - 1
        k_max = self.pool_strides[-1].bit_length() - 1
        levels = map_levels(boxes, k_min, k_max, pooler.canonical_scale, pooler.canonical_level)
        pooled, order = [], []
        for level, (x, stride) in enumerate(zip(feats, self.pool_strides)):
            idx = torch.where(levels == level)[0]
            pooled.append(align(x, rois[idx], stride))
            order.append(idx)
        # Back to box order: position i of the concatenation holds box order[i].
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]

    def detections(
        self, features: dict[str, Tensor], proposals: Tensor, h: Tensor, w: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Box head on the proposals, then the eval post-processing of ``RoIHeads`` (resized frame)."""
        heads = self.model.roi_heads
        pooled = self.pool(heads.box_roi_pool, features, proposals)  # [P, C, S, S]
        class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
        num_classes = class_logits.shape[-1]
        scores = F.softmax(class_logits, -1)
        deltas = box_regression.reshape(-1, num_classes, 4)  # [P, K * 4] -> [P, K, 4]
        prop_idx, cls_idx = torch.where(scores[:, 1:] > heads.score_thresh)
        labels = cls_idx + 1
        boxes = _clip(heads.box_coder.decode(deltas[prop_idx, labels], proposals[prop_idx]), h, w)
        scores = scores[prop_idx, labels]
        keep = remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, heads.nms_thresh)[: heads.detections_per_img]
        return boxes[keep], labels[keep], scores[keep]


def _axis_weights(start: Tensor, length: Tensor, out_size: Tensor, in_size: int) -> Tensor:
    """Bilinear (align_corners=False) resize of ``in_size`` samples to ``length[b]`` samples placed at
    ``start[b]`` on an axis of ``out_size`` pixels, as a matrix Tensor[B, out_size, in_size]; rows of
    pixels outside ``[start, start + length)`` are zero. Source positions and weights are computed as
    ``F.interpolate``'s CPU kernel does (float32, source index clamped at 0)."""
    j = torch.arange(out_size)[None, :] - start[:, None]  # [B, out] position inside the resized box
    ratio = torch.tensor(float(in_size), dtype=torch.float32) / length.to(torch.float32)
    src = torch.clamp(ratio[:, None] * (j.to(torch.float32) + 0.5) - 0.5, min=0.0)
    i0 = torch.clamp(torch.floor(src), max=float(in_size - 1))
    l1 = torch.clamp(src - i0, min=0.0, max=1.0)
    i1 = torch.clamp(i0 + 1, max=float(in_size - 1))
    inside = ((j >= 0) & (j < length[:, None])).to(torch.float32)
    grid = torch.arange(in_size, dtype=torch.float32)  # [in]
    w0 = (i0[..., None] == grid).to(torch.float32) * ((1.0 - l1) * inside)[..., None]
    w1 = (i1[..., None] == grid).to(torch.float32) * (l1 * inside)[..., None]
    return w0 + w1  # [B, out, in]


def paste_masks_traceable(masks: Tensor, boxes: Tensor, height: Tensor, width: Tensor, padding: int = 1) -> Tensor:
    """Paste RoI masks into the image as ``paste_masks_in_image`` does, as two batched matrix products.

    Each mask is zero-padded by ``padding``, its box enlarged to match and truncated to integer pixels,
    the mask bilinearly resized to the box and written into a zero image; the resize is separable, so
    it is ``Wy @ mask @ Wx^T`` with per-box weight matrices (no per-box loop, no data-dependent shape).

    Args:
        masks: Tensor[D, 1, M, M] probabilities.
        boxes: Tensor[D, 4] in image pixels.
        height: H (int64 scalar); width: W.

    Returns:
        Tensor[D, 1, H, W].
    """
    m = int(masks.shape[-1])  # M is fixed by the mask head: a constant, also in a trace
    mp = m + 2 * padding
    padded = F.pad(masks[:, 0], (padding,) * 4)  # [D, Mp, Mp]
    scale = float(mp) / m
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    x0, x1 = (x_c - w_half).to(torch.int64), (x_c + w_half).to(torch.int64)
    y0, y1 = (y_c - h_half).to(torch.int64), (y_c + h_half).to(torch.int64)
    bw = torch.clamp(x1 - x0 + 1, min=1)
    bh = torch.clamp(y1 - y0 + 1, min=1)
    wx = _axis_weights(x0, bw, width, mp)  # [D, W, Mp]
    wy = _axis_weights(y0, bh, height, mp)  # [D, H, Mp]
    # Along x first, then y: [D, Mp, Mp] @ [D, Mp, W] -> [D, Mp, W]; [D, H, Mp] @ that -> [D, H, W].
    return torch.matmul(wy, torch.matmul(padded, wx.transpose(1, 2)))[:, None]


class TraceableSemanticFPN(nn.Module):
    """A resdet ``SemanticFPN`` as a function of one image, for export.

    ``forward(image Tensor[3, H, W] in [0, 1])`` returns ``(sem_seg int64 Tensor[H, W],)``, the eval
    output of ``model([image])[0]["sem_seg"]``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.output_names = ["sem_seg"]
        t = model.transform
        if t.size_divisible % 32:
            raise ValueError(f"export needs size_divisible to be a multiple of 32, got {t.size_divisible}")
        self._transform_args = dict(mean=t.image_mean, std=t.image_std,
                                    min_size=None if t.min_size is None else t.min_size[-1],
                                    max_size=t.max_size, size_divisible=t.size_divisible, normalize_first=False)

    def forward(self, image: Tensor) -> tuple[Tensor]:
        height, width = _size(image)
        batch, h, w = resize_and_pad(image, **self._transform_args)
        logits, _ = self.model.sem_seg_head(self.model.backbone(batch))  # [1, K, Hp, Wp]
        x = logits[:, :, :h, :w]  # padding cropped off
        if self._transform_args["min_size"] is not None:
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        return (x[0].argmax(dim=0),)  # [K, H, W] -> [H, W]
