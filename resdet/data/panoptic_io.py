"""The panoptic PNG format of panopticapi (COCO panoptic, Cityscapes' ``createPanopticImgs``).

A panoptic PNG is an 8-bit RGB image whose pixel colour encodes a segment id,
``id = R + 256 * G + 256**2 * B``; 0 is void (unlabelled). The segments of an image are described by its
``segments_info`` entry in the json (``id``, ``category_id``, ``iscrowd``, ``area``, ``bbox``).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .image_io import ImageReadError

__all__ = ["VOID", "rgb2id", "id2rgb", "read_panoptic_png", "write_panoptic_png", "check_segments"]

VOID = 0


def rgb2id(color: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB → int64 ``[H, W]`` segment ids (R + 256 G + 256² B)."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids ``[H, W]`` (0 .. 256³-1) → uint8 ``[H, W, 3]`` RGB, the inverse of :func:`rgb2id`."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256 ** 3):
        raise ValueError(f"segment ids must lie in 0..{256 ** 3 - 1}, got {ids.min()}..{ids.max()}")
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str) -> np.ndarray:
    """Reads a panoptic PNG as segment ids, int64 ``[H, W]``.

    Raises:
        ImageReadError: the file is missing, undecodable, or not an RGB(A) image (a grey, palette or 16-bit
            PNG holds no panopticapi ids).
    """
    if not os.path.isfile(path):
        raise ImageReadError(f"panoptic PNG not found: {path!r}")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
    except (OSError, ValueError) as err:
        raise ImageReadError(f"cannot decode panoptic PNG {path!r}: {err}") from err
    if mode not in ("RGB", "RGBA"):
        raise ImageReadError(f"panoptic PNG {path!r} has mode {mode}; expected 8-bit RGB with segment id "
                             f"R + 256*G + 256^2*B")
    return rgb2id(array[..., :3])


def write_panoptic_png(path: str, ids: np.ndarray) -> None:
    """Writes segment ids ``[H, W]`` as a panopticapi RGB PNG (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(id2rgb(ids)).save(path)


def check_segments(ids: np.ndarray, segment_ids: list[int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Checks that the non-void ids of a panoptic map and the json's segment ids are the same set.

    Args:
        ids: segment id map ``[H, W]``.
        segment_ids: ``id`` of every ``segments_info`` entry of the image.
        where: how the error names the image (its PNG file and json).

    Returns:
        ``(unique ids, their pixel counts)`` of the map, void included.

    Raises:
        ValueError: an id in the PNG has no json entry, a json segment has no pixel, or a json id is 0 or
            repeated.
    """
    listed: set[int] = set()
    for seg_id in segment_ids:
        if seg_id == VOID:
            raise ValueError(f"{where}: segments_info has a segment with id 0, which is void")
        if seg_id in listed:
            raise ValueError(f"{where}: segment id {seg_id} appears twice in segments_info")
        listed.add(seg_id)
    values, counts = np.unique(ids, return_counts=True)
    for value in values.tolist():
        if value != VOID and value not in listed:
            raise ValueError(f"{where}: segment id {value} is in the PNG but not in segments_info")
    present = set(values.tolist())
    for seg_id in segment_ids:
        if seg_id not in present:
            raise ValueError(f"{where}: segment id {seg_id} is in segments_info but has no pixel in the PNG")
    return values, counts
