"""The shared evaluation core: benchmark readers give queries, pools and positives; this module
embeds, scores, ranks and summarises them once for every benchmark (SPEC section 4).

Entry points::

    evaluate_visdial(embedder, visdial_dir, context="rounds", rounds=10, split="val")
    evaluate_mmdialog(embedder, mmdialog_dir, split="test", target="last",
                      embeddings=None, image_threshold=None)

Reporting (table, JSON, PNG) is `unimur.eval_report`; the scripts' shared plumbing is `evals/common.py`.

Both evaluations return one JSON-ready dict with the same top-level keys:

``benchmark``  "visdial" or "mmdialog".
``settings``   every choice that changes the numbers (split, context/target, pool rule and size, tie rule,
               threshold, embedding source, text retrieval on/off).
``metrics``    VisDial: ``dialogue_to_image`` and ``image_to_dialogue``, each
               ``{"R@1", "R@5", "R@10" (percent), "MRR" (0-1), "mean_rank", "median_rank", "n"}``
               (see :func:`unimur.retrieval.recall_metrics`).
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
:mod:`unimur.retrieval` (lower pool index first). MMDialog pools are laid out as *negatives first,
then the ground truth*, so a tie between a negative and a positive counts against the positive: a
collapsed model whose scores are all equal gets the worst rank, never a perfect one.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .embeddings import ImageEmbeddings
from .mmdialog import MMDialogQuery, load_mmdialog, media_path
from .retrieval import ranks_from_sim, ranks_in_pools, recall_metrics
from .retriever import Embedder
from .visdial import CONTEXTS as VISDIAL_CONTEXTS
from .visdial import build_visdial_query, load_visdial

logger = logging.getLogger(__name__)

__all__ = [
    "evaluate_visdial",
    "evaluate_mmdialog",
    "supports_text_retrieval",
]

N_EXAMPLES = 8      # queries kept in results["examples"]
EXAMPLE_TOP_K = 5   # retrieved items kept per example
# Gathered pool embeddings scored at once: [chunk, P, E] floats (~128 MB at this size).
_GATHER_ELEMENTS = 1 << 25

# Reader skip reasons that remove a whole VisDial dialogue (the rest count rounds).
_VISDIAL_DIALOGUE_REASONS = {"missing_image", "malformed_dialog", "dialog_with_bad_round"}
# MMDialog reader reasons by what they remove.
_MMDIALOG_DIALOGUE_REASONS = {"too_few_turns", "malformed_dialogue", "malformed_json_line"}
_MMDIALOG_QUERY_REASONS = {"empty_target_turn", "missing_target_image", "empty_context"}
# Queries whose candidate pool is smaller than the protocol's (see _short_pool).
_MMDIALOG_POOL_REASONS = {f"{n}_negative_{m}" for n in ("no", "too_few") for m in ("images", "texts")}
# MMDialog's protocol: 999 negative texts and 999 negative images per dialogue (SPEC section 4).
MMDIALOG_NEGATIVES = 999


# ==============================================================================================
# Shared helpers
# ==============================================================================================


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


def _split_counts(counts: Mapping[str, int], groups: Mapping[str, set[str]], rest: str
                  ) -> dict[str, dict[str, int]]:
    """Sort skip reasons into named groups; reasons in no group go to ``rest``."""
    out: dict[str, dict[str, int]] = {name: {} for name in [*groups, rest]}
    for reason, n in sorted(counts.items()):
        if not n:
            continue
        group = next((g for g, reasons in groups.items() if reason in reasons), rest)
        out[group][reason] = int(n)
    return out


def _add(counter: Counter, reason: str, n: int) -> None:
    """Count ``n`` skips; zero leaves no key behind (logged and written Counters stay clean)."""
    if n:
        counter[reason] += n


def _timing(t0: float, n_queries: int) -> dict[str, float]:
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3),
            "queries_per_s": round(n_queries / seconds, 2) if seconds > 0 else float("nan")}


def _ranked(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row in the module's order (higher score first, ties: lower index first).

    Args:
        scores: [Q, P] float scores (-inf at padding).
    Returns:
        (values [Q, min(k, P)], indices [Q, min(k, P)]).
    """
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


