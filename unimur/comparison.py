"""UniMuR vs FROMAGe: what is compared, per query, and how it is summarised.

``benchmarks/compare_methods.py`` trains and evaluates the runs; this module holds the parts that
do not depend on how the runs were made (and that the tests check against hand-built cases):

- :data:`VARIANTS`: the methods and ablations, as ``main.py`` flags on top of one recipe, and the
  inference rules each is evaluated with (:class:`Evaluation`).
- :func:`mmdialog_per_query` / :func:`visdial_per_query`: every reported metric of one evaluation
  as per-query (num, den) arrays (`unimur.compare_stats.PerQuery`), checked against the
  evaluation's own aggregate so the statistics summarise exactly what the evaluation reported.
- :data:`CLAIMS` and :func:`claims_table`: the abstract's claims, each a pre-declared metric with
  its paired UniMuR - FROMAGe interval and verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .compare_stats import PerQuery, mean_std, verdict

KS = (1, 5, 10)


@dataclass(frozen=True)
class Variant:
    """One trained configuration: ``main.py`` flags added to the shared recipe."""

    name: str
    label: str
    flags: tuple[str, ...]
    method: str = "unimur"


@dataclass(frozen=True)
class Evaluation:
    """One (variant, inference rules) row of the comparison."""

    name: str          # row key in the results
    label: str         # row title in the table
    variant: str
    image_rule: str    # MMDialog: always | ret-token
    text_ranking: str  # MMDialog: embedding | likelihood
    visdial: bool = True  # VisDial's R@k forces [RET] under both rules: evaluated once per model


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("unimur", "UniMuR", ()),
    Variant("fromage", "FROMAGe", ("--method", "fromage"), method="fromage"),
    Variant("no_tm", "UniMuR w/o TM", ("--l-tm", "0")),
    Variant("no_vm", "UniMuR w/o VM", ("--l-vm", "0")),
    Variant("no_cl", "UniMuR w/o CL", ("--l-cap", "0")),
)}

EVALUATIONS: dict[str, Evaluation] = {e.name: e for e in (
    Evaluation("unimur", "UniMuR", "unimur", "always", "embedding"),
    Evaluation("fromage", "FROMAGe", "fromage", "ret-token", "likelihood"),
    Evaluation("unimur@fromage_rules", "UniMuR (F rules)", "unimur", "ret-token", "likelihood",
               visdial=False),
    Evaluation("no_tm", "UniMuR w/o TM", "no_tm", "always", "embedding"),
    Evaluation("no_vm", "UniMuR w/o VM", "no_vm", "always", "embedding"),
    Evaluation("no_cl", "UniMuR w/o CL", "no_cl", "always", "embedding"),
)}


# ----------------------------------------------------------------------------------------------
# Per-query metrics
# ----------------------------------------------------------------------------------------------

def _hits(ranks: list[int], k: int) -> int:
    return sum(1 for r in ranks if r <= k)


def _check(name: str, per_query: PerQuery, reported: float | None, scale: float = 100.0) -> None:
    """The per-query arrays must give back the evaluation's own figure."""
    if reported is None:
        return
    mine = scale * per_query.value()
    if not (math.isclose(mine, reported, rel_tol=1e-9, abs_tol=1e-9) or (math.isnan(mine) and math.isnan(reported))):
        raise RuntimeError(f"{name}: per-query metric {mine} differs from the evaluation's {reported}")


