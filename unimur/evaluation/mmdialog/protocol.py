"""MMDialog multimodal response retrieval with per-dialogue pools (paper Table 1; SPEC section 4).
Results format: `unimur.evaluation`."""
from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from unimur.data.mmdialog import MMDialogQuery, MMDialogStream, media_path
from unimur.evaluation.common import (
    EXAMPLE_TOP_K,
    N_EXAMPLES,
    check_dims,
    is_valid_score,
    ranked_top_k,
    split_counts,
    supports_text_retrieval,
    timing_of,
)
from unimur.evaluation.mmdialog.chunks import POOL_REASONS, ChunkedQueries, MediaTable
from unimur.evaluation.mmdialog.pool_scoring import Pools, Scored
from unimur.inference.embedder import Embedder
from unimur.inference.image_embeddings import ImageEmbeddings
from unimur.inference.prompting import DEFAULT_PROMPT_STYLE, PromptBuilder, candidate_text
from unimur.inference.rules import (  # noqa: F401
    IMAGE_RULES,
    RET_MAX_TOKENS,
    TEXT_RANKINGS,
    describe_image_rule,
    image_output_quality,
    image_outputs,
    response_rules,
)
from unimur.ranking import recall_metrics

logger = logging.getLogger(__name__)

# MMDialog reader reasons by what they remove.
_MMDIALOG_DIALOGUE_REASONS = {"too_few_turns", "malformed_dialogue", "malformed_json_line", "duplicate_dialogue"}
_MMDIALOG_QUERY_REASONS = {"empty_target_turn", "missing_target_image", "empty_context"}
# MMDialog's protocol: 999 negative texts and 999 negative images per dialogue (SPEC section 4).
MMDIALOG_NEGATIVES = 999


def _prompts(queries: Sequence[MMDialogQuery], table: MediaTable, builder: PromptBuilder,
             reserve: Sequence[int]) -> tuple[list[list], int]:
    """Each query's context as the LLM reads it (`unimur.inference.prompting`: text as ``str``, images as
    their W_cap input feature, in the builder's style), fitted with ``reserve[q]`` positions
    left for what follows it; and how many contexts lost their oldest turns to fit."""
    caps = table.embeddings.cap_features
    if caps is None and any(kind == "image" for q in queries for kind, _ in q.context):
        raise ValueError("the image embeddings carry no cap_features (W_cap inputs), so context "
                         "images cannot be fed to the LLM; recompute them with "
                         "unimur/extract_vis_emb.py")
    contexts, cut = [], 0
    for q, room in zip(queries, reserve):
        turns = [[value if kind == "text" else caps[table.row(value)] for kind, value in turn]
                 for turn in q.turns()]
        fitted = builder.build(turns, room)
        contexts.append(fitted.pieces)
        cut += fitted.cut
    return contexts, cut


def _text_pools(queries: Sequence[MMDialogQuery]) -> tuple[list[str], Pools]:
    """Distinct texts (each embedded once: negatives repeat across dialogues) and the pools."""
    texts: dict[str, int] = {}
    for q in queries:
        for t in (*q.negative_texts, *q.gt_texts):
            texts.setdefault(t, len(texts))
    pools = Pools.build([[texts[t] for t in q.negative_texts] for q in queries],
                         [[texts[t] for t in q.gt_texts] for q in queries])
    return list(texts), pools


def _image_pools(queries: Sequence[MMDialogQuery], table: MediaTable) -> Pools:
    return Pools.build([[table.row(k) for k in q.negative_media_keys] for q in queries],
                        [[table.row(k) for k in q.gt_media_keys] for q in queries])


def _likelihood_texts(embedder: Embedder, contexts: list[list], text_table: list[str], pools: Pools
                      ) -> tuple[Scored, Scored]:
    """FROMAGe's text ranking: each query's pool scored by log p(text | context) under the
    frozen LLM (``text_table`` as read after the prompt); (sum, mean per token) as two scorings
    of the same pools: FROMAGe ranks by the sum."""
    mean = torch.full(pools.index.shape, float("-inf"))
    total = mean.clone()
    for q, context in enumerate(_bar(contexts, "text likelihoods")):
        cols = pools.valid[q].nonzero()[:, 0]
        texts = [text_table[int(i)] for i in pools.index[q, cols]]
        sums, means = embedder.text_log_likelihoods(context, texts)
        total[q, cols], mean[q, cols] = sums.float(), means.float()
    return Scored.from_scores(total, pools), Scored.from_scores(mean, pools)


