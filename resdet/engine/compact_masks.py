"""Instance masks of large images without D full-size copies: COCO RLE straight from each mask's pasted box
window, and masks drawn from those RLEs one at a time.

``tools/infer.py`` runs a detector with ``model.transform.paste_masks = False`` (masks stay Tensor[D, 1, M, M]
over their boxes), pastes each mask into its box's window only (``resdet.layers.mask_paste.iter_pasted_masks``)
and keeps it as RLE: memory grows with the box sizes of one mask at a time instead of D × H × W floats.

Shape shorthand:
    D   detections of one image
    H, W      image size
    h, w      one mask's in-image box window
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from resdet.layers.mask_paste import iter_pasted_masks

__all__ = ["draw_rle_masks", "masks_to_rles", "window_to_rle"]


def window_to_rle(window: np.ndarray, top: int, left: int, height: int, width: int) -> dict[str, Any]:
    """COCO RLE (``{"size": [H, W], "counts": str}``) of an H×W binary mask that is zero outside the
    window ``window`` (bool/uint8 [h, w]) placed at (``top``, ``left``); equal to ``pycocotools.mask.encode``
    of the full mask, without making it (only the window's H × w column band is scanned)."""
    h, w = window.shape
    band = np.zeros((height, w), dtype=np.uint8, order="F")  # columns left .. left + w of the image
    band[top:top + h] = window
    flat = band.ravel(order="F")  # COCO RLE runs go down the columns
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs  # RLE counts start with a run of zeros
    runs = runs or [0]
    runs[0] += left * height  # the all-zero columns before the band
    tail = (width - left - w) * height  # and after it
    if tail:
        if len(runs) % 2:  # the last run is a run of zeros
            runs[-1] += tail
        else:
            runs.append(tail)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def masks_to_rles(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], *,
                  threshold: float = 0.5) -> list[dict[str, Any]]:
    """RLEs of compact masks: ``masks`` Tensor[D, 1, M, M] probabilities over ``boxes`` Tensor[D, 4] (the
    model's output with ``transform.paste_masks = False``) pasted as the model would paste them and
    thresholded at ``threshold``; one RLE per detection, in order (an empty one for a box outside the image)."""
    height, width = int(image_shape[0]), int(image_shape[1])
    empty = window_to_rle(np.zeros((0, 0), dtype=np.uint8), 0, 0, height, width)
    rles = [empty] * masks.shape[0]
    for i, top, left, window in iter_pasted_masks(masks, boxes, (height, width)):
        rles[i] = window_to_rle((window >= threshold).numpy(), top, left, height, width)
    return rles


def draw_rle_masks(image: Tensor, rles: Sequence[dict[str, Any]], colors: Sequence[tuple[int, int, int]], *,
                   alpha: float = 0.45, rows: int = 512) -> Tensor:
    """uint8 image Tensor[3, H, W] with RLE masks blended in, pixel for pixel what
    ``torchvision.utils.draw_segmentation_masks`` gives for the decoded masks (overlaps drawn black), with
    one decoded mask and a ``rows``-row strip of float pixels in memory at a time."""
    height, width = image.shape[-2:]
    canvas = image.clone()
    covered = torch.zeros((height, width), dtype=torch.uint8)  # 0, 1 or 2 (= overlapping) masks per pixel
    for rle, color in zip(rles, colors):
        x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(rle))
        if w == 0 or h == 0:
            continue
        window = torch.from_numpy(mask_utils.decode(rle)[y:y + h, x:x + w]).bool()  # decode: [H, W] uint8
        part = canvas[:, y:y + h, x:x + w]
        part.copy_(torch.where(window, torch.tensor(color, dtype=image.dtype)[:, None, None], part))
        counts = covered[y:y + h, x:x + w]
        counts += window
        counts.clamp_(max=2)
    canvas[:, covered > 1] = 0
    out = torch.empty_like(image)
    for r0 in range(0, height, rows):  # the blend in strips: float copies of a strip only
        out[:, r0:r0 + rows] = (image[:, r0:r0 + rows] * (1 - alpha) + canvas[:, r0:r0 + rows] * alpha).to(image.dtype)
    return out