def mmdialog_per_query(results: dict[str, Any], labels=None) -> tuple[list, dict[str, PerQuery]]:
    """Query keys and per-query (num, den) of every MMDialog metric of ``results`` (run with
    one example per query). Recalls are over ground-truth elements (as the evaluation reports
    them, in %); ``image_retrieval_rate`` is over queries; ``attribute_consistency`` over
    queries that output both an image and a text (``labels``: `synthetic.AttributeLabels`)."""
    examples, metrics = results["examples"], results["metrics"]
    if len(examples) != results["counts"]["queries_evaluated"]:
        raise ValueError("the MMDialog results must carry one example per query (n_examples >= queries)")
    keys = [(ex["conversation_id"], ex["turn_index"]) for ex in examples]
    with_text = metrics.get("text") is not None
    cols: dict[str, tuple[list, list]] = {}

    def add(name: str, num: float, den: float) -> None:
        cols.setdefault(name, ([], []))
        cols[name][0].append(num)
        cols[name][1].append(den)

    for ex in examples:
        image_ranks, shown = ex["image_ranks"], bool(ex["image_output"])
        text_ranks = ex.get("text_ranks", [])
        for k in KS:
            add(f"mmdialog/image/R@{k}", _hits(image_ranks, k), len(image_ranks))
            if with_text:
                add(f"mmdialog/text/R@{k}", _hits(text_ranks, k), len(text_ranks))
                # an image element of a response that outputs no image is a miss
                add(f"mmdialog/overall/R@{k}", _hits(text_ranks, k) + (_hits(image_ranks, k) if shown else 0),
                    len(text_ranks) + len(image_ranks))
        add("mmdialog/image_retrieval_rate", float(shown), 1.0)
        if with_text and labels is not None:
            both = shown and ex.get("retrieved_texts") and ex.get("retrieved_images")
            hit = both and labels.text(ex["retrieved_texts"][0]["text"]) in labels.image(ex["retrieved_images"][0]["id"])
            add("mmdialog/attribute_consistency", float(bool(hit)), float(bool(both)))
    out = {name: PerQuery(np.asarray(n, float), np.asarray(d, float)) for name, (n, d) in cols.items()}
    for k in KS:
        _check(f"image R@{k}", out[f"mmdialog/image/R@{k}"], metrics["image"][f"R@{k}"])
        if with_text:
            _check(f"text R@{k}", out[f"mmdialog/text/R@{k}"], metrics["text"][f"R@{k}"])
            _check(f"overall R@{k}", out[f"mmdialog/overall/R@{k}"], metrics["overall"][f"R@{k}"])
    _check("image retrieval rate", out["mmdialog/image_retrieval_rate"], metrics["image_retrieval_rate"], 1.0)
    if "mmdialog/attribute_consistency" in out:
        _check("attribute consistency", out["mmdialog/attribute_consistency"],
               metrics.get("attribute_consistency"), 1.0)
    return keys, out


def visdial_per_query(results: dict[str, Any]) -> tuple[list, dict[str, PerQuery]]:
    """Query keys (ground-truth image) and per-query dialogue->image R@k of ``results``."""
    examples = results["examples"]
    if len(examples) != results["counts"]["dialogues_evaluated"]:
        raise ValueError("the VisDial results must carry one example per dialogue (n_examples >= dialogues)")
    keys = [ex["gt_images"][0] for ex in examples]
    ranks = np.asarray([ex["gt_rank"] for ex in examples])
    out = {f"visdial/dialogue_to_image/R@{k}": PerQuery((ranks <= k).astype(float), np.ones(len(ranks)))
           for k in KS}
    for k in KS:
        _check(f"VisDial R@{k}", out[f"visdial/dialogue_to_image/R@{k}"],
               results["metrics"]["dialogue_to_image"][f"R@{k}"])
    return keys, out


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------

# Metrics in the order of the printed table: (key, label). Values are shown in %.
METRICS: tuple[tuple[str, str], ...] = (
    *((f"mmdialog/overall/R@{k}", f"MMDialog overall R@{k}") for k in KS),
    *((f"mmdialog/text/R@{k}", f"MMDialog text R@{k}") for k in KS),
    *((f"mmdialog/image/R@{k}", f"MMDialog context->image R@{k}") for k in KS),
    ("mmdialog/image_retrieval_rate", "MMDialog image retrieval rate"),
    ("mmdialog/attribute_consistency", "MMDialog attribute consistency"),
    *((f"visdial/dialogue_to_image/R@{k}", f"VisDial dialogue->image R@{k}") for k in KS),
)

# The abstract's claims, each judged on one metric fixed before the run.
CLAIMS: tuple[tuple[str, str], ...] = (
    ("higher overall R@1 of MMDialog multimodal response retrieval", "mmdialog/overall/R@1"),
    ("higher image retrieval rate (FROMAGe favours text-only answers)", "mmdialog/image_retrieval_rate"),
    ("better cross-modal consistency (attribute consistency here)", "mmdialog/attribute_consistency"),
    ("better MMDialog context->image retrieval (R@1)", "mmdialog/image/R@1"),
    ("better VisDial dialogue->image retrieval (R@1)", "visdial/dialogue_to_image/R@1"),
)


def summarise(per_run: dict[str, list[dict[str, PerQuery]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{evaluation: {metric: {"mean", "std", "values"}}} in %, over the seeds of each evaluation."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, seeds in per_run.items():
        out[name] = {}
        for metric in sorted({m for run in seeds for m in run}):
            values = [100.0 * run[metric].value() for run in seeds if metric in run]
            mean, std = mean_std(values)
            out[name][metric] = {"mean": mean, "std": std, "values": values}
    return out


def fmt_interval(d: dict[str, float]) -> str:
    return f"{d['diff']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"


def claims_table(differences: dict[str, dict[str, float]]) -> list[dict[str, str]]:
    """One row per claim: the metric, UniMuR - FROMAGe with its interval (points of %), verdict."""
    rows = []
    for claim, metric in CLAIMS:
        d = differences.get(metric)
        rows.append({"claim": claim, "metric": metric,
                     "difference": fmt_interval(d) if d else "-",
                     "verdict": verdict(d) if d else "not measured"})
    return rows
