"""Samplers: the one training index stream (infinite, seeded, rank-sharded) with aspect-ratio grouped
batches on top, and the inference sampler that shards evaluation without duplicates.

Training has no epochs at the loop level (as detectron2's ``TrainingSampler``): the stream is the
concatenation of seeded permutations ``perm(seed, 0), perm(seed, 1), ...`` and rank ``r`` of ``W`` takes
positions ``r, r + W, r + 2W, ...`` of it. Every rank therefore gets as many batches as it asks for, an
uneven dataset never leaves one rank waiting at an epoch boundary, and the order is a pure function of
``(seed, rank, world size, batches done)``: a resumed run skips the batches already done (index arithmetic
only, no image is read) and then sees exactly what an uninterrupted run would. Each item is yielded as
``(index, epoch)`` so the dataset wrapper can seed its augmentation from ``(seed, epoch, index)``.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["TrainingSampler", "GroupedBatchSampler", "InferenceSampler", "aspect_ratio_group_ids"]


def _image_sizes(dataset) -> list[tuple[int, int]] | None:
    """(height, width) per item from annotations, through ``Subset``/``ConcatDataset`` wrappers."""
    if hasattr(dataset, "get_image_size"):
        return [dataset.get_image_size(i) for i in range(len(dataset))]
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # torch.utils.data.Subset
        inner = _image_sizes(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if hasattr(dataset, "datasets"):  # torch.utils.data.ConcatDataset
        parts = [_image_sizes(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [s for p in parts for s in p]
    return None


def aspect_ratio_group_ids(dataset, bins: Sequence[float] = (1.0,)) -> list[int]:
    """Group id per item from width/height ratio: ratio below ``bins[0]`` → 0, and so on.

    Uses ``get_image_size(index) -> (height, width)`` of resdet datasets (read from annotations, no image
    decoding), also through ``Subset`` and ``ConcatDataset``; other datasets fall into a single group.
    """
    sizes = _image_sizes(dataset)
    if sizes is None:
        return [0] * len(dataset)
    bins = sorted(bins)
    return [bisect.bisect_right(bins, width / height) for height, width in sizes]


class TrainingSampler(Sampler[tuple[int, int]]):
    """Infinite stream of ``(index, epoch)`` for one rank (see the module docstring).

    Args:
        size: dataset length.
        seed: shuffling seed, equal on every rank.
        rank, world_size: this process's shard.
        shuffle: permute each epoch (False: ``0..size-1`` every epoch).
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if size <= 0:
            raise ValueError(f"the training set is empty (size {size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle

    def _global(self) -> Iterator[tuple[int, int]]:
        for epoch in itertools.count():
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(self.seed * 100_003 + epoch)  # distinct per (seed, epoch)
                order = torch.randperm(self.size, generator=g).tolist()
            else:
                order = range(self.size)
            for index in order:
                yield index, epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return itertools.islice(self._global(), self.rank, None, self.world_size)


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite batches of ``batch_size`` items from ``sampler``, every batch within one aspect group.

    Items are buffered per group and a batch is emitted as soon as a group holds ``batch_size`` of them,
    keeping the stream's order as far as grouping allows (torchvision's references and detectron2 do the
    same). With a single group this is plain batching of the stream. ``set_start(n)`` makes the next
    iteration skip the first ``n`` batches (resume).

    Args:
        sampler: an infinite ``(index, epoch)`` stream, e.g. :class:`TrainingSampler`.
        group_ids: group id per dataset index (:func:`aspect_ratio_group_ids`; all zeros: no grouping).
        batch_size: images per batch on this rank.
    """

    def __init__(self, sampler: TrainingSampler, group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.start = 0

    def set_start(self, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches on the next iteration."""
        self.start = batches_done

    def _batches(self) -> Iterator[list[tuple[int, int]]]:
        buffers: dict[int, list[tuple[int, int]]] = {}
        for item in self.sampler:
            buffer = buffers.setdefault(self.group_ids[item[0]], [])
            buffer.append(item)
            if len(buffer) == self.batch_size:
                yield list(buffer)
                buffer.clear()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return itertools.islice(self._batches(), self.start, None)


class InferenceSampler(Sampler[int]):
    """Contiguous, unpadded shard of ``range(size)`` for one rank: every item is evaluated exactly once
    across ranks (``DistributedSampler`` would repeat items to even out the shards).

    Args:
        size: dataset length.
        rank, world_size: this process's shard.
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        per_rank = -(-size // world_size)
        self.start, self.end = min(rank * per_rank, size), min((rank + 1) * per_rank, size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start
