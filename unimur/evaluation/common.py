"""What every benchmark's evaluation shares: the retrieval-space check, skip-count grouping,
timing, the ranking order of examples (see `unimur.evaluation` for the results format)."""
from __future__ import annotations

import time
from collections import Counter
from typing import Mapping

import torch
from torch import Tensor

from unimur.inference.embedder import Embedder

N_EXAMPLES = 8      # queries kept in results["examples"]
EXAMPLE_TOP_K = 5   # retrieved items kept per example


def supports_text_retrieval(embedder: Embedder) -> bool:
    """Whether ``embedder`` has a text retrieval space.

    An explicit ``supports_text`` attribute wins (stubs, wrappers); otherwise a model with
    ``config.method == "fromage"`` has none (FROMAGe aligns u to images only, so its
    ``embed_texts`` raises).
    """
    flag = getattr(embedder, "supports_text", None)
    if flag is not None:
        return bool(flag)
    config = getattr(getattr(embedder, "model", None), "config", None)
    return getattr(config, "method", "unimur") != "fromage"


def split_counts(counts: Mapping[str, int], groups: Mapping[str, set[str]], rest: str
                  ) -> dict[str, dict[str, int]]:
    """Sort skip reasons into named groups; reasons in no group go to ``rest``."""
    out: dict[str, dict[str, int]] = {name: {} for name in [*groups, rest]}
    for reason, n in sorted(counts.items()):
        if not n:
            continue
        group = next((g for g, reasons in groups.items() if reason in reasons), rest)
        out[group][reason] = int(n)
    return out


def add_count(counter: Counter, reason: str, n: int) -> None:
    """Count ``n`` skips; zero leaves no key behind (logged and written Counters stay clean)."""
    if n:
        counter[reason] += n


def timing_of(t0: float, n_queries: int) -> dict[str, float]:
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3),
            "queries_per_s": round(n_queries / seconds, 2) if seconds > 0 else float("nan")}


def ranked_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row in the module's order (higher score first, ties: lower index first).

    Args:
        scores: [Q, P] float scores (-inf at padding).
    Returns:
        (values [Q, min(k, P)], indices [Q, min(k, P)]).
    """
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def check_dims(queries: Tensor, candidates: Tensor, what: str) -> None:
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"query embeddings are {queries.shape[1]}-d but {what} are "
                         f"{candidates.shape[1]}-d: were they computed with another model?")


def is_valid_score(score: float) -> bool:
    return score != float("-inf")