def _bar(items, desc: str):
    import sys

    from tqdm import tqdm

    return tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=len(items) < 50)


def _overall_ranks(texts: Scored, images: Scored, image_out: Tensor) -> tuple[Tensor, Tensor]:
    """Ranks of every ground-truth element of both modalities, and which are missed: an image
    element of a response for which no image is output (never a hit; its rank for the mean
    rank: its pool size + 1)."""
    image_ranks = images.ranks.clone()
    q_of = images.pools.positive.nonzero()[:, 0]
    missed = ~image_out[q_of]
    image_ranks[missed] = images.pools.valid.sum(1)[q_of][missed] + 1
    return (torch.cat([texts.ranks, image_ranks]),
            torch.cat([torch.zeros(texts.ranks.numel(), dtype=torch.bool), missed.cpu()]))


def _attribute_consistency(labels, embeddings: ImageEmbeddings, images: Scored, image_out: Tensor,
                           text_table: list[str], texts: Scored) -> tuple[int, int]:
    """(consistent, responses) over responses with both outputs: consistent when the top-1 text
    names an object (its attribute tuple) that the top-1 image shows; naming nothing is not."""
    both = (image_out & texts.has_output()).nonzero()[:, 0].tolist()
    ids, top_texts, top_images = embeddings.ids, texts.top_rows(), images.top_rows()
    hits = [labels.text(text_table[int(top_texts[q])]) in labels.image(ids[int(top_images[q])]) for q in both]
    return sum(hits), len(hits)


def _consistency(embedder: Embedder, embeddings: ImageEmbeddings, images: Scored,
                 image_out: Tensor, text_table: list[str], texts: Scored) -> tuple[float, int]:
    """Summed CLIP cosine between the top-1 image (CLIP-V) and top-1 text (CLIP-T) of each query
    that outputs both, and how many: (0.0, 0) when none does or there is no CLIP-V embedding."""
    both = image_out & texts.has_output()
    if embeddings.clip_embeds is None or not bool(both.any()):
        return 0.0, 0
    idx = both.nonzero()[:, 0]
    clip_v = embeddings.clip_embeds[images.top_rows()[idx]].float().cpu()          # [n, Dv]
    top_texts = [text_table[int(r)] for r in texts.top_rows()[idx]]
    clip_t = embedder.clip_text_embeds(top_texts).float().cpu()                     # [n, Dv]
    return float((clip_v * clip_t).sum()), int(idx.numel())


class _TextEmbeddingCache:
    """Candidate-text embeddings, computed per chunk of dialogues and kept only while recent:
    MMDialog's negatives mostly differ from dialogue to dialogue (millions of distinct texts in
    the test split), so one table of all of them would grow with the split; texts that do
    repeat across neighbouring chunks are embedded once. At most ``max_items`` rows are kept."""

    def __init__(self, embedder: Embedder, max_items: int = 200_000):
        self.embedder, self.max_items = embedder, max_items
        self.rows: OrderedDict[str, Tensor] = OrderedDict()
        self.embedded = 0  # texts sent to the embedder (for throughput figures)

    def table(self, texts: list[str]) -> Tensor:
        """[len(texts), E] embeddings of distinct ``texts``, in order."""
        missing = [t for t in texts if t not in self.rows]
        if missing:
            fresh = self.embedder.embed_texts(missing).float().cpu()
            self.embedded += len(missing)
            self.rows.update(zip(missing, [row.clone() for row in fresh]))  # no view pins a chunk
        out = torch.stack([self.rows[t] for t in texts]) if texts else torch.empty(0, 0)
        for t in texts:
            self.rows.move_to_end(t)
        while len(self.rows) > self.max_items:
            self.rows.popitem(last=False)
        return out


