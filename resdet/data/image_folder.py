"""A user's own classification data as an image folder tree (torchvision's ``ImageFolder`` layout)::

    root/train/<class>/*.jpg
    root/val/<class>/*.jpg

Class names are the folder names of the training split, sorted; label ``k`` is the ``k``-th of them (the
validation split maps its folders onto the same list). Files without an image suffix and files whose header
no image decoder recognises are skipped and counted (the build summary lists them); a class folder with no
usable image is an error naming it.
"""
from __future__ import annotations

import collections
import logging
import os
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .image_io import ImageReadError, image_to_tensor, read_image

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataset", "list_classes"]

logger = logging.getLogger("resdet.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_classes(split_dir: str) -> list[str]:
    """Sorted class folder names of one split folder."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"image folder {split_dir!r} does not exist; expected <root>/<split>/<class>/<images>")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {split_dir!r} has no class folders; expected <root>/<split>/<class>/<images>")
    return classes


def _readable(path: str) -> bool:
    """Whether an image decoder recognises the file's header (the pixels are decoded when the item is read)."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


class ImageFolderDataset(Dataset):
    """Images in ``root/<split>/<class>/``; items are ``(image Tensor[3, H, W] float in [0, 1],
    {"labels": Tensor[] int64, "image_id": int})``.

    Args:
        root: the dataset folder.
        split: the split folder's name (``train``, ``val`` ...).
        classes: class names defining the labels (the training split's); None: this split's folders. A
            folder not among them is an error.
        transforms: ``(image uint8 [H, W, 3], target) -> (image, target)`` (albumentations pipeline).
        extensions: file suffixes taken as images (case-insensitive).
        check_headers: open every file's header while building, skipping (and counting) those no decoder
            recognises.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, classes: Sequence[str] | None = None,
                 transforms: Callable[[np.ndarray, dict[str, Any]], tuple[np.ndarray, dict[str, Any]]] | None = None,
                 extensions: Sequence[str] = IMAGE_SUFFIXES, check_headers: bool = True) -> None:
        self.root = os.fspath(root)
        self.split = split
        self.transforms = transforms
        split_dir = os.path.join(self.root, split)
        found = list_classes(split_dir)
        self.class_names = list(classes) if classes is not None else found
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise ValueError(f"image folder {split_dir!r}: class folder(s) {unknown[:5]} are not among the "
                             f"{len(self.class_names)} training classes")
        suffixes = tuple(s.lower() for s in extensions)
        self.skipped: collections.Counter[str] = collections.Counter()
        self.samples: list[tuple[str, int]] = []
        unreadable: list[str] = []
        for name in found:
            folder = os.path.join(split_dir, name)
            count = 0
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if not entry.is_file():
                    continue
                if not entry.name.lower().endswith(suffixes):
                    self.skipped["not_image"] += 1
                    continue
                if check_headers and not _readable(entry.path):
                    self.skipped["unreadable"] += 1
                    unreadable.append(entry.path)
                    continue
                self.samples.append((entry.path, index[name]))
                count += 1
            if count == 0:
                raise ValueError(f"class folder {folder!r} has no images ({', '.join(suffixes[:4])}, ...): remove "
                                 "the folder or add its images")
        parts = [f"image folder {split_dir}: {len(self.samples)} images, {len(found)} classes"]
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
            if unreadable:
                parts.append("unreadable: " + ", ".join(unreadable[:3]) + (" ..." if len(unreadable) > 3 else ""))
        self.summary = "; ".join(parts)
        (logger.warning if self.skipped else logger.info)(self.summary)

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        path, label = self.samples[index]
        try:
            image = read_image(path)
        except ImageReadError as err:
            raise ImageReadError(f"{type(self).__name__}[{index}] ({self.class_names[label]}): {err}") from err
        if self.transforms is not None:
            image, _ = self.transforms(image, {})
        return image_to_tensor(image), {"labels": torch.tensor(label), "image_id": index}
