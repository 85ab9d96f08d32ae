"""Collate, worker setup and the DataLoader builder."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, \
    SequentialSampler

from .samplers import GroupedBatchSampler, InferenceSampler, aspect_ratio_group_ids

__all__ = ["collate_fn", "worker_init_fn", "build_data_loader", "set_loader_epoch"]


def collate_fn(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...]`` → ``(list of images, list of targets)``; images keep their own sizes."""
    images, targets = [], []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets


def worker_init_fn(worker_id: int) -> None:
    """Turns OpenCV's own thread pool off inside the worker (it would fight torch's threads) and seeds
    ``random`` and numpy from the worker's torch seed (distinct per worker, per epoch and per base seed)."""
    import cv2

    cv2.setNumThreads(0)
    cv2.ocl.setUseOpenCL(False)
    seed = torch.utils.data.get_worker_info().seed % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_data_loader(dataset: Dataset, *, batch_size: int, num_workers: int = 0, train: bool = True,
                      distributed: bool = False, aspect_ratio_grouping: bool = True, seed: int = 0,
                      drop_last: bool = False) -> DataLoader:
    """DataLoader for detection/segmentation datasets.

    Training shuffles (seeded by ``seed``; under ``distributed`` through ``DistributedSampler``, whose
    ``set_epoch`` the trainer calls via ``loader.batch_sampler.set_epoch`` or ``loader.sampler``), and with
    ``aspect_ratio_grouping`` batches images of like orientation together. Evaluation keeps dataset order
    (sharded across ranks under ``distributed``, without padding duplicates only when the length divides).

    Args:
        dataset: yields ``(image, target)``.
        batch_size: images per batch on this process.
        num_workers: loader processes (0 loads in the main process).
        train: shuffle and group (True) or keep order (False).
        distributed: shard indices across ``torch.distributed`` ranks.
        aspect_ratio_grouping: group training batches by aspect ratio.
        seed: shuffling seed; workers derive theirs from it.
        drop_last: drop incomplete training batches.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    if distributed and train:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
    elif distributed:
        sampler = InferenceSampler(len(dataset), rank=torch.distributed.get_rank(),
                                   world_size=torch.distributed.get_world_size())
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    if train and aspect_ratio_grouping:
        batch_sampler = GroupedBatchSampler(sampler, aspect_ratio_group_ids(dataset), batch_size,
                                            drop_last=drop_last)
    else:
        batch_sampler = BatchSampler(sampler, batch_size, drop_last=drop_last and train)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                      worker_init_fn=worker_init_fn if num_workers > 0 else None, generator=generator,
                      persistent_workers=num_workers > 0 and train, pin_memory=False)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Calls ``set_epoch`` on the loader's index sampler (``DistributedSampler`` reshuffles per epoch)."""
    batch_sampler = loader.batch_sampler
    if hasattr(batch_sampler, "set_epoch"):
        batch_sampler.set_epoch(epoch)
    elif hasattr(getattr(batch_sampler, "sampler", None), "set_epoch"):
        batch_sampler.sampler.set_epoch(epoch)