@dataclass
class _Totals:
    """What the chunks of an MMDialog evaluation leave behind: ranks and per-query outputs, no
    embedding tables (so memory does not grow with the number of dialogues' candidates)."""

    text: list = field(default_factory=list)
    text_mean: list = field(default_factory=list)
    image: list = field(default_factory=list)
    overall: list = field(default_factory=list)
    overall_mean: list = field(default_factory=list)
    overall_missed: list = field(default_factory=list)
    image_out: list = field(default_factory=list)
    has_image: list = field(default_factory=list)
    text_pool: list = field(default_factory=list)
    image_pool: list = field(default_factory=list)
    gt_texts: int = 0
    gt_images: int = 0
    contexts_cut: int = 0
    consistency: list = field(default_factory=lambda: [0.0, 0])
    attribute: list = field(default_factory=lambda: [0, 0])
    examples: list = field(default_factory=list)

    @staticmethod
    def cat(parts: list, dtype=torch.long) -> Tensor:
        return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


@dataclass(frozen=True)
class _Rules:
    """How the evaluated system answers (`unimur.inference.rules`) and reads the dialogue."""

    image_rule: str
    text_ranking: str
    with_text: bool
    image_threshold: float | None
    ret_max_tokens: int
    builder: PromptBuilder

    def reserve(self, q: MMDialogQuery) -> int:
        """Positions the context must leave free: [RET], the longest candidate (likelihood), the
        generated tokens and the [RET] read after them (ret-token)."""
        room = 1
        if self.text_ranking == "likelihood":
            room = max(room, self.builder.candidate_tokens([*q.negative_texts, *q.gt_texts]))
        if self.image_rule == "ret-token":
            room = max(room, self.ret_max_tokens + 1)
        return room


def _pool_sizes(valid_counts: Tensor) -> dict[str, float]:
    n = valid_counts.float()
    if n.numel() == 0:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": int(n.min()), "mean": round(float(n.mean()), 2), "max": int(n.max())}


