"""Aspect-ratio grouped batching: each batch holds only landscape or only portrait images (or finer groups),
so padding a batch to one size wastes little. Works over any index sampler, ``DistributedSampler`` included.
"""
from __future__ import annotations

import bisect
import collections
from typing import Iterator, Sequence

from torch.utils.data import Sampler

__all__ = ["GroupedBatchSampler", "InferenceSampler", "aspect_ratio_group_ids"]


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


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches indices from ``sampler`` so that every batch shares one group id.

    Indices are buffered per group and a batch is emitted as soon as a group holds ``batch_size`` of them,
    keeping the sampler's order as far as grouping allows. Leftovers at the end of an epoch are emitted as
    smaller batches unless ``drop_last``; ``len()`` is exact.

    Args:
        sampler: yields dataset indices (e.g. ``RandomSampler`` or ``DistributedSampler``; call its
            ``set_epoch`` as usual — this sampler forwards ``set_epoch`` too).
        group_ids: group id per dataset index.
        batch_size: images per batch.
        drop_last: drop incomplete leftover batches.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int, *,
                 drop_last: bool = False) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = collections.defaultdict(list)
        for index in self.sampler:
            buffer = buffers[self.group_ids[index]]
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield list(buffer)
                buffer.clear()
        if not self.drop_last:
            for buffer in buffers.values():
                if buffer:
                    yield list(buffer)

    def __len__(self) -> int:
        counts = collections.Counter(self.group_ids[i] for i in self.sampler)
        if self.drop_last:
            return sum(c // self.batch_size for c in counts.values())
        return sum(-(-c // self.batch_size) for c in counts.values())


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
