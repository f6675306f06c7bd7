"""Statistics for comparing two methods over seeds and queries (``benchmarks/compare_methods.py``).

A metric of one run is a ratio over queries: ``sum(num) / sum(den)``, with ``num[q]`` and
``den[q]`` per query (for a recall over ground-truth elements, ``num`` counts query q's elements
ranked within k and ``den`` its elements; for a rate over queries, ``den`` is 1 where the query
counts and 0 elsewhere). Keeping the two arrays, rather than a per-query score, lets a resample
of queries recompute exactly the metric the evaluation reports.

The paired difference A - B is the mean over seeds of ``metric(A_s) - metric(B_s)`` on the same
queries (seed s of A paired with seed s of B: same data, same seed). Its interval adds the
seeds' variance to the queries' (a bootstrap of queries), the seed-by-query part counted once,
with Student's t (:func:`paired_difference`); several claims are judged together with Holm's correction
(:func:`holm`). A metric that is undefined for a seed, or for too many bootstrap replicates,
gets no verdict rather than a conditioned one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


# A verdict is refused when more than this share of the query bootstrap's replicates leave the
# metric undefined (a ratio whose denominator was not drawn): dropping them would condition the
# interval on the draws where it is defined.
MAX_UNDEFINED_SHARE = 0.01


def paired_difference(a: list[PerQuery], b: list[PerQuery], n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95, scale: float = 1.0,
                      max_undefined: float = MAX_UNDEFINED_SHARE) -> dict[str, Any]:
    """A - B (mean over paired seeds) with an interval for both sources of noise.

    ``a[s]`` and ``b[s]`` are seed s of the two methods, on the same queries: a crossed design
    (every seed sees every query). ``d_s = metric(A_s) - metric(B_s)``; the estimate is
    ``mean_s d_s``. Its variance has a seed part, a query part and a seed-by-query part (each
    seed's model errs on its own queries). Estimated by moments:

    * ``v_mean``: the variance of ``mean_s d_s`` over a bootstrap of queries (one multinomial
      draw per replicate, shared by every seed and both methods, so each query stays paired):
      the query part plus the interaction over S;
    * ``var(d_s, ddof=1) / S``: the seed part plus the interaction over S again, which is taken
      out once: ``(mean_s v_s - v_mean) / (S - 1)`` estimates it, ``v_s`` being seed s's own
      bootstrap variance (a bootstrap of 3-5 seeds would instead understate the seed part by
      ``(S-1)/S`` and draw few distinct sets);

    ``se = sqrt(v_mean + max(0, var(d_s)/S - interaction))``, the interval ``diff +- t * se``
    with S-1 degrees of freedom (conservative when the query part dominates: 98% coverage of
    a nominal 95% in ``tests/test_compare.py``'s simulation, where Welch-Satterthwaite's degrees
    of freedom gave 92%, since 3-5 seeds estimate the seed part poorly), and the two-sided
    p-value of ``diff / se``.
    Returns ``{"diff", "lo", "hi", "se", "p", "df", "n_queries", "n_seeds", "n_boot",
    "n_undefined", "undefined"}``; ``diff``/``lo``/``hi``/``se`` times ``scale`` (100: points
    of %). ``undefined`` says why no verdict can be given (None otherwise): a seed whose metric
    is undefined, fewer than 2 seeds, or more than ``max_undefined`` of the replicates undefined.
    """
    n_q, n_s = _paired_shape(a, b)
    d = np.array([x.value() - y.value() for x, y in zip(a, b)])
    out: dict[str, Any] = {"diff": scale * float(np.mean(d)), "lo": float("nan"), "hi": float("nan"),
                           "se": float("nan"), "p": float("nan"), "df": float("nan"), "n_queries": int(n_q),
                           "n_seeds": n_s, "n_boot": int(n_boot), "n_undefined": 0, "undefined": None}
    out["undefined"] = _undefined_over_seeds(d)
    if out["undefined"]:
        return out
    per_seed = _query_bootstrap(a, b, n_q, n_boot, seed)                                 # [B, S]
    defined = ~np.isnan(per_seed).any(axis=1)
    out["n_undefined"] = int((~defined).sum())
    if out["n_undefined"] > max_undefined * n_boot:
        out["undefined"] = (f"{out['n_undefined']} of {n_boot} query-bootstrap replicates leave the metric "
                            f"undefined (more than {max_undefined:.0%})")
        return out
    se = float(np.sqrt(_difference_variance(d, per_seed[defined])))
    out.update(_t_interval(float(np.mean(d)), se, n_s, level, scale))
    return out


def _paired_shape(a: list[PerQuery], b: list[PerQuery]) -> tuple[int, int]:
    """(queries, seeds) of two methods' runs, checked to be paired: as many seeds, the same queries."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same number (>0) of seeds for both methods, got {len(a)} and {len(b)}")
    n_q, n_s = a[0].num.size, len(a)
    if any(r.num.size != n_q for r in [*a, *b]):
        raise ValueError("every run must have the same queries")
    return n_q, n_s


def _undefined_over_seeds(d: np.ndarray) -> str | None:
    """Why the per-seed differences ``d`` allow no seed-level interval (None when they do)."""
    bad = [s for s, x in enumerate(d) if np.isnan(x)]
    if bad:
        return f"the metric is undefined (no query counts) for seed index(es) {bad}"
    if d.size < 2:
        return "one seed: no seed-level interval"
    return None


def _query_bootstrap(a: list[PerQuery], b: list[PerQuery], n_q: int, n_boot: int, seed: int) -> np.ndarray:
    """[B, S]: A - B per seed under each of ``n_boot`` query resamples, one multinomial draw per
    replicate shared by every seed and both methods (so each query stays paired); nan where undefined."""
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=n_boot).astype(float)  # [B, Q]
    return _ratio(weights, a) - _ratio(weights, b)                                        # [B, S]