def evaluate_mmdialog(embedder: Embedder, mmdialog_dir: str | Path, *, split: str = "test",
                      target: str = "last", embeddings: ImageEmbeddings | None = None,
                      image_threshold: float | None = None, n_examples: int = N_EXAMPLES,
                      image_rule: str | None = None, text_ranking: str = "embedding",
                      ret_max_tokens: int = RET_MAX_TOKENS, prompt_style: str = DEFAULT_PROMPT_STYLE,
                      max_context_tokens: int | None = None, attribute_labels=None, chunk_size: int = 64,
                      n_negatives: int = MMDIALOG_NEGATIVES,
                      data: MMDialogStream | tuple[Iterable[MMDialogQuery], Counter] | None = None
                      ) -> dict[str, Any]:
    """MMDialog multimodal response retrieval (SPEC section 4); results format: `unimur.evaluation`.

    Args:
        embedder: the model (or a stub) behind the :class:`Embedder` interface.
        mmdialog_dir: folder holding ``<split>/conversations.json`` and the images.
        target: "last" (the paper) or "every" turn after the first.
        embeddings: precomputed image embeddings (``unimur/extract_vis_emb.py``); when None,
            each chunk's images are embedded as it comes (recent ones cached). Keys missing from a given file: context images
            and negatives are dropped and counted, a ground-truth image is an error.
        image_threshold: with image_rule="threshold", output an image only when the best image
            scores above it (cosine).
        image_rule: "always" (UniMuR: both modalities), "threshold", or "ret-token" (FROMAGe: an
            image only when greedy decoding of up to ``ret_max_tokens`` tokens after the context,
            cut at the first newline, yields [RET]; the image is then retrieved with that
            [RET]'s hidden state); None: "threshold" when a threshold is given, else "always".
        text_ranking: "embedding" (UniMuR: cosine with u) or "likelihood" (FROMAGe: summed
            log p(text | context) under the frozen LLM ranks ``text``; the mean per token ranks
            ``text_mean_loglik``).
        prompt_style: how the context is laid out (`unimur.inference.prompting`): "dialogue" (FROMAGe's
            ``Q:``/``A:`` lines ending in ``\nA:``) or "flat".
        max_context_tokens: positions a context may take (default: the LLM's); longer contexts
            lose their oldest turns, counted in ``counts["contexts_cut"]``.
        chunk_size: queries embedded and scored together. Dialogues are read from the file as
            the chunks need them, and candidate texts and images embedded per chunk (recent
            ones cached), so memory does not grow with the number of dialogues.
        attribute_labels: what each image shows and each text names (the synthetic sets know:
            `unimur.data.synthetic.generator.mmdialog_attribute_labels`); adds the attribute consistency.
        n_negatives: the protocol's pool size, negatives per modality (999 in MMDialog); a query
            whose pool holds fewer (after dropping unusable images) is skipped and counted under
            ``counts["skipped_queries"]`` (``no_negative_images``, ``too_few_negative_texts``, ...).
        data: the queries, when the caller has them: a ``MMDialogStream(mmdialog_dir, split,
            target, check_images=embeddings is None)`` (read as the chunks need it), or a
            ``(queries, skipped)`` pair such as ``load_mmdialog`` returns (``skipped`` is read
            after the queries, so a generator may still be filling it). Default: a stream.
    """
    t0 = time.perf_counter()
    image_rule, text_ranking = response_rules("unimur", image_rule, text_ranking, image_threshold)
    _check_sizes(chunk_size, n_negatives, ret_max_tokens)
    queries, reader_skipped = _query_source(data, mmdialog_dir, split, target, embeddings)
    rules = _answer_rules(embedder, image_rule, text_ranking, image_threshold, ret_max_tokens, prompt_style,
                          max_context_tokens)
    chunks = ChunkedQueries(queries, chunk_size, embedder=embedder, embeddings=embeddings,
                            mmdialog_dir=mmdialog_dir, split=split, n_negatives=n_negatives,
                            with_text=rules.with_text)
    totals, text_cache, table = _evaluate_chunks(chunks, embedder, rules, attribute_labels=attribute_labels,
                                                 mmdialog_dir=mmdialog_dir, split=split, n_examples=n_examples)
    counts = _mmdialog_counts(reader_skipped, chunks, totals, text_cache.embedded, chunk_size)
    settings = _settings(rules, split, target, mmdialog_dir, embeddings, n_negatives, prompt_style,
                         max_context_tokens or rules.builder.max_tokens)
    return _results(settings, counts, totals, rules, table, timing_of(t0, chunks.n_scorable), attribute_labels)


def _check_sizes(chunk_size: int, n_negatives: int, ret_max_tokens: int) -> None:
    """Reject a chunk size, pool size or generation length below 1."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1 (the negatives per modality of a full pool), "
                         f"got {n_negatives}")
    if ret_max_tokens < 1:
        raise ValueError(f"ret_max_tokens must be >= 1, got {ret_max_tokens}")


def _query_source(data: MMDialogStream | tuple[Iterable[MMDialogQuery], Counter] | None,
                  mmdialog_dir: str | Path, split: str, target: str, embeddings: ImageEmbeddings | None
                  ) -> tuple[Iterable[MMDialogQuery], Counter]:
    """The queries and the reader's skip Counter: the caller's ``data``, else a stream over the
    split's file (checking that images exist only when no embeddings are given)."""
    if data is None:
        data = MMDialogStream(mmdialog_dir, split, target, check_images=embeddings is None)
    return data if isinstance(data, tuple) else (data, data.skipped)


def _answer_rules(embedder: Embedder, image_rule: str, text_ranking: str, image_threshold: float | None,
                  ret_max_tokens: int, prompt_style: str, max_context_tokens: int | None) -> _Rules:
    """How ``embedder`` answers and reads the dialogue: texts are retrieved when it ranks them by
    likelihood or has a text space; contexts are laid out by its own prompt builder if it has one."""
    with_text = text_ranking == "likelihood" or supports_text_retrieval(embedder)
    make_builder = getattr(embedder, "prompt_builder", None)
    builder = (make_builder(prompt_style, max_context_tokens) if make_builder is not None
               else PromptBuilder(prompt_style, max_context_tokens))
    return _Rules(image_rule, text_ranking, with_text, image_threshold, ret_max_tokens, builder)