# ==============================================================================================
# VisDial: dialogue -> image over the pool of all evaluated images
# ==============================================================================================


def _dedupe_images(dialogs: list, skipped: Counter) -> list:
    """Keep the first dialogue per image id: a shared image would make ground truth ambiguous."""
    seen: set[int] = set()
    kept = []
    for d in dialogs:
        if d.image_id in seen:
            skipped["duplicate_image_id"] += 1
            continue
        seen.add(d.image_id)
        kept.append(d)
    return kept


def _visdial_queries(dialogs: list, context: str, rounds: int, skipped: Counter
                     ) -> tuple[list, list[str]]:
    """(dialogues, query strings); dialogues whose query would be empty are counted and dropped."""
    # Bad settings fail here, so the ValueError below can only mean "this dialogue is empty".
    if context not in VISDIAL_CONTEXTS:
        raise ValueError(f"context must be one of {VISDIAL_CONTEXTS}, got {context!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    kept, texts = [], []
    for d in dialogs:
        try:
            texts.append(build_visdial_query(d, context=context, rounds=rounds))
        except ValueError as e:
            logger.debug("dropping dialogue: %s", e)
            skipped["empty_query"] += 1
            continue
        kept.append(d)
    return kept, texts


def evaluate_visdial(embedder: Embedder, visdial_dir: str | Path, *, context: str = "rounds",
                     rounds: int = 10, split: str = "val", n_examples: int = N_EXAMPLES,
                     data: tuple[list, Counter] | None = None) -> dict[str, Any]:
    """VisDial dialogue-to-image retrieval (and image-to-dialogue), SPEC section 4.

    The pool is the images of all evaluated dialogues; dialogue ``i``'s positive is image ``i``.
    Dialogues the reader drops, duplicates and dialogues whose image cannot be decoded are
    removed from both queries and pool and counted by reason. ``data`` is what
    ``load_visdial(visdial_dir, split)`` returned, when the caller read it already (the scripts
    check their data before loading the model).

    Returns the results dict described in the module docstring.
    """
    t0 = time.perf_counter()
    dialogs, skipped = data if data is not None else load_visdial(visdial_dir, split)
    dialogs, skipped = list(dialogs), Counter(skipped)
    dialogs = _dedupe_images(dialogs, skipped)
    dialogs, queries = _visdial_queries(dialogs, context, rounds, skipped)
    if not dialogs:
        raise ValueError(f"{visdial_dir}: no dialogue left to evaluate (skipped: {dict(skipped)})")

    images, image_skips = embedder.embed_images([d.image_path for d in dialogs],
                                                ids=[str(d.image_id) for d in dialogs])
    readable = set(images.ids)
    keep = [i for i, d in enumerate(dialogs) if str(d.image_id) in readable]
    if len(keep) < len(dialogs):
        skipped["unreadable_image"] += len(dialogs) - len(keep)
        dialogs, queries = [dialogs[i] for i in keep], [queries[i] for i in keep]
    if [str(d.image_id) for d in dialogs] != images.ids:  # the Embedder contract; check, never assume
        raise RuntimeError("embed_images returned ids out of input order")

    u = embedder.embed_queries([[q] for q in queries]).float().cpu()   # [D, E]
    v = images.embeds.float().cpu()                                      # [D, E]
    _check_dims(u, v, "VisDial images")
    sim = u @ v.T                                                        # [D dialogues, D images]
    positives = torch.arange(len(dialogs))
    d2i = ranks_from_sim(sim, positives)
    i2d = ranks_from_sim(sim.T, positives)

    counts = _split_counts(skipped, {"skipped_dialogues": _VISDIAL_DIALOGUE_REASONS
                                     | {"duplicate_image_id", "empty_query", "unreadable_image"}},
                           rest="dropped_elements")
    logger.info("VisDial: %d dialogues evaluated, skipped %s", len(dialogs), dict(skipped))
    return {
        "benchmark": "visdial",
        "settings": {
            "split": split, "context": context, "rounds": rounds,
            "visdial_dir": str(visdial_dir),
            "pool": "the images of all evaluated dialogues", "pool_size": len(dialogs),
            "score": "cosine (dot product of L2-normalised embeddings)",
            "ties": "lower pool index (file order) ranks first", "ranks": "1-based",
            "directions": {"dialogue_to_image": "intended direction (SPEC)",
                           "image_to_dialogue": "FROMAGe's released script's direction"},
        },
        "metrics": {"dialogue_to_image": recall_metrics(d2i),
                    "image_to_dialogue": recall_metrics(i2d)},
        "counts": {"dialogues_evaluated": len(dialogs),
                   "dialogues_skipped": sum(counts["skipped_dialogues"].values()),
                   **counts, "unreadable_images": dict(sorted(image_skips.items()))},
        "timing": _timing(t0, len(dialogs)),
        "examples": _visdial_examples(dialogs, queries, sim, d2i, i2d, n_examples),
        "notes": [],
    }


def _check_dims(queries: Tensor, candidates: Tensor, what: str) -> None:
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"query embeddings are {queries.shape[1]}-d but {what} are "
                         f"{candidates.shape[1]}-d: were they computed with another model?")


