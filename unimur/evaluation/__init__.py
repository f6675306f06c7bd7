"""Evaluation: benchmark readers (`unimur.data`) give queries, pools and positives; one module per
benchmark embeds, scores, ranks and summarises them (SPEC section 4), sharing `common`; `report`
writes the table, JSON and PNG; `comparison` and `paired_bootstrap` compare methods over seeds.

Entry points::

    from unimur.evaluation.visdial import evaluate_visdial
    from unimur.evaluation.mmdialog.protocol import evaluate_mmdialog

    evaluate_visdial(embedder, visdial_dir, context="rounds", rounds=10, split="val")
    evaluate_mmdialog(embedder, mmdialog_dir, split="test", target="last",
                      embeddings=None, image_threshold=None)

The commands' shared plumbing is `unimur.commands.eval_common`.

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
