"""Statistics for comparing two methods over seeds and queries (``benchmarks/compare_methods.py``).

A metric of one run is a ratio over queries: ``sum(num) / sum(den)``, with ``num[q]`` and
``den[q]`` per query (for a recall over ground-truth elements, ``num`` counts query q's elements
ranked within k and ``den`` its elements; for a rate over queries, ``den`` is 1 where the query
counts and 0 elsewhere). Keeping the two arrays, rather than a per-query score, lets a resample
of queries recompute exactly the metric the evaluation reports.

The paired difference A - B is the mean over seeds of ``metric(A_s) - metric(B_s)`` on the same
queries (seed s of A paired with seed s of B: same data, same seed). Its 95% interval is a
two-level bootstrap: each replicate draws the seeds with replacement and the queries with
replacement (one draw of queries shared by all seeds and both methods, so the query pairing is
kept), and the interval is the 2.5 and 97.5 percentiles of the replicates' differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VERDICTS = ("holds", "does not hold", "within noise")


@dataclass(frozen=True)
class PerQuery:
    """``num`` and ``den`` of one metric of one run, one entry per query (aligned across runs)."""

    num: np.ndarray
    den: np.ndarray

    def __post_init__(self) -> None:
        if self.num.shape != self.den.shape or self.num.ndim != 1:
            raise ValueError(f"num {self.num.shape} and den {self.den.shape} must be equal 1-D shapes")

    def value(self) -> float:
        """The metric on all queries (nan when no query counts)."""
        den = float(self.den.sum())
        return float(self.num.sum()) / den if den else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds, ignoring nan."""
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _ratio(weights: np.ndarray, runs: list[PerQuery]) -> np.ndarray:
    """[B, S]: each run's metric under each replicate's query weights ([B, Q] counts)."""
    num = np.stack([r.num for r in runs], axis=1).astype(float)  # [Q, S]
    den = np.stack([r.den for r in runs], axis=1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ num) / (weights @ den)


def paired_difference(a: list[PerQuery], b: list[PerQuery], n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95, scale: float = 1.0) -> dict[str, float]:
    """A - B (mean over paired seeds) with a bootstrap interval over queries and seeds.

    ``a[s]`` and ``b[s]`` are seed s of the two methods, on the same queries. Returns
    ``{"diff", "lo", "hi", "n_queries", "n_seeds", "n_boot"}``, the first three times ``scale``
    (100: points of %); a replicate in which a seed's metric is undefined (no query counts) is
    dropped.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same number (>0) of seeds for both methods, got {len(a)} and {len(b)}")
    n_q = a[0].num.size
    if any(r.num.size != n_q for r in [*a, *b]):
        raise ValueError("every run must have the same queries")
    diff = float(np.mean([x.value() - y.value() for x, y in zip(a, b)]))
    rng = np.random.default_rng(seed)
    # One multinomial draw of queries per replicate (its counts are the weights), shared by
    # every seed and both methods, so each query stays paired with itself.
    weights = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=n_boot).astype(float)  # [B, Q]
    per_seed = _ratio(weights, a) - _ratio(weights, b)                                    # [B, S]
    picks = rng.integers(0, len(a), size=(n_boot, len(a)))                                # seeds drawn
    reps = np.take_along_axis(per_seed, picks, axis=1).mean(axis=1)
    reps = reps[~np.isnan(reps)]
    tail = (1.0 - level) / 2 * 100
    lo, hi = (np.percentile(reps, [tail, 100 - tail]) if reps.size else (float("nan"),) * 2)
    return {"diff": scale * diff, "lo": scale * float(lo), "hi": scale * float(hi), "n_queries": int(n_q),
            "n_seeds": len(a), "n_boot": int(reps.size)}


def verdict(interval: dict[str, float], higher_is_better: bool = True) -> str:
    """'holds' when the whole interval favours A, 'does not hold' when it favours B, else
    'within noise' (the interval contains 0)."""
    lo, hi = interval["lo"], interval["hi"]
    if not higher_is_better:
        lo, hi = -hi, -lo
    if lo > 0:
        return "holds"
    if hi < 0:
        return "does not hold"
    return "within noise"
