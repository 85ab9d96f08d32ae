"""CIFAR-10 and CIFAR-100 in the layout their publisher distributes, read safely and kept in memory.

Layout (the "python version" archives of https://www.cs.toronto.edu/~kriz/cifar.html, extracted)::

    cifar-10-batches-py/   data_batch_1 … data_batch_5, test_batch, batches.meta
    cifar-100-python/      train, test, meta

Each file is a Python-2 pickle (protocol 2) of a dict with byte-string keys: ``data`` (uint8 ``[N, 3072]``,
per row 1024 red, 1024 green, 1024 blue values of a 32×32 image in row-major order), ``labels``
(CIFAR-10) or ``fine_labels`` and ``coarse_labels`` (CIFAR-100), ``filenames`` and ``batch_label``; the
meta files hold ``label_names`` (CIFAR-10) or ``fine_label_names`` and ``coarse_label_names``.

Pickles can run code when loaded, so these are read by :class:`SafeUnpickler`, which resolves only the
numpy globals an array needs (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
``numpy.dtype``) and refuses any other: a crafted file is an error naming it, not code run. The decoded
images stay in memory (``[N, 32, 32, 3]`` uint8, 150 MB for CIFAR-10's training set); nothing is written
per image. :func:`write_cifar` writes the same layout (the tests and the synthetic demo data use it).
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import struct
from collections.abc import Sequence
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .image_io import image_to_tensor

__all__ = ["CIFAR_LAYOUTS", "CifarDataset", "CifarFormatError", "SafeUnpickler", "find_cifar_dir", "load_cifar_file",
           "write_cifar"]

logger = logging.getLogger("resdet.data")

Variant = Literal["cifar10", "cifar100"]

CIFAR_LAYOUTS: dict[str, dict[str, Any]] = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", name="CIFAR-10"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta", name="CIFAR-100"),
}
_SIDE = 32
_ROW = 3 * _SIDE * _SIDE


class CifarFormatError(ValueError):
    """A CIFAR file is missing, corrupt, refused (unsafe) or holds unexpected content; names the file."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that builds only the plain containers and numpy arrays a CIFAR file holds.

    Any other global (a function or class the stream asks to import and call) raises
    :class:`pickle.UnpicklingError`, so loading a crafted file cannot run code.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),  # numpy 1.x names, as in the published files
        ("numpy._core.multiarray", "_reconstruct"),  # numpy 2.x
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _text(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def load_cifar_file(path: str | os.PathLike) -> dict[str, Any]:
    """One CIFAR pickle as a dict with ``str`` keys (values as stored: arrays, lists of ints or bytes).

    Raises:
        CifarFormatError: missing, truncated or corrupt file, a refused global, or not a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CifarFormatError(f"CIFAR file {path!r} is missing")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        if "is not allowed" in str(err):
            raise CifarFormatError(f"CIFAR file {path!r} refused: it references {str(err).split(' is ')[0]}, which "
                                   "a CIFAR batch never holds (loading it could run code)") from None
        raise CifarFormatError(f"CIFAR file {path!r} is not a readable pickle ({len(raw)} bytes): {err}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, struct.error, MemoryError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CifarFormatError(f"CIFAR file {path!r} is truncated or corrupt ({len(raw)} bytes): {detail}") from None
    if not isinstance(obj, dict):
        raise CifarFormatError(f"CIFAR file {path!r} holds a {type(obj).__name__}, expected a dict")
    return {_text(k): v for k, v in obj.items()}


def find_cifar_dir(root: str | os.PathLike, variant: Variant) -> str:
    """The folder holding ``variant``'s files: ``root/cifar-10-batches-py`` (``cifar-100-python``) or ``root``
    itself."""
    layout = CIFAR_LAYOUTS[variant]
    root = os.fspath(root)
    inner = os.path.join(root, layout["folder"])
    if os.path.isdir(inner):
        return inner
    if (os.path.isfile(os.path.join(root, layout["meta"]))
            or os.path.basename(os.path.normpath(root)) == layout["folder"]):
        return root
    raise CifarFormatError(f"no {layout['name']} data under {root!r}: expected {inner!r} with "
                           f"{', '.join(layout['train'] + layout['test'] + [layout['meta']])} (the extracted python "
                           f"version of the archive)")


def _labels(entry: dict[str, Any], key: str, path: str, count: int, num_classes: int) -> np.ndarray:
    if key not in entry:
        raise CifarFormatError(f"CIFAR file {path!r} has no {key!r} (keys: {sorted(entry)})")
    try:
        labels = np.asarray(entry[key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise CifarFormatError(f"CIFAR file {path!r}: {key!r} is not a list of class indices ({err})") from None
    if len(labels) != count:
        raise CifarFormatError(f"CIFAR file {path!r} holds {count} images but {len(labels)} {key}")
    bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
    if len(bad):
        raise CifarFormatError(f"CIFAR file {path!r}: image {int(bad[0])} has label {int(labels[bad[0]])}, outside "
                               f"0..{num_classes - 1} (the meta file names {num_classes} classes)")
    return labels


def _images(entry: dict[str, Any], path: str) -> np.ndarray:
    data = entry.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CifarFormatError(f"CIFAR file {path!r}: 'data' must be a uint8 array [N, {_ROW}], got {what}")
    # [N, 3072] (R plane, G plane, B plane) -> [N, 3, 32, 32] -> [N, 32, 32, 3] as the transforms take images
    return np.ascontiguousarray(data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1))


class CifarDataset(Dataset):
    """CIFAR-10 / CIFAR-100 images and labels held in memory.

    Items are ``(image Tensor[3, 32, 32] float in [0, 1], {"labels": Tensor[] int64, "image_id": int})``
    with labels ``0..K-1`` (no background class).

    Args:
        root: the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``, or that folder itself.
        split: ``train`` (the training files, less the held-out images), ``val`` (the last ``holdout`` images
            of the training files) or ``test`` (the test file).
        variant: ``cifar10`` or ``cifar100``.
        label_type: CIFAR-100's ``fine`` (100 classes) or ``coarse`` (20 superclasses) labels.
        holdout: training images set aside as ``val`` (5000: the paper's 45k/5k split); 0 for none.
        transforms: ``(image uint8 [32, 32, 3], target) -> (image, target)`` (albumentations pipeline).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, variant: Variant = "cifar10",
                 label_type: Literal["fine", "coarse"] = "fine", holdout: int = 0,
                 transforms: Callable[[np.ndarray, dict[str, Any]], tuple[np.ndarray, dict[str, Any]]] | None = None
                 ) -> None:
        if variant not in CIFAR_LAYOUTS:
            raise ValueError(f"variant must be one of {sorted(CIFAR_LAYOUTS)}, got {variant!r}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"CIFAR split must be 'train', 'val' (the held-out part of the training files) or "
                             f"'test', got {split!r}")
        if split == "val" and holdout <= 0:
            raise ValueError("the CIFAR 'val' split is the held-out part of the training files: set "
                             "data.classification.holdout (5000 for the paper's 45k/5k split), or evaluate on 'test'")
        layout = CIFAR_LAYOUTS[variant]
        self.root = find_cifar_dir(root, variant)
        self.variant, self.split, self.transforms = variant, split, transforms
        meta_path = os.path.join(self.root, layout["meta"])
        meta = load_cifar_file(meta_path)
        names_key = "label_names" if variant == "cifar10" else f"{label_type}_label_names"
        if names_key not in meta:
            raise CifarFormatError(f"CIFAR meta file {meta_path!r} has no {names_key!r} (keys: {sorted(meta)})")
        self.class_names = [str(_text(n)) for n in meta[names_key]]
        labels_key = "labels" if variant == "cifar10" else f"{label_type}_labels"
        images, labels = [], []
        for name in layout["test" if split == "test" else "train"]:
            path = os.path.join(self.root, name)
            entry = load_cifar_file(path)
            images.append(_images(entry, path))
            labels.append(_labels(entry, labels_key, path, len(images[-1]), len(self.class_names)))
        self.images = np.concatenate(images) if len(images) > 1 else images[0]
        self.labels = np.concatenate(labels) if len(labels) > 1 else labels[0]
        if split != "test" and holdout:
            if not 0 < holdout < len(self.labels):
                raise ValueError(f"holdout={holdout} must lie between 1 and {len(self.labels) - 1} (training images)")
            keep = slice(None, -holdout) if split == "train" else slice(-holdout, None)
            self.images, self.labels = self.images[keep], self.labels[keep]
        self.summary = (f"{layout['name']} {split}: {len(self.labels)} images, {len(self.class_names)} classes"
                        + (f" ({holdout} training images held out as val)" if holdout and split != "test" else ""))
        logger.info(self.summary)

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        image = self.images[index]
        if self.transforms is not None:
            image, _ = self.transforms(image, {})
        return image_to_tensor(image), {"labels": torch.tensor(int(self.labels[index])), "image_id": index}


# ------------------------------------------------------------------------------------------------- writing
def _op_bytes(value: bytes) -> bytes:
    """A Python-2 ``str`` as CPython 2's pickler wrote it: SHORT_BINSTRING or BINSTRING."""
    if len(value) < 256:
        return pickle.SHORT_BINSTRING + bytes([len(value)]) + value
    return pickle.BINSTRING + struct.pack("<i", len(value)) + value


def _op_int(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if 0 <= value < 65536:
        return pickle.BININT2 + struct.pack("<H", value)
    return pickle.BININT + struct.pack("<i", value)


def _op_value(value: Any) -> bytes:
    if isinstance(value, bytes):
        return _op_bytes(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return _op_int(int(value))
    if isinstance(value, list):
        return pickle.EMPTY_LIST + pickle.MARK + b"".join(_op_value(v) for v in value) + pickle.APPENDS
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 2:
            raise ValueError(f"only uint8 [N, 3072] arrays are written, got {value.dtype} {value.shape}")
        dtype = (pickle.GLOBAL + b"numpy\ndtype\n" + _op_bytes(b"u1") + pickle.NEWFALSE + pickle.NEWTRUE
                 + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK + _op_int(3) + _op_bytes(b"|") + pickle.NONE
                 + pickle.NONE + pickle.NONE + pickle.BININT + struct.pack("<i", -1) + pickle.BININT
                 + struct.pack("<i", -1) + _op_int(0) + pickle.TUPLE + pickle.BUILD)
        shape = pickle.MARK + b"".join(_op_int(s) for s in value.shape) + pickle.TUPLE
        return (pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n" + pickle.GLOBAL + b"numpy\nndarray\n"
                + _op_int(0) + pickle.TUPLE1 + _op_bytes(b"b") + pickle.TUPLE3 + pickle.REDUCE
                + pickle.MARK + _op_int(1) + shape + dtype + pickle.NEWFALSE
                + _op_bytes(np.ascontiguousarray(value).tobytes()) + pickle.TUPLE + pickle.BUILD)
    raise TypeError(f"cannot write {type(value).__name__} into a CIFAR file")


def _python2_pickle(entry: dict[bytes, Any]) -> bytes:
    """The bytes CPython 2's ``cPickle.dump(entry, f, 2)`` writes for a CIFAR dict (minus memo opcodes, which
    readers do not need): byte-string keys and values as Python-2 ``str``, numpy 1.x global names."""
    body = b"".join(_op_bytes(k) + _op_value(v) for k, v in entry.items())
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS + pickle.STOP


def write_cifar(root: str | os.PathLike, *, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                class_names: Sequence[str], variant: Variant = "cifar10",
                coarse: tuple[Sequence[str], np.ndarray, np.ndarray] | None = None) -> str:
    """Write images and labels in the published layout under ``root`` (``root/cifar-10-batches-py`` ...).

    Args:
        train: ``(images uint8 [N, 32, 32, 3], labels int [N])``; CIFAR-10 splits them over five batches.
        test: the same for the test file.
        class_names: CIFAR-10's ``label_names`` or CIFAR-100's ``fine_label_names``.
        variant: ``cifar10`` or ``cifar100``.
        coarse: CIFAR-100 only: ``(coarse_label_names, train coarse labels, test coarse labels)``; default one
            superclass per 5 fine classes.

    Returns:
        The folder written.
    """
    layout = CIFAR_LAYOUTS[variant]
    folder = os.path.join(os.fspath(root), layout["folder"])
    os.makedirs(folder, exist_ok=True)

    def rows(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (_SIDE, _SIDE, 3):
            raise ValueError(f"images must be uint8 [N, 32, 32, 3], got shape {images.shape}")
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), _ROW))  # planes R, G, B

    def save(name: str, entry: dict[bytes, Any]) -> None:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(_python2_pickle(entry))

    names = [n.encode("latin-1") for n in class_names]
    if variant == "cifar10":
        images, labels = rows(train[0]), [int(v) for v in train[1]]
        bounds = np.linspace(0, len(labels), 6).astype(int)
        for i, name in enumerate(layout["train"]):
            lo, hi = bounds[i], bounds[i + 1]
            save(name, {b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": labels[lo:hi],
                        b"data": images[lo:hi], b"filenames": [f"train_{j:05d}.png".encode() for j in range(lo, hi)]})
        save("test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in test[1]],
                            b"data": rows(test[0]),
                            b"filenames": [f"test_{j:05d}.png".encode() for j in range(len(test[1]))]})
        save("batches.meta", {b"num_cases_per_batch": int(bounds[1] - bounds[0]), b"label_names": names,
                              b"num_vis": _ROW})
        return folder
    coarse_names, coarse_train, coarse_test = coarse or (
        [f"superclass_{i}" for i in range((len(class_names) + 4) // 5)],
        np.asarray(train[1]) // 5, np.asarray(test[1]) // 5)
    for name, (images, labels), sup in (("train", train, coarse_train), ("test", test, coarse_test)):
        save(name, {b"filenames": [f"{name}_{j:05d}.png".encode() for j in range(len(labels))],
                    b"batch_label": f"{name}ing batch 1 of 1".encode(), b"fine_labels": [int(v) for v in labels],
                    b"coarse_labels": [int(v) for v in sup], b"data": rows(images)})
    save("meta", {b"fine_label_names": names, b"coarse_label_names": [n.encode("latin-1") for n in coarse_names]})
    return folder