def _evaluate_chunks(chunks: ChunkedQueries, embedder: Embedder, rules: _Rules, *, attribute_labels,
                     mmdialog_dir, split: str, n_examples: int
                     ) -> tuple[_Totals, _TextEmbeddingCache, MediaTable | None]:
    """Evaluate the queries chunk by chunk: what they leave behind, the candidate-text cache (its
    throughput count) and the last chunk's media table."""
    totals, text_cache, table = _Totals(), _TextEmbeddingCache(embedder), None
    for part, table in chunks:
        _evaluate_chunk(part, embedder, table, text_cache, totals, rules,
                        attribute_labels=attribute_labels, mmdialog_dir=mmdialog_dir, split=split,
                        n_examples=n_examples)
    return totals, text_cache, table


def _mmdialog_counts(reader_skipped: Counter, chunks: ChunkedQueries, totals: _Totals, texts_embedded: int,
                     chunk_size: int) -> dict[str, Any]:
    """The results' ``counts``: what was evaluated and what was skipped, by reason (failing when
    nothing was scorable)."""
    # the reader's reasons first, then the evaluation's (read now: a stream fills its Counter
    # as it is consumed)
    skipped = Counter(reader_skipped)
    skipped.update(chunks.skipped)
    chunks.check_end(skipped)
    image_skips = chunks.image_cache.unreadable if chunks.image_cache is not None else Counter()
    counts = split_counts(skipped, {"skipped_dialogues": _MMDIALOG_DIALOGUE_REASONS,
                                     "skipped_queries": _MMDIALOG_QUERY_REASONS | POOL_REASONS
                                     | {"unreadable_target_image", "empty_context_after_image_drop"}},
                           rest="dropped_elements")
    logger.info("MMDialog: %d queries evaluated, skipped %s", chunks.n_scorable, dict(skipped))
    return {
        "queries_evaluated": chunks.n_scorable,
        "queries_skipped": (sum(counts["skipped_queries"].values())
                            + sum(counts["skipped_dialogues"].values())),
        **counts, "unreadable_images": dict(sorted(image_skips.items())),
        "gt_texts": totals.gt_texts, "gt_images": totals.gt_images,
        "contexts_cut": totals.contexts_cut,
        "pool_sizes": {"text": _pool_sizes(_Totals.cat(totals.text_pool)),
                       "image": _pool_sizes(_Totals.cat(totals.image_pool))},
        "texts_embedded": texts_embedded, "chunk_size": chunk_size,
        "image_outputs": int(_Totals.cat(totals.image_out, torch.bool).sum()),
        "consistency_pairs": totals.consistency[1], "attribute_consistency_pairs": totals.attribute[1],
    }


def _results(settings: dict[str, Any], counts: dict[str, Any], totals: _Totals, rules: _Rules, table: MediaTable,
             timing: dict[str, Any], attribute_labels) -> dict[str, Any]:
    """The results dict (`unimur.evaluation`): the metrics and notes from what the chunks left."""
    metrics = _metrics(totals, rules)
    return {
        "benchmark": "mmdialog",
        "settings": settings,
        "metrics": metrics,
        "counts": counts,
        "timing": timing,
        "examples": totals.examples,
        "notes": _mmdialog_notes(rules.with_text, table.embeddings, metrics["cross_modal_consistency"],
                                 attribute_labels is not None),
    }