def _visdial_examples(dialogs: list, queries: list[str], sim: Tensor, ranks: Tensor,
                      i2d_ranks: Tensor, n: int) -> list[dict[str, Any]]:
    """The first ``n`` dialogues with their top retrieved images (sim: [D, D]); ``gt_rank`` is
    the dialogue->image rank, ``image_to_dialogue_rank`` that of the dialogue for its image."""
    values, indices = _ranked(sim[:n], EXAMPLE_TOP_K)
    return [{
        "query": queries[q],
        "gt_images": [str(dialogs[q].image_path)],
        "gt_rank": int(ranks[q]),
        "image_to_dialogue_rank": int(i2d_ranks[q]),
        "retrieved_images": [{"id": str(dialogs[j].image_id), "path": str(dialogs[j].image_path),
                              "score": float(s), "is_gt": int(j) == q}
                             for s, j in zip(values[q].tolist(), indices[q].tolist())],
    } for q in range(min(n, len(dialogs)))]


# ==============================================================================================
# MMDialog: per-query pools of texts and images
# ==============================================================================================


@dataclass
class _Pools:
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
              ) -> "_Pools":
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
def _pool_scores(u: Tensor, table: Tensor, pools: _Pools) -> Tensor:
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


class _MediaTable:
    """Media key -> row of an :class:`ImageEmbeddings`.

    Ids are matched exactly, or by file stem when the file stores paths (FROMAGe's pickle keeps
    ``paths``; a MMDialog path ``test/<key>.jpg`` has the media key as its stem).
    """

    def __init__(self, embeddings: ImageEmbeddings):
        self.embeddings = embeddings
        self.rows = embeddings.position()
        stems: dict[str, int] = {}
        for i, key in enumerate(embeddings.ids):
            if "." not in key and "/" not in key:
                continue  # a bare media key (the usual case): no Path() per id over ~1M ids
            stem = Path(key).stem
            if stem != key and stem not in self.rows:
                stems.setdefault(stem, i)
        self.rows.update(stems)

    def row(self, key: str) -> int | None:
        return self.rows.get(key)


def _needed_media(queries: Sequence[MMDialogQuery]) -> list[str]:
    """Every distinct media key the queries use (context, target, negatives), first-seen order."""
    keys: dict[str, None] = {}
    for q in queries:
        for kind, value in q.context:
            if kind == "image":
                keys[value] = None
        keys.update(dict.fromkeys(q.gt_media_keys))
        keys.update(dict.fromkeys(q.negative_media_keys))
    return list(keys)


def _embed_media(embedder: Embedder, mmdialog_dir: str | Path, split: str, keys: list[str]
                 ) -> tuple[ImageEmbeddings, Counter]:
    """Embed every needed image file once; unreadable ones come back in the Counter."""
    paths = [media_path(mmdialog_dir, split, k) for k in keys]
    logger.info("MMDialog: embedding %d distinct images", len(paths))
    return embedder.embed_images(paths, ids=keys)


