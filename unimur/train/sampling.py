"""Deterministic, resumable global batches split over ranks.

Global batch g of the run is a fixed function of (seed, g): indices come from a seeded
permutation of the dataset, one permutation per pass. Rank r of W takes the r-th slice of
the global batch. So one process with batch B sees exactly the samples that W processes see
with B/W each (the basis of the 1-process vs 2-process equivalence), and resuming at step g
needs no sampler state besides g.

With ``drop_last=False`` (validation over the whole set) the last global batch of a pass holds
the remainder, split over ranks in contiguous slices of near-equal size; rows that would leave
some rank without any (fewer remainder rows than ranks) are left out, so every rank joins
every collective.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, n_items: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_batch: int = 0, num_batches: int | None = None,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if n_items < (global_batch if drop_last else world_size):
            raise ValueError(f"dataset has {n_items} items, fewer than one global batch ({global_batch})")
        self.n_items, self.global_batch = n_items, global_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.start_batch = start_batch
        self.num_batches = num_batches
        remainder = n_items % global_batch
        if drop_last or remainder < world_size:
            self.batches_per_pass = n_items // global_batch  # incomplete last batch dropped
            self.n_used = self.batches_per_pass * global_batch
        else:
            self.batches_per_pass = n_items // global_batch + 1
            self.n_used = n_items
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
        end = min(start + self.global_batch, self.n_used)
        return self._permutation(pass_idx)[start:end].tolist()

    def local_indices(self, batch_idx: int) -> list[int]:
        idx = self.global_indices(batch_idx)
        # contiguous near-equal slices (equal for a full batch), in rank order
        base, extra = divmod(len(idx), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return idx[start : start + base + (self.rank < extra)]

    def __iter__(self):
        b = self.start_batch
        while self.num_batches is None or b < self.start_batch + self.num_batches:
            yield self.local_indices(b)
            b += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless sampler has no length")
        return self.num_batches
