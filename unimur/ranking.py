"""The one retrieval core: exact top-k, ranks of ground truth, and recall metrics.

Pure functions on torch tensors (features or similarities in, tensors or numbers out).
Every evaluation script and the retrieval API go through these, so the conventions below
hold everywhere and recall@k is written exactly once.

Conventions (fixed here, SPEC section 4):

* Scores are dot products accumulated in float32. Callers L2-normalise features first when
  they want cosine similarity.
* Ties: among equal scores the **lower index ranks first**. Results therefore equal
  ``torch.argsort(-scores, dim=1, stable=True)`` of the full score matrix, are deterministic,
  and do not depend on chunk sizes or devices. NaN scores rank last (as in that argsort).
* Ranks are **1-based** (rank 1 = retrieved first).
* A positive's rank is ``1 + #(scores strictly greater) + #(equal scores at a lower index)``,
  i.e. its position in the stable argsort above. In pools with several ground-truth items
  (:func:`ranks_in_pools`) the *other* positives are not counted as ahead of it (each
  ground-truth element is ranked against the negatives only).
* :func:`recall_metrics`: ``R@k`` in **percent (0-100)**; ``MRR`` as a **fraction (0-1)**, the
  VisDial convention (e.g. "R@1 55.2, MRR 0.689"); ``mean_rank``/``median_rank`` in ranks.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "topk_chunked",
    "ranks_of_positives",
    "ranks_from_sim",
    "ranks_in_pools",
    "hits_at_k",
    "recall_metrics",
]

# A (score, index) pair is packed into one int64 sort key so that a single integer top-k
# yields score-descending / index-ascending order exactly: the high 32 bits are the float32
# score mapped to an order-preserving int32, the low 32 bits are (2^32 - 1 - index).
# Keys are unique, so merging running top-k lists across chunks is exact and
# order-independent; torch.topk's unspecified tie order never matters.
_LOW32 = 0xFFFFFFFF
_ABS31 = 0x7FFFFFFF
_INT32_MIN = -(2**31)
_MAX_INDEX = 2**32 - 1


def _float_to_ordered_int(scores: Tensor) -> Tensor:
    """float32 [...] -> int32 [...] with the same order (NaN lowest, -0.0 == +0.0).

    Consumes ``scores`` (modified in place) to avoid a second full-size buffer.
    """
    nan = torch.isnan(scores)
    scores.add_(0.0)  # -0.0 + 0.0 == +0.0: both zeros get one key, as they compare equal
    bits = scores.view(torch.int32)
    # Negative floats order backwards as signed ints; flipping their 31 magnitude bits fixes it.
    bits ^= (bits >> 31) & _ABS31
    if nan.any():
        bits.masked_fill_(nan, _INT32_MIN)  # below -inf, like NaN at the end of argsort
    return bits


def _ordered_int_to_float(keys32: Tensor) -> Tensor:
    """Inverse of :func:`_float_to_ordered_int` (int32 [...] -> float32 [...])."""
    bits = keys32 ^ ((keys32 >> 31) & _ABS31)
    return bits.view(torch.float32)


def _encode_keys(scores: Tensor, ids: Tensor) -> Tensor:
    """float32 scores [q, c] with int64 index ids [q, c] (or [1, c]) -> unique int64 keys [q, c].

    Consumes ``scores``.
    """
    keys = _float_to_ordered_int(scores).to(torch.int64)
    keys <<= 32
    keys += _MAX_INDEX - ids  # lower index -> larger key -> ranks first among equal scores
    return keys


def _block_topk_keys(scores: Tensor, offset: int, k: int) -> Tensor:
    """Exact top-k keys [q, min(k, c)] of one float32 score block [q, c] (index ids from offset).

    A float top-(k+1) does the heavy lifting. Its k best are exact unless the k-th and
    (k+1)-th values are equal (tied scores straddle the cut and torch.topk picks among them
    in no specified order) or NaNs are involved (torch.topk ranks NaN first; we rank it last).
    Only those rows are re-ranked with full int64 keys, so typical data pays for one float
    top-k per block instead of an int64 copy of it. Consumes ``scores``.
    """
    c = scores.shape[1]
    ids = torch.arange(offset, offset + c, device=scores.device, dtype=torch.int64)
    if k >= c:  # the whole block survives; the merge orders it
        return _encode_keys(scores, ids[None, :])
    values, cols = scores.topk(k + 1, dim=1, sorted=True)  # [q, k+1]
    slow = (values[:, k - 1] == values[:, k]) | torch.isnan(values).any(dim=1)
    keys = _encode_keys(values[:, :k].contiguous(), cols[:, :k] + offset)
    if slow.any():
        keys[slow] = _encode_keys(scores[slow], ids[None, :]).topk(k, dim=1).values
    return keys


def _decode_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """int64 keys [q, k] -> (float32 scores [q, k], int64 indices [q, k])."""
    scores = _ordered_int_to_float((keys >> 32).to(torch.int32))
    indices = _MAX_INDEX - (keys & _LOW32)
    return scores, indices


def _check_features(queries: Tensor, index: Tensor) -> None:
    if queries.dim() != 2 or index.dim() != 2:
        raise ValueError(f"expected 2-D queries [Q,D] and index [N,D], got {tuple(queries.shape)} "
                         f"and {tuple(index.shape)}")
    if queries.shape[1] != index.shape[1]:
        raise ValueError(f"feature dims differ: queries D={queries.shape[1]}, index D={index.shape[1]}")
    if index.shape[0] == 0:
        raise ValueError("empty index")
    if index.shape[0] > _MAX_INDEX:
        raise ValueError(f"index too large for 32-bit ids: N={index.shape[0]}")


def _chunk_scores(q: Tensor, index: Tensor, start: int, stop: int) -> Tensor:
    """float32 [q, stop-start] dot products of a query block with index rows start..stop-1.

    The index block is moved to the queries' device, so a CPU-resident index can be streamed
    through a GPU chunk by chunk.
    """
    block = index[start:stop].to(device=q.device, dtype=torch.float32, non_blocking=True)
    return q @ block.T


@torch.no_grad()
def topk_chunked(
    queries: Tensor,
    index: Tensor,
    k: int,
    *,
    index_chunk: int = 65536,
    query_chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``queries @ index.T`` without materialising the full [Q, N] matrix.

    Args:
        queries: [Q, D] query features (any float dtype, any device).
        index: [N, D] candidate features (may live on another device than ``queries``).
        k: number of results; clamped to N.
        index_chunk: index rows scored at once (memory ~ 4 bytes * query_chunk * index_chunk,
            plus 12 bytes per element for rows whose k-th score is tied).
        query_chunk: queries scored at once.

    Returns:
        scores: [Q, min(k, N)] float32, descending per row.
        indices: [Q, min(k, N)] int64 row ids into ``index``; equal scores are ordered by
            ascending index, so ``indices == torch.argsort(-(queries @ index.T), dim=1,
            stable=True)[:, :k]`` (up to float rounding differences between matmul shapes).
        Both on ``queries.device``.
    """
    _check_features(queries, index)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if index_chunk < 1 or query_chunk < 1:
        raise ValueError("chunk sizes must be >= 1")
    n_index = index.shape[0]
    k = min(k, n_index)

    out_keys = []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs:qs + query_chunk].float()  # accumulate in float32 whatever the input dtype
        best = None  # running top-k keys [q, <=k], merged chunk by chunk
        for start in range(0, n_index, index_chunk):
            stop = min(start + index_chunk, n_index)
            keys = _block_topk_keys(_chunk_scores(q, index, start, stop), start, k)
            if best is not None:
                keys = torch.cat([best, keys], dim=1)
            best = keys.topk(min(k, keys.shape[1]), dim=1, sorted=True).values
        out_keys.append(best)

    if not out_keys:  # Q == 0
        empty = torch.empty(0, k, device=queries.device)
        return empty, empty.long()
    return _decode_keys(torch.cat(out_keys, dim=0))