def _metrics(totals: _Totals, rules: _Rules) -> dict[str, Any]:
    texts_on = rules.with_text and bool(totals.text)
    image_out = _Totals.cat(totals.image_out, torch.bool)
    missed = _Totals.cat(totals.overall_missed, torch.bool)
    (c_sum, n_pairs), (a_hits, n_attribute) = totals.consistency, totals.attribute
    return {
        "text": recall_metrics(_Totals.cat(totals.text)) if texts_on else None,
        "text_mean_loglik": recall_metrics(_Totals.cat(totals.text_mean)) if totals.text_mean else None,
        "image": recall_metrics(_Totals.cat(totals.image)),
        "overall": recall_metrics(_Totals.cat(totals.overall), missed=missed) if texts_on else None,
        "overall_mean_loglik": (recall_metrics(_Totals.cat(totals.overall_mean), missed=missed)
                                if totals.overall_mean else None),
        # from integer counts: a float32 mean is off in the 8th digit (0.9900000095 for 297/300)
        "image_retrieval_rate": int(image_out.sum()) / image_out.numel() if image_out.numel() else float("nan"),
        "image_output": image_output_quality(image_out, _Totals.cat(totals.has_image, torch.bool)),
        "cross_modal_consistency": c_sum / n_pairs if n_pairs else None,
        "attribute_consistency": a_hits / n_attribute if n_attribute else None,
    }


def _settings(rules: _Rules, split: str, target: str, mmdialog_dir, embeddings: ImageEmbeddings | None,
              n_negatives: int, prompt_style: str, max_context_tokens: int | None) -> dict[str, Any]:
    likelihood = ("summed log p(text | context) under the frozen LLM, the text read after the prompt "
                  "(FROMAGe's; metrics.text); the mean per token ranks metrics.text_mean_loglik")
    return {
        "split": split, "target": target, "mmdialog_dir": str(mmdialog_dir),
        "text_retrieval": rules.with_text,
        "image_rule": rules.image_rule,
        "image_output_rule": describe_image_rule(rules.image_rule, rules.image_threshold, rules.ret_max_tokens),
        "image_threshold": rules.image_threshold, "ret_max_tokens": rules.ret_max_tokens,
        "text_ranking": rules.text_ranking if rules.with_text else None,
        "text_scoring": ({"embedding": "cosine with the unified embedding u", "likelihood": likelihood}
                         [rules.text_ranking] if rules.with_text else None),
        "prompt_style": prompt_style, "max_context_tokens": max_context_tokens,
        "context_fit": "a context longer than max_context_tokens (minus [RET], the longest candidate, "
                       "the generated tokens) loses its oldest turns (counts.contexts_cut)",
        "embeddings": "given" if embeddings is not None else "computed from the image files",
        "embeddings_meta": dict(embeddings.meta) if embeddings is not None else None,
        "n_negatives": n_negatives,
        "pool": f"per query: its distinct negatives, then its distinct ground-truth elements; "
                f"negatives equal to a ground-truth element are removed, and a query left with "
                f"fewer than {n_negatives} scorable negatives per modality is skipped "
                f"(counted in skipped_queries)",
        "ties": "lower pool index ranks first, so ties count against the ground truth",
        "overall": "recall over all ground-truth elements of both modalities; an image "
                   "element of a response with no image output is a miss; under ret-token the "
                   "response's image is ranked by the generated [RET]'s embedding",
        "image_output": "precision / recall / F1 of showing an image against whether the "
                        "ground-truth response holds one",
        "consistency": {"cross_modal": "mean CLIP cosine of the top-1 image (CLIP-V) and top-1 "
                                       "text (CLIP-T), where both are output and a CLIP pair exists",
                        "attribute": "share of responses whose top-1 text names an object the "
                                     "top-1 image shows (synthetic sets' labels)"},
        "score": "cosine (dot product of L2-normalised embeddings)", "ranks": "1-based",
    }


