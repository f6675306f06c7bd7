"""The evaluation entry points: benchmark readers give queries, pools and positives; one module
per benchmark embeds, scores, ranks and summarises them (`unimur.evaluation.visdial`,
`unimur.evaluation.mmdialog.protocol`, sharing `unimur.evaluation.common`; SPEC section 4).

Entry points::

    evaluate_visdial(embedder, visdial_dir, context="rounds", rounds=10, split="val")
    evaluate_mmdialog(embedder, mmdialog_dir, split="test", target="last",
                      embeddings=None, image_threshold=None)

Reporting (table, JSON, PNG) is `unimur.evaluation.report`; the scripts' shared plumbing is `evals/common.py`.

Both evaluations return one JSON-ready dict with the same top-level keys:

``benchmark``  "visdial" or "mmdialog".
``settings``   every choice that changes the numbers (split, context/target, pool rule and size, tie rule,
               threshold, embedding source, text retrieval on/off).
``metrics``    VisDial: ``dialogue_to_image`` and ``image_to_dialogue``, each
               ``{"R@1", "R@5", "R@10" (percent), "MRR" (0-1), "mean_rank", "median_rank", "n"}``
               (see :func:`unimur.ranking.recall_metrics`).
               MMDialog: ``text``, ``image``, ``overall`` (same shape, or None when the model has no
               text retrieval space), ``image_retrieval_rate`` (0-1), ``cross_modal_consistency``
               (mean CLIP cosine, or None).
``counts``     VisDial: ``dialogues_evaluated``, ``dialogues_skipped``, ``skipped_dialogues``
               {reason: n}, ``dropped_elements`` {reason: n}, ``unreadable_images`` {reason: n}.
               MMDialog: ``queries_evaluated``, ``queries_skipped``, ``skipped_queries``,
               ``skipped_dialogues``, ``dropped_elements``, ``unreadable_images`` (all {reason: n}),
               ``gt_texts``, ``gt_images``, ``pool_sizes`` {"text"/"image": {min, mean, max}},
               ``image_outputs``, ``consistency_pairs``.
``timing``     ``seconds`` and ``queries_per_s`` (wall clock of the whole evaluation).
``examples``   a few queries with their top retrieved images (and texts), for
               :func:`save_examples_png`.
``notes``      human-readable caveats (e.g. "image metrics only").

The command-line scripts add ``model`` (folder, method, config) before :func:`write_results`.

Scores are cosines (all embeddings are L2-normalised); ranks are 1-based; ties follow
:mod:`unimur.ranking` (lower pool index first). MMDialog pools are laid out as *negatives first,
then the ground truth*, so a tie between a negative and a positive counts against the positive: a
collapsed model whose scores are all equal gets the worst rank, never a perfect one.
"""
from __future__ import annotations

from unimur.evaluation.common import EXAMPLE_TOP_K, N_EXAMPLES, supports_text_retrieval
from unimur.evaluation.mmdialog.protocol import MMDIALOG_NEGATIVES, evaluate_mmdialog
from unimur.evaluation.visdial import evaluate_visdial

__all__ = [
    "evaluate_visdial",
    "evaluate_mmdialog",
    "supports_text_retrieval",
    "EXAMPLE_TOP_K",
    "MMDIALOG_NEGATIVES",
    "N_EXAMPLES",
]
