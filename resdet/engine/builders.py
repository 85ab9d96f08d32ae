"""Config → datasets, data loaders and evaluators (the only place data options are read from a config).

Training data order is a pure function of ``(seed, epoch, position)``: :class:`EpochBatchSampler` draws
each epoch's permutation from its own generator and can start mid-epoch, and :class:`SeededDataset`
reseeds the augmentation of every item from ``(seed, epoch, index)``. So a resumed run sees exactly the
batches, and the augmentations, that an uninterrupted one would, whatever the number of workers.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from resdet.config import Config

__all__ = [
    "ensure_shapes",
    "build_dataset",
    "EpochBatchSampler",
    "SeededDataset",
    "build_train_loader",
    "build_test_loader",
    "build_evaluator",
    "dataset_metadata",
    "collate",
]

logger = logging.getLogger("resdet")


def collate(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """``[(image, target), ...]`` → ``([images], [targets])``."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def ensure_shapes(cfg: Config) -> None:
    """Write the synthetic shapes dataset under ``cfg.data.root`` unless it exists with these settings."""
    from resdet.data import shapes

    s = cfg.data.shapes
    if not os.path.isfile(os.path.join(cfg.data.root, "shapes_meta.json")):
        logger.info("generating the shapes dataset in %s", cfg.data.root)
    shapes.generate(cfg.data.root, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed,
                    max_rotation=s.max_rotation, class_hues=s.class_hues)


def _transforms(cfg: Config, train: bool):
    """Training augmentation; None at test time (the model resizes its own input)."""
    from resdet.data.transforms import build_transforms

    d = cfg.data
    if not train:
        return None
    return build_transforms(train=True, min_size=d.train_min_size, max_size=d.train_max_size,
                            hflip_prob=d.hflip_prob)


def build_dataset(cfg: Config, *, train: bool) -> Dataset:
    """The training or validation dataset named by ``cfg.data``."""
    d = cfg.data
    transforms = _transforms(cfg, train)
    remove_empty = d.remove_empty and train
    if d.dataset == "shapes":
        from resdet.data.shapes import ShapesDataset

        ensure_shapes(cfg)
        return ShapesDataset(d.root, "train" if train else "val", transforms=transforms,
                             with_masks=d.task == "instance", with_sem_seg=d.task == "semantic",
                             remove_empty=remove_empty)
    if d.dataset == "coco":
        from resdet.data.coco import CocoDataset

        images, ann = (d.train_images, d.train_ann) if train else (d.val_images, d.val_ann)
        return CocoDataset(os.path.join(d.root, images), os.path.join(d.root, ann), transforms=transforms,
                           remove_empty=remove_empty, with_masks=d.task == "instance")
    if d.dataset == "voc":
        from resdet.data.voc import VOCDataset

        if not train:
            # Detection is evaluated on VOC2007 test; segmentation on VOC2012 val (ImageSets/Segmentation).
            val_year = "2012" if d.task == "semantic" else "2007"
            return VOCDataset(d.root, val_year, d.val_split, task=d.task, transforms=transforms, keep_difficult=True)
        parts = [VOCDataset(d.root, year, d.train_split, task=d.task, transforms=transforms,
                            remove_empty=remove_empty) for year in d.years]
        if len(parts) == 1:
            return parts[0]
        merged = ConcatDataset(parts)
        for attr in ("class_names", "contiguous_to_cat_id", "num_classes"):
            setattr(merged, attr, getattr(parts[0], attr))
        return merged
    if d.dataset == "cityscapes":
        from resdet.data.cityscapes import CityscapesDataset

        task = "semantic" if d.task == "semantic" else "instance"
        split = d.train_split if train else d.val_split
        return CityscapesDataset(d.root, split, task=task, transforms=transforms, remove_empty=remove_empty)
    raise ValueError(f"data.dataset={d.dataset!r} is not supported")


