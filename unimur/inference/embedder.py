"""The embedder: queries (dialogue contexts), images and texts embedded in batches with a
trained model, plus FROMAGe's generative scoring on the same model.

`Embedder` is the small interface the evaluations use; `ModelEmbedder` implements it with a
`UniMuR` model, and tests substitute a stub whose embeddings make the answer known. One query
embedding u scores both candidate images and candidate texts (SPEC section 3); the ranking over
pools is `unimur.inference.retriever`.
"""
from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from unimur.inference.image_embeddings import ImageEmbeddings
from unimur.model.backbones.hub import square_input_size
from unimur.model.model import Piece, UniMuR
from unimur.utils.images import UnusableImage, load_rgb_image

logger = logging.getLogger(__name__)


class NoUsableImages(ValueError):
    """None of the images given to ``embed_images`` could be read; ``skipped`` maps each id to
    its reason (a caller embedding in batches counts them and carries on)."""

    def __init__(self, message: str, skipped: dict[str, str]):
        super().__init__(message)
        self.skipped = skipped


class Embedder(Protocol):
    def embed_queries(self, contexts: Sequence[Sequence[Piece]]) -> torch.Tensor:
        """(B, E) normalised unified embeddings of interleaved contexts."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, E) normalised retrieval-space text embeddings."""

    def embed_images(self, paths: Sequence[str | Path], ids: Sequence[str] | None = None
                     ) -> tuple[ImageEmbeddings, Counter]:
        """Embeddings of the usable images (ids in input order) and a Counter of skips."""

    def clip_text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, Dv) normalised frozen CLIP-T embeddings (cross-modal consistency)."""


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_rgb_image(self.paths[i])), None
        except UnusableImage as e:
            return i, None, e.reason
        except Exception as e:  # preprocessing of an odd image: count it, keep going
            return i, None, f"preprocess_error:{type(e).__name__}"


def _collate_images(samples):
    kept = [(i, x) for i, x, r in samples if x is not None]
    skipped = [(i, r) for i, x, r in samples if x is None]
    pixels = torch.stack([x for _, x in kept]) if kept else None
    return [i for i, _ in kept], pixels, skipped


IMAGE_RESIZE = ("crop", "squash")


class SquashThen:
    """Resize the whole image to the encoder's square input (aspect ratio not kept), then the
    encoder's own preprocessing (whose resize and centre crop are then no-ops): FROMAGe's
    evaluation-time image handling, for reproducing its reported numbers."""

    def __init__(self, preprocess):
        self.preprocess, self.size = preprocess, square_input_size(preprocess)

    def __call__(self, img):
        return self.preprocess(img.resize((self.size, self.size), Image.BICUBIC))


class ModelEmbedder:
    """`Embedder` backed by a UniMuR model (eval mode, no grad).

    image_resize: ``crop`` (the encoder's own preprocessing: resize the short side, centre
    crop) or ``squash`` (see `SquashThen`).
    memo: a `unimur.inference.frozen_pass_memo.FrozenPassMemo` shared with the embedders of other models on
    the same frozen backbones (a comparison of several models): the frozen image features and
    context passes are then computed once for all of them.
    """

    def __init__(self, model: UniMuR, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                 image_resize: str = "crop", memo=None):
        if image_resize not in IMAGE_RESIZE:
            raise ValueError(f"image_resize={image_resize!r}: expected one of {IMAGE_RESIZE}")
        self.model = model.eval()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.image_resize = image_resize
        self.memo = memo
        preprocess = model.encoders.preprocess
        self.image_preprocess = SquashThen(preprocess) if image_resize == "squash" else preprocess

    @torch.no_grad()
    def embed_queries(self, contexts: Sequence[Sequence[Piece]]) -> torch.Tensor:
        # Sort by length so each batch pads to similar lengths, then restore the order.
        order = sorted(range(len(contexts)), key=lambda i: _approx_len(contexts[i]))
        out = [None] * len(contexts)
        for start in self._bar(range(0, len(order), self.batch_size), "queries"):
            idx = order[start : start + self.batch_size]
            batch = [contexts[i] for i in idx]
            if self.memo is not None:
                from unimur.inference.frozen_pass_memo import unified_from_prefix

                u = unified_from_prefix(self.model, batch, self.memo)
            else:
                u = self.model.encode_context(batch, max_len=self.model.max_positions)
            for j, i in enumerate(idx):
                out[i] = u[j]
        return torch.stack(out).float() if out else torch.empty(0, self.model.emb_dim)

    # FROMAGe's inference (`unimur.inference.generative`), for --text-ranking likelihood / --image-rule ret-token

    def text_log_likelihoods(self, context: Sequence[Piece], candidates: Sequence[str]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, mean per token) of log p(candidate | context) under the frozen LLM: (C,), (C,)."""
        from unimur.inference.generative import candidate_log_likelihoods

        return candidate_log_likelihoods(self.model, context, candidates, batch_size=self.batch_size)

    def generate_responses(self, contexts: Sequence[Sequence[Piece]], max_tokens: int = 32):
        """FROMAGe's image rule: greedy decoding after each context (`unimur.inference.generative`):
        a `Generations` (whether a [RET] was generated, its unified embedding, the text)."""
        from unimur.inference.generative import Generations, generate_responses

        parts = [generate_responses(self.model, contexts[s : s + self.batch_size], max_tokens)
                 for s in self._bar(range(0, len(contexts), self.batch_size), "greedy responses")]
        return Generations.cat(parts, self.model.emb_dim)

    def prompt_builder(self, style: str, max_context_tokens: int | None = None):
        """Lays out dialogues in ``style`` and fits them to the LLM's positions (or to
        ``max_context_tokens``), counting with the model's tokenizer."""
        from unimur.inference.prompting import PromptBuilder

        tok = self.model.tokenizer
        return PromptBuilder(style, max_context_tokens or self.model.max_positions,
                             lambda s: len(tok(s, add_special_tokens=False)["input_ids"]),
                             self.model.config.n_visual_tokens, len(self.model._bos_ids))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.model.config.method == "fromage":
            raise ValueError("method=fromage has no text retrieval space (no W_t): "
                             "text retrieval needs a method=unimur model")
        return self.model.text_targets(self._clip_texts(texts)).float()

    @torch.no_grad()
    def clip_text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self._clip_texts(texts).float(), dim=-1)

    def _clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        # embed each distinct string once (MMDialog negatives repeat across dialogues)
        unique = list(dict.fromkeys(texts))
        chunks = [self.model.encode_texts(unique[s : s + self.batch_size])
                  for s in self._bar(range(0, len(unique), self.batch_size), "texts")]
        if not chunks:
            return torch.empty(0, self.model.encoders.text_embed_dim)
        table = torch.cat(chunks)
        if len(unique) == len(texts):  # already distinct (the evaluations pass unique pools)
            return table
        pos = {t: i for i, t in enumerate(unique)}
        return table[torch.tensor([pos[t] for t in texts], dtype=torch.long)]

    def _image_features(self, paths: list[Path]):
        """Per batch: (row indices, frozen ImageFeatures); and the skipped (row, reason) pairs.
        From the memo when another model's embedder read the same files the same way."""
        key = (self.model.encoders.identity, self.image_resize, self.batch_size, tuple(map(str, paths)))
        if self.memo is not None and key in self.memo.images:
            self.memo.stats["images_hit"] += 1
            return self.memo.images[key]
        loader = DataLoader(_ImageFiles(paths, self.image_preprocess), batch_size=self.batch_size,
                            num_workers=self.num_workers, collate_fn=_collate_images)
        batches, skipped = [], []
        for idx, pixels, skips in self._bar(loader, "images"):
            for i, reason in skips:
                skipped.append((i, reason))
                logger.warning("skipping image %s: %s", paths[i], reason)
            if pixels is not None:
                batches.append((idx, self.model.encode_images(pixels)))
        if self.memo is not None:
            self.memo.stats["images_miss"] += 1
            self.memo.images[key] = (batches, skipped)
        return batches, skipped

    @torch.no_grad()
    def embed_images(self, paths, ids=None) -> tuple[ImageEmbeddings, Counter]:
        paths = [Path(p) for p in paths]
        ids = [str(i) for i in ids] if ids is not None else [str(p) for p in paths]
        batches, skips = self._image_features(paths)
        skipped = {ids[i]: reason for i, reason in skips}
        rows, embeds, caps, clips = [], [], [], []
        for idx, feats in batches:
            rows += idx
            embeds.append(self.model.image_targets(feats).float().cpu())
            caps.append(self.model.cap_input(feats).float().cpu())
            clips.append(F.normalize(feats.embed.float(), dim=-1).cpu())
        if not rows:
            raise NoUsableImages(f"none of the {len(paths)} images could be read "
                                 f"({dict(Counter(skipped.values()))})", skipped)
        enc = self.model.encoders
        # CLIP-V embeddings serve the cross-modal consistency (a cosine with CLIP-T): only
        # meaningful when image and text encoders share one space (not EfficientNet + MiniLM)
        clip = torch.cat(clips) if enc.image_embed_dim == enc.text_embed_dim else None
        emb = ImageEmbeddings([ids[i] for i in rows], torch.cat(embeds), torch.cat(caps), clip,
                              meta={"skipped": skipped})  # id -> reason of each unusable image
        return emb, Counter(skipped.values())

    def _bar(self, it, desc: str):
        return tqdm(it, desc=f"embed {desc}", disable=not self.progress, leave=False, file=sys.stderr)


def _approx_len(context: Sequence[Piece]) -> int:
    return sum(len(p) // 4 + 1 if isinstance(p, str) else 1 for p in context)
