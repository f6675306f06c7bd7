"""Deterministic, resumable global batches split over ranks.

Global batch g of the run is a fixed function of (seed, g): indices come from a seeded
permutation of the dataset, one permutation per pass. Rank r of W takes the r-th slice of
the global batch. So one process with batch B sees exactly the samples that W processes see
with B/W each (the basis of the 1-process vs 2-process equivalence), and resuming at step g
needs no sampler state besides g.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, n_items: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_batch: int = 0, num_batches: int | None = None,
                 shuffle: bool = True):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if n_items < global_batch:
            raise ValueError(f"dataset has {n_items} items, fewer than one global batch ({global_batch})")
        self.n_items, self.global_batch = n_items, global_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.start_batch = start_batch
        self.num_batches = num_batches
        self.batches_per_pass = n_items // global_batch  # incomplete last batch dropped
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    def _permutation(self, pass_idx: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != pass_idx:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_idx)
                perm = torch.randperm(self.n_items, generator=g)
            else:
                perm = torch.arange(self.n_items)
            self._perm_cache = (pass_idx, perm)
        return self._perm_cache[1]

    def global_indices(self, batch_idx: int) -> list[int]:
        """All indices of global batch `batch_idx` (rank order)."""
        pass_idx, within = divmod(batch_idx, self.batches_per_pass)
        start = within * self.global_batch
        return self._permutation(pass_idx)[start : start + self.global_batch].tolist()

    def local_indices(self, batch_idx: int) -> list[int]:
        per_rank = self.global_batch // self.world_size
        idx = self.global_indices(batch_idx)
        return idx[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self):
        b = self.start_batch
        while self.num_batches is None or b < self.start_batch + self.num_batches:
            yield self.local_indices(b)
            b += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless sampler has no length")
        return self.num_batches
