"""Config → datasets, data loaders and evaluators (the only place data options are read from a config).

Training data order is a pure function of ``(seed, rank, world size, batches done)``: the infinite
:class:`~resdet.data.samplers.TrainingSampler` stream, batched within aspect-ratio groups, skips the
batches a resumed run has done, and :class:`SeededDataset` reseeds the augmentation of every item from
``(seed, epoch, index)``. So a resumed run sees exactly the batches, and the augmentations, that an
uninterrupted one would, whatever the number of workers.
"""
from __future__ import annotations

import inspect
import logging
import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from resdet.config import Config, ConfigError
from resdet.data.samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_group_ids

__all__ = [
    "ensure_shapes",
    "build_dataset",
    "SeededDataset",
    "build_train_loader",
    "build_test_loader",
    "build_evaluator",
    "dataset_metadata",
    "check_num_classes",
    "num_loader_workers",
    "available_cpus",
    "collate",
    "collate_classification",
]

logger = logging.getLogger("resdet")


def collate(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """``[(image, target), ...]`` → ``([images], [targets])``; images keep their own sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def collate_classification(batch: list[tuple[Any, Any]]) -> tuple[Any, list[Any]]:
    """:func:`collate` for classification items: images of one size become one ``Tensor[N, C, H, W]``
    (iterating it gives the images) and the labels one ``Tensor[N]`` that the targets view, so a loader
    worker hands the main process two tensors per batch instead of two per image (each tensor crossing
    processes costs a shared-memory transfer)."""
    images, targets = zip(*batch)
    if len({tuple(im.shape) for im in images}) == 1:
        images = torch.stack(images)
    if all(isinstance(t, dict) and torch.is_tensor(t.get("labels")) and t["labels"].numel() == 1 for t in targets):
        labels = torch.stack([t["labels"].reshape(()) for t in targets])
        targets = [{**t, "labels": labels[i]} for i, t in enumerate(targets)]
    return images if torch.is_tensor(images) else list(images), list(targets)


def _collate_fn(cfg: Config):
    return collate_classification if cfg.data.task == "classification" else collate


def _worker_init(worker_id: int) -> None:
    """Turns OpenCV's own thread pool off inside a loader worker (it would fight torch's threads)."""
    import cv2

    cv2.setNumThreads(0)


_warned_workers: set[tuple[int, int]] = set()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def num_loader_workers(requested: int) -> int:
    """``data.num_workers`` capped to the CPUs there are (said once per requested/cap pair)."""
    cap = available_cpus()
    if requested <= cap:
        return requested
    if (requested, cap) not in _warned_workers:
        _warned_workers.add((requested, cap))
        logger.warning("data.num_workers=%d exceeds the %d CPU(s) available: using %d loader workers",
                       requested, cap, cap)
    return cap


def ensure_shapes(cfg: Config) -> None:
    """Write the synthetic shapes dataset under ``cfg.data.root`` unless it exists with these settings."""
    from resdet.data import shapes

    s = cfg.data.shapes
    if not os.path.isfile(os.path.join(cfg.data.root, "shapes_meta.json")):
        logger.info("generating the shapes dataset in %s", cfg.data.root)
    shapes.generate(cfg.data.root, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed,
                    max_rotation=s.max_rotation, class_hues=s.class_hues, stuff_classes=s.stuff_classes)


def _transforms(cfg: Config, train: bool):
    """Training augmentation; None at test time (the model resizes its own input)."""
    from resdet.data.transforms import build_classification_transforms, build_transforms

    d = cfg.data
    if not train:
        return None
    if d.task == "classification":
        c = d.classification
        return build_classification_transforms(train=True, augment=c.augment, crop_size=c.crop_size,
                                               padding=c.padding, scale=c.scale, hflip_prob=d.hflip_prob)
    return build_transforms(train=True, min_size=d.train_min_size, max_size=d.train_max_size,
                            hflip_prob=d.hflip_prob)


def _voc_val_year(d: Any) -> str:
    """The VOC year to validate on: among ``data.years`` the one whose devkit has the ``val_split`` image
    set, preferring 2007 for detection (its test set is the benchmark) and 2012 for segmentation."""
    from resdet.data.voc import voc_split_file

    years = [str(y) for y in d.years]
    preferred = "2012" if d.task == "semantic" else "2007"
    order = sorted(years, key=lambda y: (y != preferred, years.index(y)))
    for year in order:
        if os.path.isfile(voc_split_file(d.root, year, d.val_split, task=d.task)):
            return year
    tried = ", ".join(voc_split_file(d.root, y, d.val_split, task=d.task) for y in order)
    raise ConfigError(f"data.val_split={d.val_split!r}: no VOC year of data.years={years} has that image set "
                      f"(looked for {tried})")


def _build_panoptic(cfg: Config, *, train: bool, transforms) -> Dataset:
    """Panoptic data: COCO panoptic json + PNGs (COCO, shapes with stuff) or Cityscapes panoptic."""
    from resdet.data.panoptic import CityscapesPanopticDataset, CocoPanopticDataset

    d = cfg.data
    common = dict(transforms=transforms, remove_empty=d.remove_empty and train, with_panoptic_gt=not train)
    if d.dataset == "cityscapes":
        return CityscapesPanopticDataset(d.root, d.train_split if train else d.val_split,
                                         missing_images=d.missing_images, **common)
    if d.dataset == "shapes":
        if not d.shapes.stuff_classes:
            raise ConfigError("data.task=panoptic on shapes needs data.shapes.stuff_classes=true (stuff bands and "
                              "panoptic ground truth)")
        ensure_shapes(cfg)
        split = "train" if train else "val"
        return CocoPanopticDataset(os.path.join(d.root, "images", split),
                                   os.path.join(d.root, "annotations", f"panoptic_{split}.json"), **common)
    if d.dataset == "coco":
        images, ann, pngs = ((d.train_images, d.train_ann, d.train_panoptic_dir) if train
                             else (d.val_images, d.val_ann, d.val_panoptic_dir))
        return CocoPanopticDataset(os.path.join(d.root, images), os.path.join(d.root, ann),
                                   None if pngs is None else os.path.join(d.root, pngs),
                                   missing_images=d.missing_images, **common)
    raise ConfigError(f"data.task=panoptic: data.dataset={d.dataset!r} has no panoptic reader (coco, cityscapes, "
                      "shapes)")


_CLASSIFICATION_DATASETS = ("cifar10", "cifar100", "imagefolder")


def _build_classification(cfg: Config, *, train: bool, transforms) -> Dataset:
    """CIFAR-10/100 (the published pickles) or an image folder tree, for ``data.task: classification``."""
    d = cfg.data
    if d.task != "classification" or d.dataset not in _CLASSIFICATION_DATASETS:
        raise ConfigError(f"data.dataset={d.dataset!r} with data.task={d.task!r}: classification data "
                          f"({', '.join(_CLASSIFICATION_DATASETS)}) goes with data.task=classification and the other "
                          f"datasets with detection, instance or semantic")
    split = d.train_split if train else d.val_split
    if d.dataset == "imagefolder":
        from resdet.data.image_folder import ImageFolderDataset, list_classes

        classes = None if train else list_classes(os.path.join(d.root, d.train_split))
        return ImageFolderDataset(d.root, split, classes=classes, transforms=transforms)
    from resdet.data.cifar import CifarDataset

    c = d.classification
    if split not in ("train", "val", "test"):
        raise ConfigError(f"data.{'train' if train else 'val'}_split={split!r}: CIFAR has the splits train, val "
                          "(data.classification.holdout images set aside from train) and test")
    if split == "val" and not c.holdout:
        raise ConfigError("data.val_split=val needs data.classification.holdout > 0 (5000: the paper's 45k/5k "
                          "split); data.val_split=test evaluates on the test set")
    return CifarDataset(d.root, split, variant=d.dataset, label_type=c.label_type, holdout=c.holdout,
                        transforms=transforms)


def _build(cfg: Config, *, train: bool, transforms) -> Dataset:
    d = cfg.data
    if d.task == "classification" or d.dataset in _CLASSIFICATION_DATASETS:
        return _build_classification(cfg, train=train, transforms=transforms)
    remove_empty = d.remove_empty and train
    if d.task == "panoptic":
        return _build_panoptic(cfg, train=train, transforms=transforms)
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
                           remove_empty=remove_empty, with_masks=d.task == "instance",
                           missing_images=d.missing_images)
    if d.dataset == "voc":
        from resdet.data.voc import VOCDataset

        if not train:
            return VOCDataset(d.root, _voc_val_year(d), d.val_split, task=d.task, transforms=transforms,
                              keep_difficult=True)
        parts = [VOCDataset(d.root, str(year), d.train_split, task=d.task, transforms=transforms,
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


def check_num_classes(cfg: Config, dataset: Dataset, *, where: str) -> None:
    """Stop at start when the data's classes and ``model.num_classes`` disagree (detection and
    classification tasks), or when the data and the model's task do not go together."""
    from resdet.models import arch_task

    task = arch_task(cfg.model.arch)
    if (task == "classification") != (cfg.data.task == "classification"):
        raise ConfigError(f"model.arch={cfg.model.arch!r} ({task}) does not go with data.task={cfg.data.task!r}: "
                          "a classifier trains on classification data (cifar10, cifar100, imagefolder), the other "
                          "models on detection/segmentation data")
    if task == "classification":
        wanted = int(getattr(dataset, "num_classes", cfg.model.num_classes))
        if wanted != cfg.model.num_classes:
            raise ConfigError(f"the {where} data has {wanted} classes (labels 0..{wanted - 1}) but model.num_classes="
                              f"{cfg.model.num_classes}: set model.num_classes={wanted}")
        return
    if cfg.data.task == "semantic" or task not in ("detection", "instance", "panoptic"):
        return
    stuff = getattr(dataset, "num_stuff_classes", None)
    if arch_task(cfg.model.arch) == "panoptic" and stuff is not None:
        from resdet.models.registry import arch_options, get_arch

        option = "num_stuff_classes"
        model_stuff = cfg.model.options.get(option)
        if model_stuff is None and option in arch_options(cfg.model.arch):
            model_stuff = inspect.signature(get_arch(cfg.model.arch)).parameters[option].default
        if model_stuff is not None and int(model_stuff) != int(stuff):
            raise ConfigError(f"the {where} data has {stuff} stuff categories but the model predicts "
                              f"{model_stuff}: set model.options.num_stuff_classes={stuff}")
    wanted = getattr(dataset, "num_classes", None)
    if wanted is None or int(wanted) == cfg.model.num_classes:
        return
    raise ConfigError(f"the {where} data has {int(wanted) - 1} categories (+ background = {int(wanted)} "
                      f"classes) but model.num_classes={cfg.model.num_classes}: set model.num_classes={int(wanted)}")