def _ahead(scores: Tensor, pos_scores: Tensor, lower: Tensor) -> Tensor:
    """Bool mask of entries that rank ahead of a positive under the module's order.

    Args:
        scores: [r, c] candidate scores.
        pos_scores: [r, 1] the positive's score per row.
        lower: bool broadcastable to [r, c], True where the candidate's index is lower than
            the positive's.
    """
    ahead = (scores > pos_scores) | ((scores == pos_scores) & lower)
    nan_pos = torch.isnan(pos_scores)
    if nan_pos.any():  # NaN ranks last: after every number, and after NaNs at a lower index
        ahead |= nan_pos & (~torch.isnan(scores) | lower)
    return ahead


def _count_ahead(scores: Tensor, pos_scores: Tensor, pos_ids: Tensor, offset: int) -> Tensor:
    """Per row, how many entries of a score block rank ahead of the row's positive.

    Args:
        scores: [q, c] float32 scores of index ids offset..offset+c-1.
        pos_scores: [q] score of each row's positive.
        pos_ids: [q] global index of each row's positive.

    Returns:
        [q] int64 count of entries with a greater score, or an equal score at a lower index.
        The positive itself is excluded explicitly: its score here may differ from
        ``pos_scores`` by float rounding (different matmul shapes), and it must never be
        counted as ahead of itself.
    """
    ids = torch.arange(offset, offset + scores.shape[1], device=scores.device)[None, :]
    ahead = _ahead(scores, pos_scores[:, None], ids < pos_ids[:, None])
    ahead &= ids != pos_ids[:, None]
    return ahead.sum(dim=1)


