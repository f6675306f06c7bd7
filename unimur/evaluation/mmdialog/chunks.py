"""MMDialog queries on their way to scoring, chunk by chunk: media resolved against the image
embeddings (a given file, or images embedded per chunk with a bounded cache), pools checked
against the protocol's size, and chunks of ``chunk_size`` scorable queries handed out as the
reader yields them, so nothing here grows with the number of dialogues."""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Sequence

import torch

from unimur.data.mmdialog import MMDialogQuery, media_path
from unimur.evaluation.common import add_count
from unimur.inference.embedder import Embedder, NoUsableImages
from unimur.inference.image_embeddings import TENSORS, ImageEmbeddings

logger = logging.getLogger(__name__)

# Queries whose candidate pool is smaller than the protocol's (see _short_pool).
POOL_REASONS = {f"{n}_negative_{m}" for n in ("no", "too_few") for m in ("images", "texts")}
_POOL_HINT = ("a set with fewer negatives per dialogue states its size with --n-negatives (the "
              "synthetic sets: the --n-negatives they were generated with)")


class MediaTable:
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


class _ImageEmbeddingCache:
    """Image files embedded as the chunks need them, recent ones kept.

    Negative images mostly differ from dialogue to dialogue, so embedding every image of the
    split up front would hold a table that grows with it; images that do repeat across
    neighbouring chunks are embedded once. At most ``max_items`` images are kept between calls
    (a call holds all of its own keys until it returns). Unreadable images are remembered (they
    are few) so each is tried, and counted in ``unreadable`` by reason, once.
    """

    def __init__(self, embedder: Embedder, mmdialog_dir: str | Path, split: str,
                 max_items: int = 100_000):
        self.embedder, self.root, self.split, self.max_items = embedder, mmdialog_dir, split, max_items
        self.rows: OrderedDict[str, tuple] = OrderedDict()  # key -> one row per TENSORS entry
        self.failed: set[str] = set()
        self.unreadable: Counter = Counter()
        self.embedded = 0  # images sent to the embedder

    def table(self, keys: list[str]) -> ImageEmbeddings:
        """Embeddings of the readable images among the distinct ``keys``, in order."""
        usable = self._fetch(keys)
        columns = list(zip(*(self.rows[k] for k in usable))) or [()] * len(TENSORS)
        tensors = {name: (torch.stack(col) if col and col[0] is not None else None)
                   for name, col in zip(TENSORS, columns)}
        if tensors["embeds"] is None:
            tensors["embeds"] = torch.empty(0, 0)
        self._evict()
        return ImageEmbeddings(usable, **tensors)

    def usable(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are readable images (embedding the ones not seen yet)."""
        usable = set(self._fetch(keys))
        self._evict()
        return usable

    def _fetch(self, keys: list[str]) -> list[str]:
        self._embed([k for k in keys if k not in self.rows and k not in self.failed])
        usable = [k for k in keys if k in self.rows]
        for k in usable:
            self.rows.move_to_end(k)
        return usable

    def _evict(self) -> None:
        while len(self.rows) > self.max_items:
            self.rows.popitem(last=False)

    def _embed(self, keys: list[str]) -> None:
        if not keys:
            return
        paths = [media_path(self.root, self.split, k) for k in keys]
        logger.debug("MMDialog: embedding %d images", len(keys))
        self.embedded += len(keys)
        try:
            emb, skipped = self.embedder.embed_images(paths, ids=keys)
        except NoUsableImages as e:  # a chunk whose new images are all unreadable
            self.failed.update(keys)
            self.unreadable.update(Counter(e.skipped.values()))
            return
        self.unreadable.update(skipped)
        self.failed.update(set(keys) - set(emb.ids))
        # clone: a row view would keep the whole batch's tensor alive
        columns = [getattr(emb, n) for n in TENSORS]
        for i, key in enumerate(emb.ids):
            self.rows[key] = tuple(None if t is None else t[i].clone() for t in columns)


def _resolve_query(q: MMDialogQuery, has: Callable[[str], bool], given: bool, dropped: Counter
                   ) -> MMDialogQuery | None:
    """Drop media without an embedding: context images and negatives are counted, a missing
    target drops the query (embedded here) or is returned as None for the caller to report
    (given file)."""
    missing = "not_in_embeddings" if given else "unreadable"
    context, turn_of = [], []
    turns = q.context_turns or [0] * len(q.context)
    for (kind, value), turn in zip(q.context, turns):
        if kind == "image" and not has(value):
            dropped[f"context_image_{missing}"] += 1
            continue
        context.append((kind, value))
        turn_of.append(turn)
    negatives = [k for k in q.negative_media_keys if has(k)]
    add_count(dropped, f"negative_image_{missing}", len(q.negative_media_keys) - len(negatives))
    if not all(has(k) for k in q.gt_media_keys):
        return None
    return replace(q, context=context, context_turns=turn_of, negative_media_keys=negatives)


def _distinct_negatives(q: MMDialogQuery, dropped: Counter) -> MMDialogQuery:
    """The pool as it is scored: negatives identical to a ground-truth element are not
    negatives (retrieving one is retrieving the right answer, and as an exact tie it would
    otherwise count against it), and a negative listed twice is one candidate (nine copies of
    one wrong answer make a pool of two, not ten)."""
    gt_t, gt_m = set(q.gt_texts), set(q.gt_media_keys)
    texts = list(dict.fromkeys(t for t in q.negative_texts if t not in gt_t))
    keys = list(dict.fromkeys(k for k in q.negative_media_keys if k not in gt_m))
    n_gt_t = sum(t in gt_t for t in q.negative_texts)
    n_gt_m = sum(k in gt_m for k in q.negative_media_keys)
    add_count(dropped, "negative_text_equal_to_gt", n_gt_t)
    add_count(dropped, "negative_image_equal_to_gt", n_gt_m)
    add_count(dropped, "duplicate_negative_text", len(q.negative_texts) - n_gt_t - len(texts))
    add_count(dropped, "duplicate_negative_image", len(q.negative_media_keys) - n_gt_m - len(keys))
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


class ChunkedQueries:
    """Scorable queries in chunks of ``chunk_size``, each with the media table that covers it.

    Consumes ``queries`` (a :class:`unimur.data.mmdialog.MMDialogStream` or any iterable) a batch
    of ``chunk_size`` at a time, so only a chunk's queries, its images and the bounded caches
    are in memory. A chunk holds ``chunk_size`` scorable queries (the last one fewer) whatever
    was skipped on the way, which keeps the scores independent of where skips fall.

    With ``embeddings`` (a precomputed file) media are looked up there; without, each batch's
    images are embedded now (``image_cache``). Queries that cannot be scored are counted in
    ``skipped`` by reason: ``unreadable_target_image``, ``empty_context_after_image_drop``, the
    pool-size reasons (:data:`POOL_REASONS`); dropped elements too (``context_image_*``,
    ``negative_image_*``, ``negative_*_equal_to_gt``, ``duplicate_negative_*``). The pool-size
    rule counts the negatives that are actually scored: non-empty texts and images with a file
    or an embedding, distinct, none equal to a ground-truth element.
    """

    def __init__(self, queries: Iterable[MMDialogQuery], chunk_size: int, *, embedder: Embedder,
                 embeddings: ImageEmbeddings | None, mmdialog_dir: str | Path, split: str,
                 n_negatives: int, with_text: bool):
        self.queries, self.chunk_size = queries, chunk_size
        self.n_negatives, self.with_text = n_negatives, with_text
        self.given = embeddings is not None
        self.given_table = MediaTable(embeddings) if embeddings is not None else None
        self.image_cache = (None if embeddings is not None
                            else _ImageEmbeddingCache(embedder, mmdialog_dir, split))
        self.skipped: Counter = Counter()
        self.n_scorable = 0

    def __iter__(self) -> Iterator[tuple[list[MMDialogQuery], MediaTable]]:
        ready: list[MMDialogQuery] = []
        it = iter(self.queries)
        while batch := list(islice(it, self.chunk_size)):
            ready += self._prepare(batch)
            while len(ready) >= self.chunk_size:
                part, ready = ready[:self.chunk_size], ready[self.chunk_size:]
                yield part, self._table(part)
        if ready:
            yield ready, self._table(ready)

    def _table(self, part: list[MMDialogQuery]) -> MediaTable:
        if self.given_table is not None:
            return self.given_table
        return MediaTable(self.image_cache.table(_needed_media(part)))

    def _prepare(self, batch: list[MMDialogQuery]) -> list[MMDialogQuery]:
        if self.given_table is not None:
            table = self.given_table
            has = lambda key: table.row(key) is not None  # noqa: E731
        else:
            has = self.image_cache.usable(_needed_media(batch)).__contains__
        out, missing_targets = [], []
        for q in batch:
            resolved = _resolve_query(q, has, self.given, self.skipped)
            if resolved is None:
                if self.given:
                    missing_targets += [k for k in q.gt_media_keys if not has(k)]
                else:
                    self.skipped["unreadable_target_image"] += 1
                continue
            if not resolved.context:
                self.skipped["empty_context_after_image_drop"] += 1
                continue
            # the pool-size rule judges the pool that is scored: distinct negatives, none equal
            # to the answer (a pool of copies of the answer is a free hit)
            dropped = Counter()
            scored = _distinct_negatives(resolved, dropped)
            short = _short_pool(scored, self.n_negatives, self.with_text)
            if short is not None:
                self.skipped[short] += 1
                continue
            self.skipped.update(dropped)
            out.append(scored)
        if missing_targets:
            raise ValueError(
                f"{len(missing_targets)} ground-truth media keys of {len(batch)} queries are not in "
                f"the embedding file (e.g. {missing_targets[:3]}): it does not cover this split; "
                f"re-run unimur/extract_vis_emb.py over it, or omit --embeddings to embed the "
                f"images now")
        self.n_scorable += len(out)
        return out

    def check_end(self, skipped: Counter) -> None:
        """After the last chunk: fail if nothing was scorable, warn about short pools.
        ``skipped`` holds the reader's reasons and these."""
        n_short = sum(skipped[r] for r in POOL_REASONS)
        if not self.n_scorable:
            raise ValueError(f"no MMDialog query left to evaluate (skipped: {dict(skipped)})"
                             + (f"; {n_short} pools are smaller than {self.n_negatives} negatives "
                                f"per modality: {_POOL_HINT}" if n_short else ""))
        if n_short:
            logger.warning("MMDialog: %d queries skipped, not scored: their candidate pools hold "
                           "fewer than %d negatives per modality (%s); %s", n_short,
                           self.n_negatives, {r: skipped[r] for r in sorted(POOL_REASONS) if skipped[r]},
                           _POOL_HINT)
        if self.image_cache is not None:
            logger.info("MMDialog: %d images embedded in chunks, unreadable %s",
                        self.image_cache.embedded, dict(self.image_cache.unreadable))
