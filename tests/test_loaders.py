"""Training and evaluation samplers: disjoint shards, exact evaluation, length grouping."""
from __future__ import annotations

import pytest
import torch

from dist_finetune.data import ClassificationDataset, DataError, make_collate
from dist_finetune.loaders import LengthGroupedSampler, ShardedEvalSampler, eval_loader, train_loader


def tiny_dataset(n: int, lengths: list[int] | None = None) -> ClassificationDataset:
    """Example i holds token i + 1, repeated to its length (1 unless given)."""
    lengths = lengths or [1] * n
    return ClassificationDataset([[i + 1] * lengths[i] for i in range(n)], [i % 2 for i in range(n)],
                                 [str(i) for i in range(n)])


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("world_size", [2, 3])
def test_train_shards_disjoint_and_cover(world_size):
    ds = tiny_dataset(23)
    collate = make_collate("longest", 4)
    loaders = [train_loader(ds, 2, collate, rank, world_size, seed=5) for rank in range(world_size)]
    for epoch in (0, 1):
        shards = []
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
            shards.append(list(loader.sampler))
        flat = [i for shard in shards for i in shard]
        assert len(flat) == len(set(flat)) == (23 // world_size) * world_size
        assert set(flat) <= set(range(23))
        for loader, shard in zip(loaders, shards):
            seen = [ids[0] - 1 for batch in loader for ids in batch["input_ids"].tolist()]
            assert seen == shard[: len(shard) // 2 * 2]  # DataLoader drop_last trims the partial batch
            assert len(loader) == len(shard) // 2
    sampler = loaders[0].sampler
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0  # set_epoch reshuffles


def test_train_loader_needs_one_batch_per_rank():
    with pytest.raises(DataError, match="micro_batch_size"):
        train_loader(tiny_dataset(5), 4, make_collate("longest", 4), rank=0, world_size=2, seed=1)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 149])
def test_eval_sampler_visits_each_index_once(world_size, n):
    samplers = [ShardedEvalSampler(n, rank, world_size) for rank in range(world_size)]
    visited = [i for sampler in samplers for i in sampler]
    assert visited == list(range(n))  # contiguous shards, in rank order
    sizes = [len(sampler) for sampler in samplers]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_loader_covers_dataset(world_size):
    ds = tiny_dataset(7)
    collate = make_collate("fixed", 4)
    labels = []
    for rank in range(world_size):
        for batch in eval_loader(ds, 2, collate, rank, world_size):
            labels += batch["labels"].tolist()
    assert labels == ds.labels


def test_eval_sampler_rejects_bad_rank():
    with pytest.raises(ValueError):
        ShardedEvalSampler(5, rank=2, world_size=2)


# ---------------------------------------------------------------- length grouping


def padded_tokens(loader) -> int:
    return sum(batch["input_ids"].numel() for batch in loader)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_length_grouped_shards_are_disjoint_seeded_and_equal_in_count(world_size):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (211,), generator=g).tolist()
    samplers = [LengthGroupedSampler(lengths, 4, rank, world_size, seed=7) for rank in range(world_size)]
    for epoch in (0, 1):
        shards = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        flat = [i for shard in shards for i in shard]
        assert len(flat) == len(set(flat)) == (211 // (4 * world_size)) * 4 * world_size
        assert all(len(shard) == len(samplers[0]) for shard in shards)
        again = LengthGroupedSampler(lengths, 4, 0, world_size, seed=7)
        again.set_epoch(epoch)
        assert list(again) == shards[0]  # the same seed and epoch: the same order (what resume relies on)
    samplers[0].set_epoch(0)
    first = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != first
    other_seed = LengthGroupedSampler(lengths, 4, 0, world_size, seed=8)
    assert list(other_seed) != first


def test_length_grouping_cuts_padding_and_puts_the_longest_batch_first():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 60, (400,), generator=g).tolist()
    ds = tiny_dataset(400, lengths)
    collate = make_collate("longest", 64)
    plain = train_loader(ds, 8, collate, 0, 1, seed=3)
    grouped = train_loader(ds, 8, collate, 0, 1, seed=3, group_by_length=True)
    assert len(plain) == len(grouped) == 50
    assert padded_tokens(grouped) < 0.75 * padded_tokens(plain)
    real = sum(int(b["lengths"].sum()) for b in grouped)
    assert real == sum(int(b["lengths"].sum()) for b in plain) == sum(lengths)  # 400 = 50 x 8: nothing dropped
    first = next(iter(grouped))
    assert first["input_ids"].shape[1] == max(lengths)
    # Still shuffled: batch lengths do not come out sorted.
    widths = [b["input_ids"].shape[1] for b in grouped]
    assert widths != sorted(widths, reverse=True) and widths != sorted(widths)


def test_length_grouped_ranks_of_one_step_get_similar_lengths():
    lengths = [1 + (i * 37) % 97 for i in range(960)]
    loaders = [train_loader(tiny_dataset(960, lengths), 4, make_collate("longest", 128), rank, 2, seed=3,
                            group_by_length=True) for rank in range(2)]
    spreads = [abs(a["input_ids"].shape[1] - b["input_ids"].shape[1]) for a, b in zip(*loaders)]
    assert max(spreads) <= 10  # a window of 50 x 8 sorted examples spans ~1/2.4 of the length range
