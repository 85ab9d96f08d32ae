"""Reading images and label maps from disk into the arrays the datasets hand to transforms.

Every image reader returns ``np.ndarray[H, W, 3]`` uint8 RGB whatever the file holds: grayscale, RGBA
(alpha dropped, composited on nothing), palette, 16-bit (scaled down to 8 bits) and CMYK images are
converted. Label maps (semantic and instance PNGs) are read *raw*: a palette PNG gives its palette indices,
a 16/32-bit PNG its integer values, never colours.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageReadError", "read_image", "read_label_map", "image_to_tensor"]


class ImageReadError(RuntimeError):
    """An image or label file is missing or cannot be decoded."""


def _open(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path!r}")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(f"cannot decode image {path!r}: {err}") from err
    return image


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    # 16-bit (or wider) integer images: the 16-bit range maps onto 8 bits whatever the content (a dark
    # 16-bit image stays dark; guessing the range from the maximum would turn it white).
    return (array.astype(np.float64) * (255.0 / 65535.0) + 0.5).clip(0, 255).astype(np.uint8)


def read_image(path: str) -> np.ndarray:
    """Reads an image file as 8-bit RGB.

    Args:
        path: image file.

    Returns:
        ``np.ndarray[H, W, 3]`` uint8.

    Raises:
        ImageReadError: the file is missing or not a decodable image (the message names the file).
    """
    image = _open(path)
    mode = image.mode
    if mode in ("RGB",):
        array = np.asarray(image)
    elif mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = _to_uint8(np.asarray(image))
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif mode in ("L", "1"):
        array = _to_uint8(np.asarray(image.convert("L")))
        array = np.repeat(array[:, :, None], 3, axis=2)
    else:  # RGBA, LA, P, CMYK, YCbCr, RGB;16 ...
        array = np.asarray(image.convert("RGB"))
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageReadError(f"image {path!r} decoded to shape {array.shape}, expected H x W x 3")
    return np.array(array, dtype=np.uint8, order="C")  # writable copy


def read_label_map(path: str) -> np.ndarray:
    """Reads a label PNG as its raw integer values (palette indices for palette PNGs).

    Args:
        path: PNG file.

    Returns:
        ``np.ndarray[H, W]`` int64.
    """
    image = _open(path)
    if image.mode in ("RGB", "RGBA"):
        raise ImageReadError(f"label map {path!r} is a colour image (mode {image.mode}); expected a "
                             f"palette or single-channel PNG holding class ids")
    array = np.asarray(image)
    if array.ndim != 2:
        raise ImageReadError(f"label map {path!r} has shape {array.shape}, expected H x W")
    return array.astype(np.int64)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``np.ndarray[H, W, 3]`` uint8 → ``Tensor[3, H, W]`` float32 in [0, 1]."""
    # HWC -> CHW
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