@torch.no_grad()
def ranks_of_positives(
    queries: Tensor,
    index: Tensor,
    positives: Tensor,
    *,
    index_chunk: int = 65536,
    query_chunk: int = 1024,
) -> Tensor:
    """1-based rank of each query's single positive in a shared index, chunked.

    Args:
        queries: [Q, D] query features.
        index: [N, D] candidate features.
        positives: [Q] int64 row id in ``index`` of each query's ground truth.

    Returns:
        [Q] int64 ranks on ``queries.device``: position of the positive in the stable
        argsort of the full score row (ties: lower index first). Memory is bounded like
        :func:`topk_chunked`. The positive's own score comes from an elementwise product, so
        a candidate within float rounding of it may be ordered differently than by the
        chunked matmul; the positive itself is never counted ahead of itself.
    """
    _check_features(queries, index)
    positives = positives.to(device=queries.device, dtype=torch.int64)
    if positives.shape != (queries.shape[0],):
        raise ValueError(f"positives must be [Q]={queries.shape[0]}, got {tuple(positives.shape)}")
    if positives.numel() and (positives.min() < 0 or positives.max() >= index.shape[0]):
        raise ValueError("positive ids out of range of the index")

    ranks = []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs:qs + query_chunk].float()
        pos = positives[qs:qs + query_chunk]
        pos_feats = index[pos.to(index.device)].to(device=q.device, dtype=torch.float32)
        pos_scores = (q * pos_feats).sum(dim=1)  # [q]
        ahead = torch.zeros_like(pos)
        for start in range(0, index.shape[0], index_chunk):
            stop = min(start + index_chunk, index.shape[0])
            ahead += _count_ahead(_chunk_scores(q, index, start, stop), pos_scores, pos, start)
        ranks.append(ahead + 1)
    return torch.cat(ranks) if ranks else positives.new_empty(0)


@torch.no_grad()
def ranks_from_sim(sim: Tensor, positives: Tensor) -> Tensor:
    """1-based rank of each row's positive in a full similarity matrix.

    For retrieval in the other direction pass ``sim.T`` (e.g. VisDial image->dialogue:
    ``ranks_from_sim(sim.T, torch.arange(n))`` where ``sim`` is [dialogues, images]).

    Args:
        sim: [Q, N] similarity scores.
        positives: [Q] int64 column of each row's positive.

    Returns:
        [Q] int64 ranks: ``1 + #(greater) + #(equal at a lower column)``.
    """
    if sim.dim() != 2:
        raise ValueError(f"expected a 2-D [Q,N] matrix, got {tuple(sim.shape)}")
    sim = sim.float()
    positives = positives.to(device=sim.device, dtype=torch.int64)
    if positives.shape != (sim.shape[0],):
        raise ValueError(f"positives must be [Q]={sim.shape[0]}, got {tuple(positives.shape)}")
    pos_scores = sim.gather(1, positives[:, None])[:, 0]
    return _count_ahead(sim, pos_scores, positives, 0) + 1