def _resolve_query(q: MMDialogQuery, table: _MediaTable, given: bool, dropped: Counter
                   ) -> MMDialogQuery | None:
    """Drop media the table lacks: context images and negatives are counted, a missing target
    drops the query (embedded here) or is returned as None for the caller to report (given file).
    """
    missing = "not_in_embeddings" if given else "unreadable"
    context = []
    for kind, value in q.context:
        if kind == "image" and table.row(value) is None:
            dropped[f"context_image_{missing}"] += 1
            continue
        context.append((kind, value))
    negatives = [k for k in q.negative_media_keys if table.row(k) is not None]
    _add(dropped, f"negative_image_{missing}", len(q.negative_media_keys) - len(negatives))
    if any(table.row(k) is None for k in q.gt_media_keys):
        return None
    return replace(q, context=context, negative_media_keys=negatives)


def _without_gt_duplicates(q: MMDialogQuery, dropped: Counter) -> MMDialogQuery:
    """Negatives identical to a ground-truth element are not negatives: retrieving one is
    retrieving the right answer, and as an exact tie it would otherwise count against it."""
    gt_t, gt_m = set(q.gt_texts), set(q.gt_media_keys)
    texts = [t for t in q.negative_texts if t not in gt_t]
    keys = [k for k in q.negative_media_keys if k not in gt_m]
    _add(dropped, "negative_text_equal_to_gt", len(q.negative_texts) - len(texts))
    _add(dropped, "negative_image_equal_to_gt", len(q.negative_media_keys) - len(keys))
    return replace(q, negative_texts=texts, negative_media_keys=keys)


def _short_pool(q: MMDialogQuery, n_negatives: int, with_text: bool) -> str | None:
    """Why ``q``'s candidate pool is smaller than the protocol's, or None if it is not.

    A pool of only the ground truth is a free rank-1 hit and a short pool an easier one, so
    such queries are skipped and counted rather than scored as if their pool were full. The
    text pool only counts when the model retrieves texts.
    """
    pools = [("images", q.negative_media_keys)] + ([("texts", q.negative_texts)] if with_text else [])
    for modality, negatives in pools:
        if len(negatives) < n_negatives:
            return f"{'no' if not negatives else 'too_few'}_negative_{modality}"
    return None


def _prepare_queries(queries: list[MMDialogQuery], table: _MediaTable, given: bool,
                     skipped: Counter, n_negatives: int, with_text: bool) -> list[MMDialogQuery]:
    """Resolve media and clean pools; queries that cannot be scored are counted in ``skipped``.

    The pool-size rule counts a query's negatives that can be scored (non-empty texts, images
    with a file or an embedding), before negatives equal to a ground-truth element are removed
    (those are correct answers, not a smaller pool).
    """
    out, missing_targets = [], []
    for q in queries:
        resolved = _resolve_query(q, table, given, skipped)
        if resolved is None:
            if given:
                missing_targets += [k for k in q.gt_media_keys if table.row(k) is None]
            else:
                skipped["unreadable_target_image"] += 1
            continue
        if not resolved.context:
            skipped["empty_context_after_image_drop"] += 1
            continue
        short = _short_pool(resolved, n_negatives, with_text)
        if short is not None:
            skipped[short] += 1
            continue
        out.append(_without_gt_duplicates(resolved, skipped))
    if missing_targets:
        raise ValueError(
            f"{len(missing_targets)} ground-truth media keys are not in the embedding file "
            f"(e.g. {missing_targets[:3]}): it does not cover this split; re-run "
            f"unimur/extract_vis_emb.py over it, or omit --embeddings to embed the images now")
    n_short = sum(skipped[r] for r in _MMDIALOG_POOL_REASONS)
    hint = ("a set with fewer negatives per dialogue states its size with --n-negatives (the "
            "synthetic sets: the --n-negatives they were generated with)")
    if not out:
        raise ValueError(f"no MMDialog query left to evaluate (skipped: {dict(skipped)})"
                         + (f"; {n_short} pools are smaller than {n_negatives} negatives per "
                            f"modality: {hint}" if n_short else ""))
    if n_short:
        logger.warning("MMDialog: %d queries skipped, not scored: their candidate pools hold fewer "
                       "than %d negatives per modality (%s); %s", n_short, n_negatives,
                       {r: skipped[r] for r in sorted(_MMDIALOG_POOL_REASONS) if skipped[r]}, hint)
    return out


