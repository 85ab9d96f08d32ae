"""The one data-loading path: infinite seeded rank-sharded training stream, aspect-ratio grouped batches on
top, exact skip for resume, and the inference sampler (every item once over all ranks)."""
import itertools

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from resdet.config import load_config
from resdet.data import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_group_ids
from resdet.engine.builders import SeededDataset, build_test_loader, build_train_loader, collate, num_loader_workers


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


def _take(it, n):
    return list(itertools.islice(it, n))


def test_collate_keeps_lists():
    batch = [(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 2), {"a": 2})]
    images, targets = collate(batch)
    assert isinstance(images, list) and [im.shape[1] for im in images] == [4, 6] and targets[1]["a"] == 2


def test_training_stream_is_seeded_sharded_and_covers_each_epoch():
    full = _take(iter(TrainingSampler(7, seed=3)), 14)
    assert sorted(i for i, e in full[:7]) == list(range(7)) and {e for _, e in full[:7]} == {0}
    assert {e for _, e in full[7:]} == {1} and full[:7] != full[7:]  # a fresh permutation per epoch
    assert _take(iter(TrainingSampler(7, seed=3)), 14) == full  # seeded
    shards = [_take(iter(TrainingSampler(7, seed=3, rank=r, world_size=2)), 7) for r in range(2)]
    assert shards[0] == full[0:14:2] and shards[1] == full[1:14:2]  # ranks interleave the same stream


def test_grouped_batches_are_homogeneous_and_infinite():
    ds = _Toy()
    groups = aspect_ratio_group_ids(ds)
    assert set(groups) == {0, 1}
    batches = _take(iter(GroupedBatchSampler(TrainingSampler(len(ds), seed=0), groups, 4)), 30)  # > 5 epochs
    assert all(len(b) == 4 and len({groups[i] for i, _ in b}) == 1 for b in batches)
    assert len({i for b in batches for i, _ in b}) == len(ds)


def test_uneven_epochs_give_every_rank_the_same_batches():
    """12 images, 2 ranks, batch 2 with grouping: ranks never run out (no per-epoch batch count to differ)."""
    ds = _Toy(13)
    groups = aspect_ratio_group_ids(ds)
    per_rank = [_take(iter(GroupedBatchSampler(TrainingSampler(13, seed=1, rank=r, world_size=2), groups, 2)), 40)
                for r in range(2)]
    assert [len(p) for p in per_rank] == [40, 40]


def test_set_start_skips_exactly_the_done_batches():
    ds = _Toy()
    sampler = GroupedBatchSampler(TrainingSampler(len(ds), seed=5), aspect_ratio_group_ids(ds), 3)
    full = _take(iter(sampler), 20)
    sampler.set_start(7)
    assert _take(iter(sampler), 13) == full[7:]


def test_aspect_groups_through_subset_and_concat():
    ds = _Toy(6)
    assert aspect_ratio_group_ids(Subset(ds, [1, 2])) == aspect_ratio_group_ids(ds)[1:3]
    assert aspect_ratio_group_ids(ConcatDataset([ds, ds])) == aspect_ratio_group_ids(ds) * 2


def test_train_and_test_loaders_from_config():
    cfg = load_config(None, ["data.batch_size=2", "data.num_workers=1", "data.test_batch_size=3"])
    loader, batch_sampler, _ = build_train_loader(cfg, _Toy(), rank=0, world_size=1)
    batches = _take(iter(loader), 15)
    assert all(len({(t["index"] in {i for i, s in enumerate(_Toy().sizes) if s[0] < s[1]}) for t in targets}) == 1
               for _, targets in batches)  # grouped by orientation (on by default)
    cfg.data.aspect_ratio_grouping = False
    plain, _, _ = build_train_loader(cfg, _Toy(), rank=0, world_size=1)
    stream = [i for i, _ in _take(iter(TrainingSampler(23, seed=cfg.train.seed)), 10)]
    assert [t["index"] for _, ts in _take(iter(plain), 5) for t in ts] == stream
    shards = [[t["index"] for _, ts in build_test_loader(cfg, _Toy(10), rank=r, world_size=3) for t in ts]
              for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))  # each once, no padding duplicates


class _Noisy(Dataset):
    """Item i draws from the global torch, NumPy and Python generators (as augmentations do)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        import random
        return torch.rand(2).tolist() + [float(np.random.rand()), random.random()]


def test_seeded_items_repeat_and_leave_the_global_generators_alone():
    seeded = SeededDataset(_Noisy(), seed=5)
    torch.manual_seed(0)
    np.random.seed(0)
    expected = torch.rand(3), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    first = seeded[(1, 2)]
    assert (torch.equal(torch.rand(3), expected[0]), np.random.rand()) == (True, expected[1])
    assert seeded[(1, 2)] == first and seeded[(1, 3)] != first and seeded[(2, 2)] != first


def test_inference_sampler_covers_each_item_once():
    shards = [list(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert len(InferenceSampler(2, rank=2, world_size=3)) == 0


def test_workers_capped_to_available_cpus(monkeypatch, caplog):
    import resdet.engine.builders as b

    monkeypatch.setattr(b, "available_cpus", lambda: 2)
    b._warned_workers.clear()
    with caplog.at_level("WARNING", logger="resdet"):
        assert num_loader_workers(4) == 2 and num_loader_workers(4) == 2 and num_loader_workers(1) == 1
    assert sum("exceeds the 2 CPU" in r.getMessage() for r in caplog.records) == 1  # said once