@torch.no_grad()
def ranks_in_pools(
    sim: Tensor,
    positive_mask: Tensor,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """1-based rank of every ground-truth element in per-query candidate pools.

    Used for MMDialog-style pools (each query has its own pool: its ground-truth elements plus
    negatives). Each positive is ranked against the **negatives only**: other positives of the
    same query are never counted as ahead of it, so a query with two ground-truth texts
    ranked 1st and 2nd gets ranks [1, 1]. Ties with negatives: a negative at a lower pool
    column ranks first (same rule as everywhere in this module).

    Args:
        sim: [Q, P] scores of each query against its pool (padded to a common P).
        positive_mask: [Q, P] bool, True at ground-truth elements.
        valid_mask: [Q, P] bool, False at padding (ignored entirely); default all valid.

    Returns:
        [num_positives] int64 ranks in row-major order of ``positive_mask``, i.e. aligned
        with ``positive_mask.nonzero()``. Per-element hit@k = ``ranks <= k``; the SPEC's
        "overall R@k" is ``recall_metrics(torch.cat([text_ranks, image_ranks]))``.
    """
    if sim.dim() != 2 or positive_mask.shape != sim.shape:
        raise ValueError(f"sim [Q,P] and positive_mask must match, got {tuple(sim.shape)} "
                         f"and {tuple(positive_mask.shape)}")
    positive_mask = positive_mask.to(device=sim.device, dtype=torch.bool)
    if valid_mask is None:
        valid_mask = torch.ones_like(positive_mask)
    else:
        valid_mask = valid_mask.to(device=sim.device, dtype=torch.bool)
        if valid_mask.shape != sim.shape:
            raise ValueError("valid_mask must have the shape of sim")
        if (positive_mask & ~valid_mask).any():
            raise ValueError("a positive lies in a padded (invalid) pool slot")

    rows, cols = positive_mask.nonzero(as_tuple=True)  # [num_positives] each
    sim = sim.float()
    row_scores = sim[rows]  # [num_positives, P]: one row per ground-truth element
    negatives = valid_mask[rows] & ~positive_mask[rows]
    pos_scores = sim[rows, cols][:, None]
    ids = torch.arange(sim.shape[1], device=sim.device)[None, :]
    ahead = _ahead(row_scores, pos_scores, ids < cols[:, None])
    return (ahead & negatives).sum(dim=1) + 1


def hits_at_k(ranks: Tensor, k: int) -> Tensor:
    """[n] 1-based ranks -> [n] bool, True where the element is in the top k."""
    return ranks <= k


def recall_metrics(ranks: Tensor, ks: Sequence[int] = (1, 5, 10), missed: Tensor | None = None
                   ) -> dict[str, float | int]:
    """Summary metrics of 1-based ranks.

    Args:
        ranks: [n] 1-based ranks (any integer or float tensor; all values >= 1).
        ks: cut-offs for recall.
        missed: [n] bool, elements the system did not output at all (FROMAGe's responses
            without an image): never a hit at any k and 0 in the MRR, whatever their rank
            (which only enters the mean and median rank; callers give pool size + 1).

    Returns:
        ``{"R@k": percent 0-100 for each k, "MRR": mean of 1/rank as a fraction 0-1,
        "mean_rank": float, "median_rank": float (mean of the two middle ranks when n is
        even), "n": number of ranks}``. With n == 0 every metric is NaN.
    """
    ranks = ranks.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    n = ranks.numel()
    if n == 0:
        logger.warning("recall_metrics called with no ranks; returning NaN metrics")
        nan = float("nan")
        return {**{f"R@{k}": nan for k in ks}, "MRR": nan, "mean_rank": nan,
                "median_rank": nan, "n": 0}
    if ranks.min() < 1:
        raise ValueError("ranks are 1-based; got a value < 1")
    shown = torch.ones(n, dtype=torch.bool) if missed is None else ~missed.detach().reshape(-1).cpu().bool()
    if shown.numel() != n:
        raise ValueError(f"missed has {shown.numel()} entries for {n} ranks")
    metrics: dict[str, float | int] = {
        f"R@{k}": 100.0 * (hits_at_k(ranks, k) & shown).double().mean().item() for k in ks
    }
    metrics["MRR"] = (ranks.reciprocal() * shown).mean().item()
    metrics["mean_rank"] = ranks.mean().item()
    metrics["median_rank"] = ranks.quantile(0.5).item()  # linear: averages the middle pair
    metrics["n"] = n
    return metrics
