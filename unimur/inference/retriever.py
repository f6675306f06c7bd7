"""Retrieval with a trained model: the top-k images and texts of a pool for each context,
from one unified query embedding (SPEC section 3). Embedding is `unimur.inference.embedder`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from unimur.inference.embedder import Embedder, ModelEmbedder
from unimur.inference.image_embeddings import ImageEmbeddings
from unimur.model.model import Piece, UniMuR
from unimur.ranking import topk_chunked


@dataclass
class RetrievalResult:
    images: list[tuple[str, float]]   # (image id, cosine score), best first
    texts: list[tuple[str, float]]    # (text, cosine score), best first


class Retriever:
    """Top-k images from an embedding index and top-k texts from a text pool, for contexts.

    The candidate embeddings are computed once at construction (pools are fixed)."""

    def __init__(self, embedder: Embedder, images: ImageEmbeddings | None = None,
                 texts: Sequence[str] | None = None):
        self.embedder = embedder
        self.images = images
        self.texts = list(texts) if texts is not None else None
        self.text_embeds = embedder.embed_texts(self.texts) if self.texts else None

    @classmethod
    def from_model(cls, model: UniMuR, images: ImageEmbeddings | None = None,
                   texts: Sequence[str] | None = None, batch_size: int = 64,
                   progress: bool = False) -> "Retriever":
        """A retriever over ``images`` (an embedding file's contents) and ``texts`` for ``model``;
        ValueError if the image file's tensors do not fit the model or hold NaN/inf rows."""
        if images is not None:
            from unimur.inference.image_embeddings import check_widths, finite_rows, model_widths

            check_widths(images, "(image pool)", model_widths(model))
            images = finite_rows(images, "(image pool)")
        return cls(ModelEmbedder(model, batch_size=batch_size, progress=progress), images, texts)

    def retrieve(self, contexts: Sequence[Sequence[Piece]], k: int = 5) -> list[RetrievalResult]:
        """Top-``k`` images and texts for each context (a list of pieces: text, PIL images,
        W_cap input features), best first."""
        u = self.embedder.embed_queries(contexts)
        images = self.rank_images(u, k)
        texts: list[list[tuple[str, float]]] = [[] for _ in range(u.shape[0])]
        if self.text_embeds is not None:
            scores, idx = topk_chunked(u, self.text_embeds.to(u.device), k)
            texts = [[(self.texts[int(i)], float(s)) for s, i in zip(scores[q], idx[q])] for q in range(u.shape[0])]
        return [RetrievalResult(i, t) for i, t in zip(images, texts)]

    def rank_images(self, u: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-``k`` (image id, cosine) per row of ``u`` (B, E): a context's, or a generated [RET]'s."""
        if self.images is None:
            return [[] for _ in range(u.shape[0])]
        scores, idx = topk_chunked(u.to(self.images.embeds.dtype), self.images.embeds.to(u.device), k)
        return [[(self.images.ids[int(i)], float(s)) for s, i in zip(scores[q], idx[q])] for q in range(u.shape[0])]