def _contexts(queries: Sequence[MMDialogQuery], table: _MediaTable) -> list[list]:
    """Context pieces for ``embed_queries``: text as ``str``, images as their W_cap input feature."""
    caps = table.embeddings.cap_features
    if caps is None and any(kind == "image" for q in queries for kind, _ in q.context):
        raise ValueError("the image embeddings carry no cap_features (W_cap inputs), so context "
                         "images cannot be fed to the LLM; recompute them with "
                         "unimur/extract_vis_emb.py")
    return [[value if kind == "text" else caps[table.row(value)] for kind, value in q.context]
            for q in queries]


def _text_pools(queries: Sequence[MMDialogQuery]) -> tuple[list[str], _Pools]:
    """Distinct texts (each embedded once: negatives repeat across dialogues) and the pools."""
    texts: dict[str, int] = {}
    for q in queries:
        for t in (*q.negative_texts, *q.gt_texts):
            texts.setdefault(t, len(texts))
    pools = _Pools.build([[texts[t] for t in q.negative_texts] for q in queries],
                         [[texts[t] for t in q.gt_texts] for q in queries])
    return list(texts), pools


def _image_pools(queries: Sequence[MMDialogQuery], table: _MediaTable) -> _Pools:
    return _Pools.build([[table.row(k) for k in q.negative_media_keys] for q in queries],
                        [[table.row(k) for k in q.gt_media_keys] for q in queries])


@dataclass
class _Scored:
    """One modality's scores and ranks.

    scores: [Q, P] (-inf at padding); ranks: [num gt elements] aligned with
    ``pools.positive.nonzero()``; top_score / top_col: [Q] best score and its pool column.
    """

    pools: _Pools
    scores: Tensor
    ranks: Tensor
    top_score: Tensor
    top_col: Tensor

    @classmethod
    def compute(cls, u: Tensor, table: Tensor, pools: _Pools) -> "_Scored":
        scores = _pool_scores(u, table, pools)
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


def _image_outputs(images: _Scored, threshold: float | None) -> Tensor:
    """[Q] bool: whether the system outputs an image.

    UniMuR always outputs both modalities (when the pool has an image); with a threshold it
    outputs one only when its best image scores above it.
    """
    out = images.has_output()
    if threshold is not None:
        out &= images.top_score > threshold
    return out


def _consistency(embedder: Embedder, embeddings: ImageEmbeddings, images: _Scored,
                 image_out: Tensor, text_table: list[str], texts: _Scored) -> tuple[float | None, int]:
    """Mean CLIP cosine between the top-1 image (CLIP-V) and top-1 text (CLIP-T) of each query
    that outputs both; (None, 0) when there is no such query or no CLIP-V embedding."""
    both = image_out & texts.has_output()
    if embeddings.clip_embeds is None or not bool(both.any()):
        return None, 0
    idx = both.nonzero()[:, 0]
    clip_v = embeddings.clip_embeds[images.top_rows()[idx]].float().cpu()          # [n, Dv]
    top_texts = [text_table[int(r)] for r in texts.top_rows()[idx]]
    clip_t = embedder.clip_text_embeds(top_texts).float().cpu()                     # [n, Dv]
    return float((clip_v * clip_t).sum(dim=1).mean()), int(idx.numel())