def _difference_variance(d: np.ndarray, per_seed: np.ndarray) -> float:
    """Variance of ``mean_s d_s`` by moments (:func:`paired_difference`): the query bootstrap's,
    plus the seeds' less the seed-by-query interaction it already counts (``per_seed``: [B, S],
    defined replicates only)."""
    n_s = d.size
    v_mean = float(np.var(per_seed.mean(axis=1), ddof=1))
    interaction = (float(np.var(per_seed, axis=0, ddof=1).mean()) - v_mean) / (n_s - 1)
    v_seeds = max(0.0, float(np.var(d, ddof=1)) / n_s - interaction)
    return v_mean + v_seeds


def _t_interval(mean: float, se: float, n_s: int, level: float, scale: float) -> dict[str, Any]:
    """Student's t interval and two-sided p-value of ``mean`` with S-1 degrees of freedom
    (``lo``, ``hi``, ``se`` times ``scale``)."""
    from scipy import stats

    df = n_s - 1  # Welch-Satterthwaite's df covered 92% in simulation (test_compare): too few seeds
    t = float(stats.t.ppf(0.5 + level / 2, df=df))
    p = float(2 * stats.t.sf(abs(mean) / se, df=df)) if se > 0 else (0.0 if mean != 0 else 1.0)
    return {"lo": scale * (mean - t * se), "hi": scale * (mean + t * se), "se": scale * se, "p": p,
            "df": round(df, 1)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan stays nan and is not counted as a test)."""
    idx = [i for i, p in enumerate(pvalues) if not np.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m, running = len(order), 0.0
    adjusted = [float("nan")] * len(pvalues)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(interval: dict[str, Any], higher_is_better: bool = True, alpha: float = 0.05,
            p_key: str = "p") -> str:
    """'holds' when A is better at level ``alpha`` (``interval[p_key]``, e.g. Holm-adjusted),
    'does not hold' when B is, 'within noise' otherwise; 'no verdict: <why>' when undefined."""
    if interval.get("undefined"):
        return f"no verdict: {interval['undefined']}"
    p, diff = interval.get(p_key), interval["diff"]
    if p is None or np.isnan(p) or p >= alpha or diff == 0:
        return "within noise"
    better = diff > 0 if higher_is_better else diff < 0
    return "holds" if better else "does not hold"