def _evaluate_chunk(part: list[MMDialogQuery], embedder: Embedder, table: MediaTable,
                    text_cache: _TextEmbeddingCache, totals: _Totals, rules: _Rules, *,
                    attribute_labels, mmdialog_dir, split: str, n_examples: int) -> None:
    """Embed, score and rank one chunk of queries; add what it leaves behind to ``totals``."""
    embeddings = table.embeddings
    contexts, cut = _prompts(part, table, rules.builder, [rules.reserve(q) for q in part])
    totals.contexts_cut += cut
    u = embedder.embed_queries(contexts).float().cpu()                            # [c, E]
    check_dims(u, embeddings.embeds, "the image embeddings")
    image_pools = _image_pools(part, table)
    images = Scored.compute(u, embeddings.embeds, image_pools)
    text_table, text_pools = _text_pools(part)
    texts, texts_mean = _rank_texts(embedder, contexts, u, text_table, text_pools, text_cache, rules)
    if texts_mean is not None:
        totals.text_mean.append(texts_mean.ranks)
    generations, image_out, response = _image_answers(embedder, contexts, u, images, embeddings.embeds,
                                                      image_pools, rules)
    _add_images_and_pools(totals, images, image_out, image_pools, text_pools)
    if texts is not None:
        _add_overall(totals, texts, texts_mean, response, image_out)
        _add_consistency(totals, embedder, embeddings, response, image_out, text_table, texts, attribute_labels)
    wanted = n_examples - len(totals.examples)
    if wanted > 0:
        examples = _mmdialog_examples(part, mmdialog_dir, split, table, images, texts, text_table, image_out,
                                      wanted)
        _add_response_details(examples, images, response, texts_mean, contexts, generations)
        totals.examples += examples


def _rank_texts(embedder: Embedder, contexts: list[list], u: Tensor, text_table: list[str], text_pools: Pools,
                text_cache: _TextEmbeddingCache, rules: _Rules) -> tuple[Scored | None, Scored | None]:
    """The chunk's text pools scored the system's way: (summed log-likelihood or cosine with u,
    mean log-likelihood per token or None); (None, None) without text retrieval."""
    if rules.text_ranking == "likelihood":
        read_as = [candidate_text(t, rules.builder.style) for t in text_table]
        return _likelihood_texts(embedder, contexts, read_as, text_pools)
    if rules.with_text:
        text_embeds = text_cache.table(text_table)                               # [N_chunk, E]
        check_dims(u, text_embeds, "the text embeddings")
        return Scored.compute(u, text_embeds, text_pools), None
    return None, None


def _image_answers(embedder: Embedder, contexts: list[list], u: Tensor, images: Scored, image_embeds: Tensor,
                   image_pools: Pools, rules: _Rules) -> tuple[Any, Tensor, Scored]:
    """Which responses show an image (the system's image rule), and the images ranked for each
    response: (FROMAGe's generations or None, image_out [c] bool, the response's scored images)."""
    generations = (embedder.generate_responses(contexts, rules.ret_max_tokens)
                   if rules.image_rule == "ret-token" else None)
    image_out = image_outputs(images.has_output(), images.top_score, rules.image_rule, rules.image_threshold,
                              generations.ret if generations is not None else None)
    # the response's image: FROMAGe retrieves it with the generated [RET]'s state
    response = images if generations is None else Scored.compute(
        torch.where(generations.ret[:, None], generations.u.float(), u), image_embeds, image_pools)
    return generations, image_out, response


def _add_images_and_pools(totals: _Totals, images: Scored, image_out: Tensor, image_pools: Pools,
                          text_pools: Pools) -> None:
    """Add the chunk's image ranks and outputs, and both modalities' pool sizes and ground-truth
    counts, to ``totals``."""
    totals.image.append(images.ranks)
    totals.image_out.append(image_out)
    totals.has_image.append(image_pools.positive.any(1))
    totals.image_pool.append(images.pools.valid.sum(1))
    totals.gt_images += int(images.pools.positive.sum())
    totals.text_pool.append(text_pools.valid.sum(1))
    totals.gt_texts += int(text_pools.positive.sum())


def _add_overall(totals: _Totals, texts: Scored, texts_mean: Scored | None, response: Scored,
                 image_out: Tensor) -> None:
    """Add the chunk's text ranks and overall ranks (both modalities, missed images) to ``totals``."""
    totals.text.append(texts.ranks)
    ranks, missed = _overall_ranks(texts, response, image_out)
    totals.overall.append(ranks)
    totals.overall_missed.append(missed)
    if texts_mean is not None:
        totals.overall_mean.append(_overall_ranks(texts_mean, response, image_out)[0])


