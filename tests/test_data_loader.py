"""Collate, aspect-ratio grouped batching (also over DistributedSampler) and the DataLoader builder."""
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, DistributedSampler, RandomSampler, SequentialSampler

from resdet.data import GroupedBatchSampler, InferenceSampler, aspect_ratio_group_ids, build_data_loader, collate_fn, set_loader_epoch


class _Toy(Dataset):
    """Item i is an image of size sizes[i] whose target records i."""

    def __init__(self, n=23):
        rng = np.random.default_rng(0)
        self.sizes = [(16, 24) if rng.random() < 0.6 else (24, 16) for _ in range(n)]

    def __len__(self):
        return len(self.sizes)

    def get_image_size(self, index):
        return self.sizes[index]

    def __getitem__(self, index):
        h, w = self.sizes[index]
        return torch.zeros(3, h, w), {"index": index, "boxes": torch.zeros(0, 4)}


def test_collate_keeps_lists():
    batch = [(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 2), {"a": 2})]
    images, targets = collate_fn(batch)
    assert isinstance(images, list) and [im.shape[1] for im in images] == [4, 6] and targets[1]["a"] == 2


def test_grouped_batches_are_homogeneous_and_complete():
    ds = _Toy()
    groups = aspect_ratio_group_ids(ds)
    assert set(groups) == {0, 1} and groups[0] == (0 if ds.sizes[0][1] < ds.sizes[0][0] else 1)
    sampler = GroupedBatchSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(0)), groups, 4)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert all(len(b) <= 4 for b in batches)
    concat = ConcatDataset([ds, Subset(ds, [0, 1])])
    assert aspect_ratio_group_ids(concat) == groups + groups[:2]
    dropped = GroupedBatchSampler(SequentialSampler(ds), groups, 4, drop_last=True)
    assert len(list(dropped)) == len(dropped) and all(len(b) == 4 for b in dropped)


def test_grouped_over_distributed_sampler_shards():
    ds = _Toy(30)
    groups = aspect_ratio_group_ids(ds)
    seen = []
    for rank in range(2):
        inner = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        sampler = GroupedBatchSampler(inner, groups, 3)
        sampler.set_epoch(2)
        batches = list(sampler)
        assert all(len({groups[i] for i in b}) == 1 for b in batches)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(30))


def test_build_data_loader_with_workers():
    ds = _Toy(10)
    loader = build_data_loader(ds, batch_size=2, num_workers=1, train=True, distributed=False,
                               aspect_ratio_grouping=True, seed=0)
    set_loader_epoch(loader, 1)
    indices = [t["index"] for images, targets in loader for t in targets]
    assert sorted(indices) == list(range(10))
    test_loader = build_data_loader(ds, batch_size=3, train=False)
    assert [t["index"] for _, targets in test_loader for t in targets] == list(range(10))


def test_inference_sampler_covers_each_item_once():
    shards = [list(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(InferenceSampler(2, rank=2, world_size=3)) == 0