def dataset_metadata(dataset: Dataset) -> dict[str, Any]:
    """``class_names`` and ``contiguous_to_cat_id`` of a dataset (stored in checkpoints for inference)."""
    return {
        "class_names": list(getattr(dataset, "class_names", [])),
        "contiguous_to_cat_id": dict(getattr(dataset, "contiguous_to_cat_id", {}) or {}),
    }


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``i`` in epoch ``e`` is augmented with the seed ``(seed, e, i)``.

    The global Python/NumPy/torch generators are restored afterwards, so loading in the main process
    (``num_workers=0``) leaves the training RNG untouched.
    """

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _seed_transforms(self, item_seed: int) -> None:
        ds = self.dataset
        if isinstance(ds, ConcatDataset):
            for part in ds.datasets:
                self._seed_one(part, item_seed)
        else:
            self._seed_one(ds, item_seed)

    @staticmethod
    def _seed_one(ds: Any, item_seed: int) -> None:
        t = getattr(ds, "transforms", None)
        if t is not None and hasattr(t, "set_seed"):
            info = torch.utils.data.get_worker_info()
            if info is not None and hasattr(t, "_seeded_worker"):
                t._seeded_worker = info.id  # keep the per-worker reseeding from overriding ours
            t.set_seed(item_seed)

    def __getitem__(self, index: int):
        item_seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(item_seed)
            np.random.seed(item_seed)
            torch.manual_seed(item_seed)
            self._seed_transforms(item_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled, rank-sharded, fixed-size batches; epoch ``e`` is a pure function of ``(seed, e)``.

    Every rank gets ``len(self)`` batches per epoch (the permutation is padded by wrapping around, as
    ``DistributedSampler`` does, and the incomplete last batch is dropped).

    Args:
        num_samples: dataset length.
        batch_size: images per batch on this rank.
        seed: shuffling seed, equal on every rank.
        rank, world_size: this process's shard.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        per_rank = -(-num_samples // world_size)
        if per_rank < batch_size:
            raise ValueError(f"{num_samples} training images over {world_size} process(es) cannot fill one "
                             f"batch of {batch_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0
        self._per_rank = per_rank

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Select the epoch and the first batch to yield (for a resume mid-epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self._per_rank // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        total = self._per_rank * self.world_size
        order = (order * (-(-total // self.num_samples)))[:total]  # pad by wrapping
        mine = order[self.rank:total:self.world_size]
        for b in range(self.start_batch, len(self)):
            yield mine[b * self.batch_size:(b + 1) * self.batch_size]


def build_train_loader(cfg: Config, dataset: Dataset, *, rank: int = 0,
                       world_size: int = 1) -> tuple[DataLoader, EpochBatchSampler, SeededDataset]:
    """A resumable training loader: returns ``(loader, batch_sampler, seeded dataset)``."""
    seeded = SeededDataset(dataset, seed=cfg.train.seed)
    sampler = EpochBatchSampler(len(dataset), cfg.data.batch_size, seed=cfg.train.seed, rank=rank,
                                world_size=world_size)
    g = torch.Generator()
    g.manual_seed(cfg.train.seed)  # DataLoader draws worker base seeds from this, not the global RNG
    loader = DataLoader(seeded, batch_sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=collate,
                        generator=g, persistent_workers=False)
    return loader, sampler, seeded


def build_test_loader(cfg: Config, dataset: Dataset, *, rank: int = 0, world_size: int = 1,
                      max_images: int | None = None) -> DataLoader:
    """Sequential loader over this rank's share (``rank::world_size``) of the first ``max_images`` items."""
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = list(range(rank, n, world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=cfg.data.test_batch_size, shuffle=False,
                      num_workers=min(cfg.data.num_workers, 2), collate_fn=collate)


def build_evaluator(cfg: Config, dataset: Dataset, *, output_dir: str | None = None):
    """The evaluator for ``cfg.eval.evaluator`` (``auto``: COCO for coco/shapes/cityscapes instance
    data, VOC for voc detection data, mIoU for semantic data); None for ``none``."""
    from resdet.evaluation import COCOEvaluator, SemSegEvaluator, VOCEvaluator

    kind = cfg.eval.evaluator
    if kind == "none":
        return None
    if kind == "auto":
        if cfg.data.task == "semantic":
            kind = "sem_seg"
        elif cfg.data.dataset == "voc":
            kind = "voc"
        else:
            kind = "coco"
    if kind == "sem_seg":
        from .visualize import semantic_class_names

        num = cfg.model.num_classes
        return SemSegEvaluator(num, class_names=semantic_class_names(getattr(dataset, "class_names", []), num))
    if kind == "voc":
        return VOCEvaluator(list(dataset.class_names), use_07_metric=cfg.eval.voc_07_metric)
    coco = getattr(dataset, "coco", None)
    if coco is None:
        raise ValueError(f"eval.evaluator=coco needs a dataset with a pycocotools ground truth (.coco); "
                         f"{type(dataset).__name__} has none — convert it with tools/convert_*_to_coco.py")
    iou_types = [t for t in cfg.eval.iou_types if t != "segm" or cfg.model.arch == "mask_rcnn"]
    return COCOEvaluator(coco, getattr(dataset, "contiguous_to_cat_id", None), iou_types=iou_types,
                         output_dir=output_dir)