def _add_consistency(totals: _Totals, embedder: Embedder, embeddings: ImageEmbeddings, response: Scored,
                     image_out: Tensor, text_table: list[str], texts: Scored, attribute_labels) -> None:
    """Add the chunk's cross-modal (CLIP) and attribute consistency sums and pairs to ``totals``."""
    c_sum, c_n = _consistency(embedder, embeddings, response, image_out, text_table, texts)
    totals.consistency = [totals.consistency[0] + c_sum, totals.consistency[1] + c_n]
    if attribute_labels is not None:
        hits, n = _attribute_consistency(attribute_labels, embeddings, response, image_out, text_table, texts)
        totals.attribute = [totals.attribute[0] + hits, totals.attribute[1] + n]


def _add_response_details(examples: list[dict[str, Any]], images: Scored, response: Scored,
                          texts_mean: Scored | None, contexts: list[list], generations) -> None:
    """Add to each of the chunk's first examples how its response was answered: whether the ground
    truth holds an image, the top image score, the response's image ranks, the prompt as read,
    and FROMAGe's mean log-likelihood ranks and generated text where they exist."""
    response_ranks = response.ranks_per_query()
    mean_ranks = texts_mean.ranks_per_query() if texts_mean is not None else None
    for q, ex in enumerate(examples):
        ex["gt_has_image"] = bool(images.pools.positive[q].any())
        ex["top_image_score"] = float(images.top_score[q])
        ex["response_image_ranks"] = response_ranks[q]
        ex["prompt"] = _render_prompt(contexts[q])
        if mean_ranks is not None:
            ex["text_mean_ranks"] = mean_ranks[q]
        if generations is not None:
            ex["generated_text"] = generations.texts[q]


def _render_prompt(pieces: Sequence) -> str:
    """The context as the LLM reads it, images as ``<image>``."""
    return "".join(p if isinstance(p, str) else "<image>" for p in pieces)


def _mmdialog_notes(with_text: bool, embeddings: ImageEmbeddings, consistency: float | None,
                    labelled: bool = False) -> list[str]:
    notes = []
    if not with_text:
        notes.append("method=fromage has no text retrieval space: image metrics only (text, "
                     "overall and cross-modal consistency are not computed; --text-ranking "
                     "likelihood ranks texts FROMAGe's way)")
    elif embeddings.clip_embeds is None:
        notes.append("the image embeddings carry no CLIP-V embeddings (no joint image-text "
                     "space): cross-modal consistency is not computed"
                     + ("; attribute consistency (synthetic labels) is" if labelled else ""))
    elif consistency is None:
        notes.append("no query output both an image and a text: no cross-modal consistency")
    return notes


def _render_context(q: MMDialogQuery) -> str:
    return " ".join(value if kind == "text" else "[image]" for kind, value in q.context)


def _mmdialog_examples(queries: Sequence[MMDialogQuery], mmdialog_dir: str | Path, split: str,
                       table: MediaTable, images: Scored, texts: Scored | None,
                       text_table: list[str], image_out: Tensor, n: int) -> list[dict[str, Any]]:
    """The first ``n`` queries with their top retrieved images and texts."""
    n = min(n, len(queries))
    ids = table.embeddings.ids
    path = lambda key: str(media_path(mmdialog_dir, split, key))  # noqa: E731
    img_vals, img_cols = ranked_top_k(images.scores[:n], EXAMPLE_TOP_K)
    image_ranks = images.ranks_per_query()
    if texts is not None:
        txt_vals, txt_cols = ranked_top_k(texts.scores[:n], EXAMPLE_TOP_K)
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
                for s, c in zip(img_vals[q].tolist(), img_cols[q].tolist()) if is_valid_score(s)],
        }
        if texts is not None:
            ex["text_ranks"] = text_ranks[q]
            ex["retrieved_texts"] = [
                {"text": text_table[int(texts.pools.index[q, c])], "score": s,
                 "is_gt": bool(texts.pools.positive[q, c])}
                for s, c in zip(txt_vals[q].tolist(), txt_cols[q].tolist()) if is_valid_score(s)]
        examples.append(ex)
    return examples
