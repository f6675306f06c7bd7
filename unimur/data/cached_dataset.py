"""CC3M captions with their cached frozen features: a split read (`unimur.data.cc3m_sources`),
its feature cache loaded or built (`unimur.data.feature_cache`), and the dataset over both
(no image decoding during training)."""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from unimur.data.cc3m import CaptionRow, RowTable
from unimur.data.cc3m_sources import read_split
from unimur.data.feature_cache import FeatureCache, load_or_build_feature_cache
from unimur.utils.distributed import is_main_process

logger = logging.getLogger(__name__)

__all__ = ["CachedCaptionDataset", "build_cached_cc3m_dataset"]


class CachedCaptionDataset(Dataset):
    """Like :class:`~unimur.data.cc3m.CaptionDataset` but samples carry cached CLIP features.

    A sample is ``{"index", "caption", "image_pooled", "image_embed", "text_embed"}``
    (no image decoding). Rows whose image was unusable when the cache was built are
    excluded up front; ``skipped`` counts them per reason, ``read_skipped`` holds the TSV
    row-level counts when given. Use with :class:`~unimur.data.cc3m.CaptionCollator`.
    """

    def __init__(self, rows: Sequence[CaptionRow], cache: FeatureCache, read_skipped: Counter | None = None):
        if len(rows) != cache.num_rows:
            raise ValueError(f"{cache.path} holds {cache.num_rows} rows, the dataset has {len(rows)}: wrong cache")
        self.rows = rows if isinstance(rows, RowTable) else RowTable(rows)  # see RowTable: worker memory
        self.cache = cache
        self.positions = torch.nonzero(cache.valid).flatten()  # (M,) row positions with a usable image
        self.skipped = cache.skip_counts()
        self.read_skipped = Counter(read_skipped or {})
        if len(self.positions) == 0:
            raise ValueError(f"{cache.path}: none of the {len(rows)} images is usable ({dict(self.skipped)})")
        if is_main_process():
            logger.info(
                "cached dataset: %d of %d rows usable, %d excluded (%s)",
                len(self.positions), len(rows), sum(self.skipped.values()),
                ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none",
            )

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        pos = int(self.positions[i])
        row = self.rows[pos]
        return {
            "index": row.index,
            "caption": row.caption,
            # clone: detach the sample from the memory map before it crosses process boundaries
            "image_pooled": self.cache.image_pooled[pos].clone(),
            "image_embed": self.cache.image_embed[pos].clone(),
            "text_embed": self.cache.text_embed[pos].clone(),
        }


def build_cached_cc3m_dataset(
    dataset_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    encoders,
    cache_dir: str | os.PathLike,
    split: str = "train",
    dataset_format: str = "tsv",
    **cache_kwargs: Any,
) -> CachedCaptionDataset:
    """Read one split (``unimur.data.cc3m_sources``: tsv, img2dataset or wds), load or build its cache
    (named ``cc3m_<split>``, keyed by the split's shard-level fingerprint)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data = read_split(dataset_format, dataset_dir, image_dir, split)
    cache = load_or_build_feature_cache(data.rows, encoders, cache_dir, name=f"cc3m_{split}",
                                        fingerprint=data.fingerprint, **cache_kwargs)
    return CachedCaptionDataset(data.rows, cache, read_skipped=data.skipped)
