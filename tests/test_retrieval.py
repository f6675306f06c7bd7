"""unimur.ranking against brute-force references and hand-computed numbers.

Features are small integers (exact in float32/float16/bfloat16 dot products), so every
matmul shape gives bit-identical scores and the many ties are real ties: exact equality
with the full-matrix stable argsort is then a fair requirement.
"""
from __future__ import annotations

import math

import pytest
import torch

from unimur.ranking import (
    hits_at_k,
    ranks_from_sim,
    ranks_in_pools,
    ranks_of_positives,
    recall_metrics,
    topk_chunked,
)


def _int_features(n: int, d: int, seed: int, low: int = -2, high: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, d), generator=g).float()


def _reference_order(queries: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[Q, N] full stable argsort: score descending, lower index first among ties."""
    return torch.argsort(-(queries.float() @ index.float().T), dim=1, stable=True)


def _reference_ranks(queries: torch.Tensor, index: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    order = _reference_order(queries, index)
    return (order == positives[:, None]).float().argmax(dim=1) + 1


# ---------------------------------------------------------------- topk_chunked

@pytest.mark.parametrize("index_chunk,query_chunk", [(1, 64), (64, 1), (7, 9), (299, 3), (65536, 1024)])
@pytest.mark.parametrize("k", [1, 5, 20, 299, 300, 1000])
def test_topk_equals_full_argsort(index_chunk: int, query_chunk: int, k: int) -> None:
    queries, index = _int_features(37, 6, seed=0), _int_features(300, 6, seed=1)
    scores, indices = topk_chunked(queries, index, k, index_chunk=index_chunk, query_chunk=query_chunk)
    ref = _reference_order(queries, index)[:, :k]  # k >= N clamps to N
    assert indices.shape == ref.shape == (37, min(k, 300))
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert torch.equal(indices, ref)
    assert torch.equal(scores, (queries @ index.T).gather(1, ref))


@pytest.mark.parametrize("index_chunk", [50, 128, 1000])
def test_topk_mostly_distinct_scores(index_chunk: int) -> None:
    # Wide-range integers: mostly distinct (still exact) scores, so the per-block float top-k
    # path is taken for most rows and the tie re-ranking for a few duplicated ones.
    queries = _int_features(40, 4, seed=20, low=-1000, high=1000)
    index = _int_features(1000, 4, seed=21, low=-1000, high=1000)
    index[500:510] = index[10:20]  # exact ties across blocks
    for k in (1, 3, 12):
        scores, indices = topk_chunked(queries, index, k, index_chunk=index_chunk, query_chunk=16)
        ref = _reference_order(queries, index)[:, :k]
        assert torch.equal(indices, ref) and torch.equal(scores, (queries @ index.T).gather(1, ref))


def test_topk_ties_from_duplicated_rows() -> None:
    base = _int_features(50, 8, seed=2)
    # Every row three times, interleaved so duplicates straddle chunk borders.
    index = torch.cat([base, base.flip(0), base])[torch.randperm(150, generator=torch.Generator().manual_seed(3))]
    queries = torch.cat([_int_features(20, 8, seed=4), index[:5]])
    for index_chunk in (4, 13, 150):
        _, indices = topk_chunked(queries, index, 10, index_chunk=index_chunk, query_chunk=6)
        assert torch.equal(indices, _reference_order(queries, index)[:, :10])


def test_topk_all_scores_equal_returns_lowest_indices() -> None:
    queries, index = torch.zeros(3, 4), torch.randn(100, 4)
    _, indices = topk_chunked(queries, index, 7, index_chunk=9)
    assert torch.equal(indices, torch.arange(7).expand(3, 7))


def test_topk_signed_zero_and_nan_order_like_argsort() -> None:
    # Scores for query 0: [+0, -0, +0, nan, -1]; -0.0 == +0.0 ties by index, NaN last.
    queries = torch.tensor([[-1.0, -1.0]])
    index = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0], [float("nan"), 0.0], [0.5, 0.5]])
    scores, indices = topk_chunked(queries, index, 5, index_chunk=2)
    assert indices.tolist() == [[0, 1, 2, 4, 3]] == _reference_order(queries, index).tolist()
    assert scores[0, :4].tolist() == [0.0, 0.0, 0.0, -1.0] and math.isnan(scores[0, 4].item())
    # NaN rows inside large blocks with k < block size (NaN must not win a float top-k).
    queries, index = _int_features(6, 3, seed=22), _int_features(40, 3, seed=23)
    index[[0, 7, 31]] = float("nan")
    for k in (2, 38, 40):
        _, indices = topk_chunked(queries, index, k, index_chunk=16)
        assert torch.equal(indices, _reference_order(queries, index)[:, :k])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_topk_low_precision_inputs_accumulate_in_float32(dtype: torch.dtype) -> None:
    queries, index = _int_features(10, 16, seed=5), _int_features(200, 16, seed=6)
    scores, indices = topk_chunked(queries.to(dtype), index.to(dtype), 15, index_chunk=33)
    assert scores.dtype == torch.float32
    assert torch.equal(indices, _reference_order(queries, index)[:, :15])


def test_topk_edge_cases() -> None:
    index = _int_features(5, 3, seed=7)
    scores, indices = topk_chunked(torch.empty(0, 3), index, 4)
    assert scores.shape == indices.shape == (0, 4)
    with pytest.raises(ValueError):
        topk_chunked(torch.ones(1, 3), index, 0)
    with pytest.raises(ValueError):
        topk_chunked(torch.ones(1, 4), index, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_topk_cuda_matches_cpu_with_cpu_index() -> None:
    queries, index = _int_features(30, 8, seed=8), _int_features(500, 8, seed=9)
    _, cpu = topk_chunked(queries, index, 12, index_chunk=77)
    _, gpu = topk_chunked(queries.cuda(), index, 12, index_chunk=77)  # index streamed to GPU
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


# ---------------------------------------------------------------- ranks

@pytest.mark.parametrize("index_chunk,query_chunk", [(1, 64), (64, 1), (7, 9), (10_000, 10_000)])
def test_ranks_of_positives_equal_argsort_ranks(index_chunk: int, query_chunk: int) -> None:
    index = _int_features(250, 5, seed=10)
    queries = torch.cat([_int_features(40, 5, seed=11), index[:10]])  # many exact ties
    positives = torch.randint(0, 250, (50,), generator=torch.Generator().manual_seed(12))
    ranks = ranks_of_positives(queries, index, positives, index_chunk=index_chunk, query_chunk=query_chunk)
    assert ranks.dtype == torch.int64
    assert torch.equal(ranks, _reference_ranks(queries, index, positives))


def test_ranks_agree_with_topk() -> None:
    queries, index = _int_features(25, 4, seed=13), _int_features(120, 4, seed=14)
    _, top = topk_chunked(queries, index, 120, index_chunk=17)
    positives = top[:, 6]  # the 7th retrieved item has rank 7 by definition
    assert ranks_of_positives(queries, index, positives, index_chunk=17).tolist() == [7] * 25


def test_ranks_from_sim_both_directions() -> None:
    queries, index = _int_features(60, 5, seed=15), _int_features(60, 5, seed=16)
    sim = queries @ index.T
    diag = torch.arange(60)
    assert torch.equal(ranks_from_sim(sim, diag), _reference_ranks(queries, index, diag))
    assert torch.equal(ranks_from_sim(sim.T, diag), _reference_ranks(index, queries, diag))


def test_ranks_from_sim_hand_example() -> None:
    sim = torch.tensor([[0.9, 0.5, 0.9],
                        [0.1, 0.2, 0.3]])
    # row 0: positive col 2 ties col 0 (lower index wins) -> rank 2; row 1: lowest -> rank 3.
    assert ranks_from_sim(sim, torch.tensor([2, 0])).tolist() == [2, 3]
    assert ranks_from_sim(sim, torch.tensor([0, 2])).tolist() == [1, 1]


def test_ranks_nan_scores_rank_last_like_argsort() -> None:
    sim = torch.tensor([[float("nan"), 1.0, float("nan"), 0.0]])
    # argsort(-sim, stable) = [1, 3, 0, 2]
    ranks = [ranks_from_sim(sim, torch.tensor([p])).item() for p in range(4)]
    assert ranks == [3, 1, 4, 2]
    pools = ranks_in_pools(sim, torch.tensor([[True, False, False, False]]))
    assert pools.tolist() == [3]  # behind 1.0 and 0.0; the NaN at col 2 is at a higher index


# ---------------------------------------------------------------- multi-positive pools

def test_ranks_in_pools_hand_example() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.95, 0.99],
                        [0.5, 0.5, 0.1, 0.5, 0.6]])
    positive = torch.tensor([[1, 0, 1, 0, 0],
                             [0, 1, 0, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 0],  # col 4 of row 0 is padding (its 0.99 is ignored)
                          [1, 1, 1, 1, 1]], dtype=torch.bool)
    # Row 0 negatives {0.8@1, 0.95@3}: pos 0.9@0 -> behind 0.95 -> 2; pos 0.7@2 -> 3
    #   (the other positive 0.9 is not counted).
    # Row 1 negatives {0.5@0, 0.1@2, 0.6@4}: pos 0.5@1 -> behind 0.6 and the tie at col 0 -> 3;
    #   pos 0.5@3 -> same two negatives ahead, positive 0.5@1 not counted -> 3.
    ranks = ranks_in_pools(sim, positive, valid)
    assert ranks.tolist() == [2, 3, 3, 3]
    # Without the padding mask the 0.99 counts as a negative ahead of both row-0 positives.
    assert ranks_in_pools(sim, positive).tolist() == [3, 4, 3, 3]


def test_ranks_in_pools_positives_do_not_block_each_other() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    positive = torch.tensor([[True, True, False, False]])
    assert ranks_in_pools(sim, positive).tolist() == [1, 1]


def test_ranks_in_pools_equal_brute_force() -> None:
    g = torch.Generator().manual_seed(17)
    sim = torch.randint(0, 6, (30, 40), generator=g).float()
    positive = torch.rand(30, 40, generator=g) < 0.1
    positive[:, 0] = True
    ranks = ranks_in_pools(sim, positive)
    expected = []
    for row, col in positive.nonzero().tolist():
        keep = ~positive[row]
        keep[col] = True  # rank among negatives + this positive
        cols = keep.nonzero()[:, 0]
        order = cols[torch.argsort(-sim[row, cols], stable=True)]
        expected.append((order == col).nonzero().item() + 1)
    assert ranks.tolist() == expected


def test_ranks_in_pools_rejects_positive_in_padding() -> None:
    with pytest.raises(ValueError):
        ranks_in_pools(torch.zeros(1, 3), torch.tensor([[False, False, True]]),
                       torch.tensor([[True, True, False]]))


# ---------------------------------------------------------------- metrics

def test_recall_metrics_hand_example() -> None:
    m = recall_metrics(torch.tensor([1, 3, 7, 12]))
    assert m["R@1"] == 25.0 and m["R@5"] == 50.0 and m["R@10"] == 75.0  # percent
    assert m["MRR"] == pytest.approx(131 / 336)  # (1 + 1/3 + 1/7 + 1/12) / 4, fraction
    assert m["mean_rank"] == 5.75
    assert m["median_rank"] == 5.0  # (3 + 7) / 2
    assert m["n"] == 4


def test_overall_recall_is_mean_hit_over_both_modalities() -> None:
    text_ranks, image_ranks = torch.tensor([1, 4]), torch.tensor([2, 11, 6])
    overall = recall_metrics(torch.cat([text_ranks, image_ranks]), ks=(1, 5, 10))
    assert (overall["R@1"], overall["R@5"], overall["R@10"]) == (20.0, 60.0, 80.0)
    assert hits_at_k(image_ranks, 5).tolist() == [True, False, False]


def test_recall_metrics_odd_median_custom_ks_and_empty() -> None:
    m = recall_metrics(torch.tensor([2, 1, 9]), ks=(2,))
    assert set(m) == {"R@2", "MRR", "mean_rank", "median_rank", "n"}
    assert m["R@2"] == pytest.approx(200 / 3) and m["median_rank"] == 2.0
    empty = recall_metrics(torch.tensor([], dtype=torch.long))
    assert empty["n"] == 0 and math.isnan(empty["R@1"])
    with pytest.raises(ValueError):
        recall_metrics(torch.tensor([0, 1]))


def test_missed_elements_are_never_hits():
    """An element the system did not output is a miss at every k, even beyond its pool."""
    from unimur.ranking import recall_metrics

    ranks = torch.tensor([1, 3, 4])              # the last: missed, pool of 3 -> rank 3 + 1
    m = recall_metrics(ranks, ks=(1, 5), missed=torch.tensor([False, False, True]))
    assert m["R@1"] == pytest.approx(100 / 3) and m["R@5"] == pytest.approx(200 / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 3) / 3) and m["mean_rank"] == pytest.approx(8 / 3)
    with pytest.raises(ValueError, match="entries"):
        recall_metrics(ranks, missed=torch.tensor([False]))