def evaluate_mmdialog(embedder: Embedder, mmdialog_dir: str | Path, *, split: str = "test",
                      target: str = "last", embeddings: ImageEmbeddings | None = None,
                      image_threshold: float | None = None, n_examples: int = N_EXAMPLES,
                      n_negatives: int = MMDIALOG_NEGATIVES,
                      data: tuple[list[MMDialogQuery], Counter] | None = None) -> dict[str, Any]:
    """MMDialog multimodal response retrieval (SPEC section 4).

    Args:
        embedder: the model (or a stub) behind the :class:`Embedder` interface.
        mmdialog_dir: folder holding ``<split>/conversations.json`` and the images.
        target: "last" (the paper) or "every" turn after the first.
        embeddings: precomputed image embeddings (``unimur/extract_vis_emb.py``); when None,
            every needed image is embedded now. Keys missing from a given file: context images
            and negatives are dropped and counted, a ground-truth image is an error.
        image_threshold: output an image only when the best image scores above it (cosine);
            None = UniMuR's rule of always outputting both modalities.
        n_negatives: the protocol's pool size, negatives per modality (999 in MMDialog); a query
            whose pool holds fewer (after dropping unusable images) is skipped and counted under
            ``counts["skipped_queries"]`` (``no_negative_images``, ``too_few_negative_texts``, ...).
        data: what ``load_mmdialog(mmdialog_dir, split, target, check_images=embeddings is
            None)`` returned, when the caller read it already.

    Returns the results dict described in the module docstring.
    """
    t0 = time.perf_counter()
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1 (the negatives per modality of a full pool), "
                         f"got {n_negatives}")
    given = embeddings is not None
    queries, skipped = (data if data is not None
                        else load_mmdialog(mmdialog_dir, split, target, check_images=not given))
    queries, skipped = list(queries), Counter(skipped)
    with_text = supports_text_retrieval(embedder)
    image_skips: Counter = Counter()
    if embeddings is None:
        embeddings, image_skips = _embed_media(embedder, mmdialog_dir, split, _needed_media(queries))
    table = _MediaTable(embeddings)
    queries = _prepare_queries(queries, table, given, skipped, n_negatives, with_text)

    u = embedder.embed_queries(_contexts(queries, table)).float().cpu()          # [Q, E]
    _check_dims(u, embeddings.embeds, "the image embeddings")
    images = _Scored.compute(u, embeddings.embeds, _image_pools(queries, table))
    text_table, text_pools = _text_pools(queries)
    texts = None
    if with_text:
        text_embeds = embedder.embed_texts(text_table).float().cpu()               # [N_text, E]
        _check_dims(u, text_embeds, "the text embeddings")
        texts = _Scored.compute(u, text_embeds, text_pools)

    image_out = _image_outputs(images, image_threshold)
    consistency, n_pairs = (_consistency(embedder, embeddings, images, image_out, text_table, texts)
                            if texts is not None else (None, 0))
    notes = _mmdialog_notes(with_text, embeddings, consistency)
    metrics = {
        "text": recall_metrics(texts.ranks) if texts is not None else None,
        "image": recall_metrics(images.ranks),
        "overall": recall_metrics(torch.cat([texts.ranks, images.ranks])) if texts is not None else None,
        "image_retrieval_rate": float(image_out.float().mean()),
        "cross_modal_consistency": consistency,
    }
    counts = _split_counts(skipped, {"skipped_dialogues": _MMDIALOG_DIALOGUE_REASONS,
                                     "skipped_queries": _MMDIALOG_QUERY_REASONS | _MMDIALOG_POOL_REASONS
                                     | {"unreadable_target_image", "empty_context_after_image_drop"}},
                           rest="dropped_elements")
    logger.info("MMDialog: %d queries evaluated, skipped %s", len(queries), dict(skipped))
    return {
        "benchmark": "mmdialog",
        "settings": {
            "split": split, "target": target, "mmdialog_dir": str(mmdialog_dir),
            "text_retrieval": with_text,
            "image_output_rule": ("always both modalities" if image_threshold is None
                                  else f"image only when top image cosine > {image_threshold}"),
            "image_threshold": image_threshold,
            "embeddings": "given" if given else "computed from the image files",
            "embeddings_meta": dict(embeddings.meta) if given else None,
            "n_negatives": n_negatives,
            "pool": f"per query: its negatives, then its ground-truth elements; a query with "
                    f"fewer than {n_negatives} scorable negatives per modality is skipped "
                    f"(counted in skipped_queries); negatives equal to a ground-truth element "
                    f"are then removed",
            "ties": "lower pool index ranks first, so ties count against the ground truth",
            "overall": "recall over all ground-truth elements of both modalities",
            "score": "cosine (dot product of L2-normalised embeddings)", "ranks": "1-based",
        },
        "metrics": metrics,
        "counts": {
            "queries_evaluated": len(queries),
            "queries_skipped": (sum(counts["skipped_queries"].values())
                                + sum(counts["skipped_dialogues"].values())),
            **counts, "unreadable_images": dict(sorted(image_skips.items())),
            "gt_texts": int(text_pools.positive.sum()), "gt_images": int(images.pools.positive.sum()),
            "pool_sizes": {"text": text_pools.sizes(), "image": images.pools.sizes()},
            "image_outputs": int(image_out.sum()), "consistency_pairs": n_pairs,
        },
        "timing": _timing(t0, len(queries)),
        "examples": _mmdialog_examples(queries, mmdialog_dir, split, table, images, texts,
                                       text_table, image_out, n_examples),
        "notes": notes,
    }


