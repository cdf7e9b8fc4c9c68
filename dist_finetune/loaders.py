"""Samplers and DataLoaders: training shards (shuffled, or grouped by length) and exact evaluation shards.

Every training sampler gives each rank the same number of micro-batches, is seeded by (seed, epoch)
and is the same on every rank apart from the slice it yields, so the ranks stay in step and a resume
replays the same order.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .data import DataError

# Length-grouped batches are formed inside windows of this many global micro-batches, so the
# grouping stays random across the epoch (as Hugging Face's megabatches of 50).
GROUP_WINDOW = 50


class ShardedEvalSampler(Sampler[int]):
    """Contiguous shards, sizes differing by at most one, no padding duplicates.

    Contiguous (not strided) so that per-rank outputs concatenated in rank order are in dataset order.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size or dataset_len < 0:
            raise ValueError(
                f"need 0 <= rank < world_size and dataset_len >= 0, got rank={rank}, "
                f"world_size={world_size}, dataset_len={dataset_len}"
            )
        base, extra = divmod(dataset_len, world_size)
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (1 if rank < extra else 0)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class LengthGroupedSampler(Sampler[int]):
    """Micro-batches of similar lengths, sharded by rank; with per-batch padding, little padding.

    Each epoch: shuffle (seed + epoch), cut into windows of GROUP_WINDOW global micro-batches, sort
    each window by length, cut it into global micro-batches (micro x world examples of similar length,
    so the ranks of one step also get similar lengths), shuffle those, and put the one holding the
    longest example first (an out-of-memory error then shows at the first step). Rank r yields the
    r-th slice of every global micro-batch. Incomplete global micro-batches are dropped, as
    DistributedSampler(drop_last=True) with a drop_last DataLoader drops them.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, rank: int, world_size: int, seed: int) -> None:
        super().__init__()
        self.lengths = list(lengths)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_batches = len(self.lengths) // (batch_size * world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def global_batches(self) -> list[list[int]]:
        """This epoch's global micro-batches (the same list on every rank)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        step = self.batch_size * self.world_size
        order = torch.randperm(len(self.lengths), generator=g).tolist()[: self.num_batches * step]
        batches: list[list[int]] = []
        for start in range(0, len(order), step * GROUP_WINDOW):
            window = sorted(order[start:start + step * GROUP_WINDOW], key=lambda i: -self.lengths[i])
            batches += [window[j:j + step] for j in range(0, len(window), step)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self):
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches():
            yield from batch[lo:hi]


def train_loader(
    ds: Dataset,
    batch_size: int,
    collate: Callable,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    group_by_length: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    per_rank = len(ds) // world_size
    if per_rank < batch_size:
        raise DataError(
            f"the training split has {len(ds)} examples: over {world_size} process(es) that is {per_rank} "
            f"each, less than one micro-batch of {batch_size}. Lower train.micro_batch_size, use fewer "
            "processes, or add training data."
        )
    if group_by_length:
        lengths = [len(ids) for ids in ds.token_ids]
        sampler: Sampler[int] = LengthGroupedSampler(lengths, batch_size, rank, world_size, seed)
    else:
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Its own generator: each `iter(loader)` draws a worker seed, and from the global RNG that draw would
    # shift every later dropout mask of a resumed run (whose RNG was restored mid-epoch).
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers, drop_last=True,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(
    ds: Dataset,
    batch_size: int,
    collate: Callable,
    rank: int,
    world_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    sampler = ShardedEvalSampler(len(ds), rank, world_size)
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers, drop_last=False,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
    )