def build_dataset(cfg: Config, *, train: bool, check_classes: bool = True) -> Dataset:
    """The training or validation dataset named by ``cfg.data``.

    Args:
        check_classes: raise :class:`ConfigError` when the data's class count differs from
            ``model.num_classes`` (evaluating a checkpoint in another label space passes False).
    """
    dataset = _build(cfg, train=train, transforms=_transforms(cfg, train))
    if check_classes:
        check_num_classes(cfg, dataset, where="training" if train else "validation")
    return dataset


def dataset_metadata(dataset: Dataset) -> dict[str, Any]:
    """``class_names``, ``contiguous_to_cat_id`` and ``label_space`` (plain types) of a dataset, stored in
    checkpoints so that inference maps labels back to the dataset's category ids."""
    from resdet.data.label_space import LabelSpace

    space = LabelSpace.from_dataset(dataset)
    meta: dict[str, Any] = {
        "class_names": list(getattr(dataset, "class_names", [])),
        "contiguous_to_cat_id": dict(getattr(dataset, "contiguous_to_cat_id", {}) or {}),
    }
    if space is not None:
        meta["label_space"] = space.to_dict()
    return meta


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(i, e)`` (index ``i`` drawn in epoch ``e`` of the training stream) is
    augmented with the seed ``(seed, e, i)``; a plain index is epoch 0.

    The global Python/NumPy/torch generators are restored afterwards, so loading in the main process
    (``num_workers=0``) leaves the training RNG untouched.
    """

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _seed_transforms(self, item_seed: int) -> None:
        ds = self.dataset
        for part in (ds.datasets if isinstance(ds, ConcatDataset) else [ds]):
            t = getattr(part, "transforms", None)
            if t is not None and hasattr(t, "set_seed"):
                info = torch.utils.data.get_worker_info()
                if info is not None and hasattr(t, "_seeded_worker"):
                    t._seeded_worker = info.id  # keep the per-worker reseeding from overriding ours
                t.set_seed(item_seed)

    def __getitem__(self, item: int | tuple[int, int]):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        item_seed = int(np.random.SeedSequence([self.seed, int(epoch), int(index)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(item_seed)
            np.random.seed(item_seed)
            torch.default_generator.manual_seed(item_seed)  # the CPU generator fork_rng restores (torch.manual_seed
            # would also reseed every CUDA generator, which fork_rng(devices=[]) leaves changed, at ~100 us per item)
            self._seed_transforms(item_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def build_train_loader(cfg: Config, dataset: Dataset, *, rank: int = 0,
                       world_size: int = 1) -> tuple[DataLoader, GroupedBatchSampler, SeededDataset]:
    """The one training loader: an infinite seeded rank-sharded stream (:class:`TrainingSampler`), batched
    within aspect-ratio groups when ``data.aspect_ratio_grouping`` (:class:`GroupedBatchSampler`).

    Returns:
        ``(loader, batch sampler, seeded dataset)``; call ``batch_sampler.set_start(batches_done)`` before
        iterating to resume.
    """
    d = cfg.data
    seeded = SeededDataset(dataset, seed=cfg.train.seed)
    sampler = TrainingSampler(len(dataset), seed=cfg.train.seed, rank=rank, world_size=world_size)
    groups = aspect_ratio_group_ids(dataset) if d.aspect_ratio_grouping else [0] * len(dataset)
    batch_sampler = GroupedBatchSampler(sampler, groups, d.batch_size)
    g = torch.Generator()
    g.manual_seed(cfg.train.seed)  # DataLoader draws worker base seeds from this, not the global RNG
    workers = num_loader_workers(d.num_workers)
    loader = DataLoader(seeded, batch_sampler=batch_sampler, num_workers=workers, collate_fn=_collate_fn(cfg),
                        generator=g, worker_init_fn=_worker_init if workers else None, persistent_workers=False)
    return loader, batch_sampler, seeded


def build_test_loader(cfg: Config, dataset: Dataset, *, rank: int = 0, world_size: int = 1,
                      max_images: int | None = None) -> DataLoader:
    """In-order loader over this rank's contiguous share (:class:`InferenceSampler`) of the first
    ``max_images`` items: every image is evaluated once over all ranks."""
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    workers = num_loader_workers(min(cfg.data.num_workers, 2))
    return DataLoader(subset, batch_size=cfg.data.test_batch_size,
                      sampler=InferenceSampler(n, rank=rank, world_size=world_size), num_workers=workers,
                      collate_fn=_collate_fn(cfg), worker_init_fn=_worker_init if workers else None)


def build_evaluator(cfg: Config, dataset: Dataset, *, output_dir: str | None = None, label_space=None):
    """The evaluator for ``cfg.eval.evaluator`` (``auto``: COCO for coco/shapes/cityscapes instance
    data, VOC for voc detection data, mIoU for semantic data, PQ plus the instances' COCO AP for panoptic
    data, top-1/top-5 accuracy for classification data); None for ``none``.

    Args:
        label_space: the model's :class:`~resdet.data.label_space.LabelSpace` (labels → the dataset's
            category ids); None: the dataset's own contiguous mapping.
    """
    from resdet.evaluation import (
        ClassificationEvaluator,
        COCOEvaluator,
        PanopticEvaluator,
        SemSegEvaluator,
        VOCEvaluator,
    )

    kind = cfg.eval.evaluator
    if kind == "none":
        return None
    if kind == "auto":
        if cfg.data.task == "classification":
            kind = "classification"
        elif cfg.data.task == "panoptic":
            kind = "panoptic"
        elif cfg.data.task == "semantic":
            kind = "sem_seg"
        elif cfg.data.dataset == "voc":
            kind = "voc"
        else:
            kind = "coco"
    if kind == "classification":
        names = list(getattr(dataset, "class_names", []))
        return ClassificationEvaluator(cfg.model.num_classes, class_names=names if len(names) == cfg.model.num_classes
                                       else None)
    if kind == "sem_seg":
        from .visualize import semantic_class_names

        num = cfg.model.num_classes
        return SemSegEvaluator(num, class_names=semantic_class_names(getattr(dataset, "class_names", []), num))
    if kind == "panoptic":
        categories = getattr(dataset, "categories", None)
        if categories is None:
            raise ValueError(f"eval.evaluator=panoptic needs a panoptic dataset (data.task=panoptic); "
                             f"{type(dataset).__name__} has no panoptic categories")
        mapping = (label_space.label_to_cat_id() if label_space is not None
                   else getattr(dataset, "contiguous_to_cat_id", None))
        return PanopticEvaluator(categories, mapping, instance_iou_types=list(cfg.eval.iou_types),
                                 output_dir=output_dir)
    if kind == "voc":
        return VOCEvaluator(list(dataset.class_names), use_07_metric=cfg.eval.voc_07_metric)
    coco = getattr(dataset, "coco", None)
    if coco is None:
        raise ValueError(f"eval.evaluator=coco needs a dataset with a pycocotools ground truth (.coco); "
                         f"{type(dataset).__name__} has none — convert it with tools/convert_*_to_coco.py")
    from resdet.models import arch_task

    iou_types = [t for t in cfg.eval.iou_types if t != "segm" or arch_task(cfg.model.arch) == "instance"]
    mapping = (label_space.label_to_cat_id() if label_space is not None
               else getattr(dataset, "contiguous_to_cat_id", None))
    return COCOEvaluator(coco, mapping, iou_types=iou_types, output_dir=output_dir)