def _mmdialog_notes(with_text: bool, embeddings: ImageEmbeddings, consistency: float | None
                    ) -> list[str]:
    notes = []
    if not with_text:
        notes.append("method=fromage has no text retrieval space: image metrics only (text, "
                     "overall and cross-modal consistency are not computed)")
    elif embeddings.clip_embeds is None:
        notes.append("the image embeddings carry no CLIP-V embeddings: cross-modal consistency "
                     "is not computed")
    elif consistency is None:
        notes.append("no query output both an image and a text: no cross-modal consistency")
    return notes


def _render_context(q: MMDialogQuery) -> str:
    return " ".join(value if kind == "text" else "[image]" for kind, value in q.context)


def _mmdialog_examples(queries: Sequence[MMDialogQuery], mmdialog_dir: str | Path, split: str,
                       table: _MediaTable, images: _Scored, texts: _Scored | None,
                       text_table: list[str], image_out: Tensor, n: int) -> list[dict[str, Any]]:
    """The first ``n`` queries with their top retrieved images and texts."""
    n = min(n, len(queries))
    ids = table.embeddings.ids
    path = lambda key: str(media_path(mmdialog_dir, split, key))  # noqa: E731
    img_vals, img_cols = _ranked(images.scores[:n], EXAMPLE_TOP_K)
    image_ranks = images.ranks_per_query()
    if texts is not None:
        txt_vals, txt_cols = _ranked(texts.scores[:n], EXAMPLE_TOP_K)
        text_ranks = texts.ranks_per_query()
    examples = []
    for q in range(n):
        query = queries[q]
        ex: dict[str, Any] = {
            "conversation_id": query.conversation_id, "turn_index": query.turn_index,
            "query": _render_context(query),
            "context_images": [path(v) for kind, v in query.context if kind == "image"],
            "gt_texts": list(query.gt_texts), "gt_images": [path(k) for k in query.gt_media_keys],
            "image_ranks": image_ranks[q], "image_output": bool(image_out[q]),
            "retrieved_images": [
                {"id": ids[int(images.pools.index[q, c])],
                 "path": path(ids[int(images.pools.index[q, c])]), "score": s,
                 "is_gt": bool(images.pools.positive[q, c])}
                for s, c in zip(img_vals[q].tolist(), img_cols[q].tolist()) if _valid(s)],
        }
        if texts is not None:
            ex["text_ranks"] = text_ranks[q]
            ex["retrieved_texts"] = [
                {"text": text_table[int(texts.pools.index[q, c])], "score": s,
                 "is_gt": bool(texts.pools.positive[q, c])}
                for s, c in zip(txt_vals[q].tolist(), txt_cols[q].tolist()) if _valid(s)]
        examples.append(ex)
    return examples


def _valid(score: float) -> bool:
    return score != float("-inf")
