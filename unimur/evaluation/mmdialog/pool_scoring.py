"""Per-query candidate pools and their scores (MMDialog's protocol: each dialogue has its own
pool of negatives plus its ground truth): the layout, the chunked cosine scoring, ranks and top-1."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from unimur.ranking import ranks_in_pools

# Gathered pool embeddings scored at once: [chunk, P, E] floats (~128 MB at this size).
_GATHER_ELEMENTS = 1 << 25


@dataclass
class Pools:
    """Per-query candidate pools padded to a common width P.

    index:    [Q, P] int64 row of each candidate in its embedding table (0 at padding).
    positive: [Q, P] bool, True at ground-truth elements (the last columns of each pool).
    valid:    [Q, P] bool, False at padding.
    """

    index: Tensor
    positive: Tensor
    valid: Tensor

    @classmethod
    def build(cls, negatives: Sequence[Sequence[int]], positives: Sequence[Sequence[int]]
              ) -> "Pools":
        """Pools laid out as negatives then positives (ties count against the positives)."""
        rows = [list(n) + list(p) for n, p in zip(negatives, positives)]
        width = max((len(r) for r in rows), default=0)
        index = torch.zeros(len(rows), width, dtype=torch.long)
        positive = torch.zeros(len(rows), width, dtype=torch.bool)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for q, (row, pos) in enumerate(zip(rows, positives)):
            index[q, :len(row)] = torch.tensor(row, dtype=torch.long)
            valid[q, :len(row)] = True
            positive[q, len(row) - len(pos):len(row)] = True
        return cls(index, positive, valid)

    def sizes(self) -> dict[str, float]:
        n = self.valid.sum(dim=1).float()
        if n.numel() == 0:
            return {"min": 0, "mean": 0.0, "max": 0}
        return {"min": int(n.min()), "mean": round(float(n.mean()), 2), "max": int(n.max())}


@torch.no_grad()
def _pool_scores(u: Tensor, table: Tensor, pools: Pools) -> Tensor:
    """Cosine of each query with each of its pool's candidates.

    Args:
        u: [Q, E] normalised query embeddings.
        table: [N, E] normalised candidate embeddings; ``pools.index`` points into it.
    Returns:
        [Q, P] float32 scores, -inf at padding. Computed by gathering [chunk, P, E] candidate
        rows (pools are per query, so a shared [Q, N] matrix would mostly be wasted work).
    """
    q_total, width = pools.index.shape
    out = torch.full((q_total, width), float("-inf"))
    if width == 0 or q_total == 0:
        return out
    chunk = max(1, _GATHER_ELEMENTS // (width * table.shape[1]))
    for s in range(0, q_total, chunk):
        rows = table[pools.index[s:s + chunk]].float()                  # [c, P, E]
        out[s:s + chunk] = torch.einsum("ce,cpe->cp", u[s:s + chunk].float(), rows)
    return out.masked_fill_(~pools.valid, float("-inf"))


@dataclass
class Scored:
    """One modality's scores and ranks.

    scores: [Q, P] (-inf at padding); ranks: [num gt elements] aligned with
    ``pools.positive.nonzero()``; top_score / top_col: [Q] best score and its pool column.
    """

    pools: Pools
    scores: Tensor
    ranks: Tensor
    top_score: Tensor
    top_col: Tensor

    @classmethod
    def compute(cls, u: Tensor, table: Tensor, pools: Pools) -> "Scored":
        return cls.from_scores(_pool_scores(u, table, pools), pools)

    @classmethod
    def from_scores(cls, scores: Tensor, pools: Pools) -> "Scored":
        """From [Q, P] scores in pool layout (-inf at padding)."""
        scores = scores.masked_fill(~pools.valid, float("-inf"))
        ranks = ranks_in_pools(scores, pools.positive, pools.valid)
        if scores.shape[1]:
            top_score, top_col = scores.max(dim=1)  # first maximum: ties -> lower column
        else:
            top_score = torch.full((scores.shape[0],), float("-inf"))
            top_col = torch.zeros(scores.shape[0], dtype=torch.long)
        return cls(pools, scores, ranks, top_score, top_col)

    def has_output(self) -> Tensor:
        """[Q] bool: the pool is not empty, so there is a top-1 to output."""
        return self.pools.valid.any(dim=1)

    def top_rows(self) -> Tensor:
        """[Q] table row of each query's top-1 candidate (meaningless where not has_output)."""
        return self.pools.index.gather(1, self.top_col[:, None])[:, 0]

    def ranks_per_query(self) -> list[list[int]]:
        rows = self.pools.positive.nonzero()[:, 0].tolist()
        out: list[list[int]] = [[] for _ in range(self.scores.shape[0])]
        for r, rank in zip(rows, self.ranks.tolist()):
            out[r].append(rank)
        return out
