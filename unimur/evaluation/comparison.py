"""UniMuR vs FROMAGe: what is compared, per query, and how it is summarised.

``benchmarks/compare_methods.py`` trains and evaluates the runs; this module holds the parts that
do not depend on how the runs were made (and that the tests check against hand-built cases):

- :data:`VARIANTS`: the methods and ablations, as ``main.py`` flags on top of one recipe, and the
  inference rules each is evaluated with (:class:`Evaluation`).
- :func:`mmdialog_per_query` / :func:`visdial_per_query`: every reported metric of one evaluation
  as per-query (num, den) arrays (`unimur.evaluation.paired_bootstrap.PerQuery`), checked against the
  evaluation's own aggregate so the statistics summarise exactly what the evaluation reported.
- :data:`CLAIMS` and :func:`claims_table`: the abstract's claims, each a pre-declared metric with
  its paired UniMuR - FROMAGe interval and verdict (Holm-adjusted over the table's rows), for
  UniMuR under its own rule and under the threshold rule chosen on a validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from unimur.evaluation.paired_bootstrap import PerQuery, holm, mean_std, verdict

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
    image_rule: str    # MMDialog: always | threshold | ret-token
    text_ranking: str  # MMDialog: embedding | likelihood
    visdial: bool = True  # VisDial's R@k forces [RET] under both rules: evaluated once per model
    # threshold rule: chosen per model on a validation split (never on the test queries)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("unimur", "UniMuR", ()),
    Variant("fromage", "FROMAGe", ("--method", "fromage"), method="fromage"),
    Variant("no_tm", "UniMuR w/o TM", ("--l-tm", "0")),
    Variant("no_vm", "UniMuR w/o VM", ("--l-vm", "0")),
    Variant("no_cl", "UniMuR w/o CL", ("--l-cap", "0")),
)}

EVALUATIONS: dict[str, Evaluation] = {e.name: e for e in (
    Evaluation("unimur", "UniMuR", "unimur", "always", "embedding"),
    Evaluation("unimur@threshold", "UniMuR (threshold)", "unimur", "threshold", "embedding", visdial=False),
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
        response_ranks = ex.get("response_image_ranks", image_ranks)  # ret-token: the generated [RET]'s
        for k in KS:
            add(f"mmdialog/image/R@{k}", _hits(image_ranks, k), len(image_ranks))
            if with_text:
                for kind, key in (("text", "text_ranks"), ("text_mean", "text_mean_ranks")):
                    if key not in ex:
                        continue
                    text_ranks = ex[key]
                    add(f"mmdialog/{kind}/R@{k}", _hits(text_ranks, k), len(text_ranks))
                    # an image element of a response that outputs no image is a miss
                    add(f"mmdialog/{kind.replace('text', 'overall')}/R@{k}",
                        _hits(text_ranks, k) + (_hits(response_ranks, k) if shown else 0),
                        len(text_ranks) + len(response_ranks))
        add("mmdialog/image_retrieval_rate", float(shown), 1.0)
        has = bool(ex.get("gt_has_image", image_ranks))
        add("mmdialog/image_output/precision", float(shown and has), float(shown))
        add("mmdialog/image_output/recall", float(shown and has), float(has))
        add("mmdialog/image_output/f1", 2.0 * float(shown and has), float(shown) + float(has))
        if with_text and labels is not None:
            both = shown and ex.get("retrieved_texts") and ex.get("retrieved_images")
            hit = both and labels.text(ex["retrieved_texts"][0]["text"]) in labels.image(ex["retrieved_images"][0]["id"])
            add("mmdialog/attribute_consistency", float(bool(hit)), float(bool(both)))
    out = {name: PerQuery(np.asarray(n, float), np.asarray(d, float)) for name, (n, d) in cols.items()}
    for k in KS:
        _check(f"image R@{k}", out[f"mmdialog/image/R@{k}"], metrics["image"][f"R@{k}"])
        for kind, name in (("text", "text"), ("overall", "overall"), ("text_mean", "text_mean_loglik"),
                           ("overall_mean", "overall_mean_loglik")):
            if f"mmdialog/{kind}/R@{k}" in out:
                _check(f"{kind} R@{k}", out[f"mmdialog/{kind}/R@{k}"], metrics[name][f"R@{k}"])
    _check("image retrieval rate", out["mmdialog/image_retrieval_rate"], metrics["image_retrieval_rate"], 1.0)
    for part in ("precision", "recall", "f1"):
        _check(f"image output {part}", out[f"mmdialog/image_output/{part}"],
               metrics.get("image_output", {}).get(part), 1.0)
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
    *((f"mmdialog/overall_mean/R@{k}", f"MMDialog overall R@{k} (mean loglik)") for k in KS),
    *((f"mmdialog/text/R@{k}", f"MMDialog text R@{k}") for k in KS),
    *((f"mmdialog/text_mean/R@{k}", f"MMDialog text R@{k} (mean loglik)") for k in KS),
    *((f"mmdialog/image/R@{k}", f"MMDialog context->image R@{k}") for k in KS),
    ("mmdialog/image_retrieval_rate", "MMDialog image retrieval rate"),
    ("mmdialog/image_output/precision", "MMDialog image output precision"),
    ("mmdialog/image_output/recall", "MMDialog image output recall"),
    ("mmdialog/image_output/f1", "MMDialog image output F1"),
    ("mmdialog/attribute_consistency", "MMDialog attribute consistency"),
    *((f"visdial/dialogue_to_image/R@{k}", f"VisDial dialogue->image R@{k}") for k in KS),
)

# Compared only on the queries where both runs of a pair count (each method's own figure is
# reported beside): consistency is defined on responses with both an image and a text output.
JOINT_METRICS = ("mmdialog/attribute_consistency",)

# The abstract's claims, each judged on one metric fixed before the run. The image claim is
# judged on the F1 of showing an image when the true response has one: a rate of image outputs
# is 100% for a rule that always shows one, whatever it learned.
CLAIMS: tuple[tuple[str, str], ...] = (
    ("higher overall R@1 of MMDialog multimodal response retrieval", "mmdialog/overall/R@1"),
    ("shows images when the response has one (FROMAGe favours text-only answers): image output F1",
     "mmdialog/image_output/f1"),
    ("better cross-modal consistency (attribute consistency, responses where both output both)",
     "mmdialog/attribute_consistency"),
    ("better MMDialog context->image retrieval (R@1)", "mmdialog/image/R@1"),
    ("better VisDial dialogue->image retrieval (R@1)", "visdial/dialogue_to_image/R@1"),
)
# UniMuR's rows of the claims table: its own rule, and the threshold rule chosen on validation.
# Context->image and VisDial force [RET] under every rule, so they are judged once.
CLAIM_ROWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("unimur", "UniMuR (always both)", tuple(m for _, m in CLAIMS)),
    ("unimur@threshold", "UniMuR (threshold)", tuple(m for _, m in CLAIMS[:3])),
)


def joint(a: PerQuery, b: PerQuery) -> tuple[PerQuery, PerQuery]:
    """Both restricted to the queries where both count (den > 0 in each)."""
    both = (a.den > 0) & (b.den > 0)
    return PerQuery(a.num * both, a.den * both), PerQuery(b.num * both, b.den * both)


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


def claims_table(differences: dict[str, dict[str, dict[str, Any]]], alpha: float = 0.05
                 ) -> list[dict[str, str]]:
    """One row per (claim, UniMuR rule): the metric, UniMuR - FROMAGe with its interval (points
    of %), the p-value, Holm's adjustment over every row of the table, and the verdict.
    ``differences``: {"<evaluation> - fromage": {metric: paired_difference(...)}}."""
    rows = []
    for name, label, metrics in CLAIM_ROWS:
        diff = differences.get(f"{name} - fromage", {})
        for claim, metric in CLAIMS:
            if metric in metrics:
                rows.append({"claim": claim, "metric": metric, "unimur": label, "d": diff.get(metric)})
    adjusted = holm([r["d"]["p"] if r["d"] and not r["d"].get("undefined") else float("nan") for r in rows])
    out = []
    for r, p_holm in zip(rows, adjusted):
        d = r.pop("d")
        if d is not None:
            d = {**d, "p_holm": p_holm}
        out.append({**r, "difference": fmt_interval(d) if d and not d.get("undefined") else "-",
                    "p": f"{d['p']:.3g}" if d and not d.get("undefined") else "-",
                    "p_holm": f"{p_holm:.3g}" if d and not d.get("undefined") else "-",
                    "n": str(d.get("n_joint", "")) if d else "",
                    "verdict": verdict(d, alpha=alpha, p_key="p_holm") if d else "not measured"})
    return out
