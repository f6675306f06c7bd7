"""CC3M caption data: the TSV reader, the dataset and the batch collator (images are read by
:mod:`unimur.utils.images`).

The format (SPEC section 5) is a UTF-8 TSV with the header ``caption<TAB>image`` and one
image-caption pair per line; image names resolve against ``--image-dir``. Real dumps hold
bad rows and bad images, so nothing here raises mid-epoch for a data problem:

* **Row problems** are found once, when the TSV is read (cheap checks only), counted per
  kind and dropped: ``blank_line``, ``bad_encoding`` (not UTF-8), ``bad_fields`` (not
  exactly two tab-separated fields), ``empty_caption``, ``empty_image_name``,
  ``missing_image`` (no such file under the image dir).
* **Image problems** are found when a sample is loaded. The sample is then returned with
  ``pixels=None`` and ``skip=<reason>``; :class:`CaptionCollator` drops it and counts it
  in ``batch["skipped"]``. No replacement sample is drawn (that would silently change the
  data distribution and make epochs differ between runs). Reasons, in
  :data:`IMAGE_SKIP_REASONS`: the file vanished (``missing_image``), cannot be opened
  (``unreadable_image``), is not an image (``not_an_image``), fails to decode, e.g.
  truncated (``corrupt_image``), is a decompression bomb (``too_large``), is degenerate
  (``too_small``, ``extreme_aspect``, see :class:`ImageChecks`), has a colour mode that has no
  RGB conversion (``unsupported_mode``) or made the preprocessing fail (``preprocess_error``).

Batch layout produced by :class:`CaptionCollator` (B = kept samples, possibly 0):

* ``index`` (B,) long: row index of each sample in its TSV (0 = first line after the header);
* ``captions``: list of B caption strings;
* ``pixels`` (B, 3, H, W) for :class:`CaptionDataset`, or ``image_pooled`` (B, Dp),
  ``image_embed`` (B, Dv), ``text_embed`` (B, Dt) for the cached dataset
  (``unimur.data.cached_dataset.CachedCaptionDataset``); absent when B == 0;
* ``caption_ids``/``caption_mask``/``ret_ids``/``ret_mask``: from
  :func:`unimur.model.tokenizer.tokenize_captions` ((0, 0) tensors when B == 0);
* ``skipped``: ``Counter`` of the reasons of the samples dropped from this batch.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from unimur.model.tokenizer import tokenize_captions
from unimur.utils.distributed import get_world_size, is_initialized, is_main_process
from unimur.utils.images import ImageChecks, UnusableImage, load_rgb_image

logger = logging.getLogger(__name__)

__all__ = [
    "TSV_HEADER",
    "ROW_SKIP_REASONS",
    "FEATURE_KEYS",
    "CaptionRow",
    "RowTable",
    "read_caption_tsv",
    "CaptionDataset",
    "CaptionCollator",
    "SkipCounter",
    "num_samples",
    "is_empty_batch",
    "build_cc3m_datasets",
]

TSV_HEADER = ("caption", "image")

# Kinds of bad rows found by read_caption_tsv (never reach a Dataset).
ROW_SKIP_REASONS = (
    "blank_line",
    "bad_encoding",
    "bad_fields",
    "empty_caption",
    "empty_image_name",
    "missing_image",
)

# Per-sample tensors the collator stacks when present (pixels, or cached CLIP features).
FEATURE_KEYS = ("pixels", "image_pooled", "image_embed", "text_embed")


# --------------------------------------------------------------------------- TSV reader


@dataclass(frozen=True, slots=True)
class CaptionRow:
    """One valid TSV row.

    index: 0-based position among the data lines of the TSV (the line after the header is 0),
        so it identifies the row even after bad rows were dropped.
    caption: the caption, surrounding whitespace stripped.
    image_path: the image file, resolved against the image dir.
    """

    index: int
    caption: str
    image_path: str


class RowTable(Sequence[CaptionRow]):
    """CaptionRows packed into a few numpy buffers; indexing rebuilds a CaptionRow.

    Why: a Dataset holding 3M Python objects is copied page by page into every forked
    DataLoader worker as the workers touch the objects' reference counts (pytorch issue
    #13246); numpy buffers have no per-row refcounts, so the workers keep sharing them.
    """

    def __init__(self, rows: Iterable[CaptionRow]):
        rows = list(rows)
        self._index = np.fromiter((r.index for r in rows), dtype=np.int64, count=len(rows))
        self._captions = _PackedStrings([r.caption for r in rows])
        self._paths = _PackedStrings([r.image_path for r in rows])

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):  # int -> CaptionRow; slice -> list[CaptionRow]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return CaptionRow(index=int(self._index[i]), caption=self._captions[i], image_path=self._paths[i])


class _PackedStrings:
    """A list of str stored as one UTF-8 byte buffer plus end offsets."""

    def __init__(self, strings: list[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __getitem__(self, i: int) -> str:
        i = range(len(self._ends))[i]  # normalises negative indices, raises IndexError
        start = int(self._ends[i - 1]) if i else 0
        return self._buffer[start : int(self._ends[i])].tobytes().decode("utf-8")


def read_caption_tsv(tsv_path: str | os.PathLike, image_dir: str | os.PathLike) -> tuple[list[CaptionRow], Counter]:
    """Read a ``caption<TAB>image`` TSV into valid rows, counting and dropping bad ones.

    Lines are split on ``\\n`` and fields on ``\\t`` by hand: captions contain quotes, and a CSV
    quoting rule would merge lines after an unbalanced ``"``. A trailing ``\\r`` (CRLF files)
    is removed. Returns ``(rows, skipped)`` with ``skipped[kind]`` = number of dropped rows
    of each kind in :data:`ROW_SKIP_REASONS`.

    Raises FileNotFoundError if the TSV or the image dir does not exist, ValueError (naming the
    file) if the header is missing or wrong or no valid row remains.
    """
    tsv_path, image_dir = Path(tsv_path), Path(image_dir)
    if not tsv_path.is_file():
        raise FileNotFoundError(f"caption TSV not found: {tsv_path}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image dir not found: {image_dir} (needed by {tsv_path})")
    existing = _ImageIndex(image_dir)
    rows: list[CaptionRow] = []
    skipped: Counter = Counter()
    n_lines = 0
    with open(tsv_path, "rb") as f:  # binary: lines end at b"\n" only, decoding is per row
        _check_header(f.readline(), tsv_path)
        for n_lines, raw in enumerate(f, start=1):
            row_or_reason = _parse_row(n_lines - 1, raw.removesuffix(b"\n"), image_dir, existing)
            if isinstance(row_or_reason, str):
                skipped[row_or_reason] += 1
            else:
                rows.append(row_or_reason)
    _log_read_summary(tsv_path, len(rows), skipped)
    if not rows:
        raise ValueError(
            f"{tsv_path}: no valid row (of {n_lines} data lines; skipped: "
            f"{format_counts(skipped) or 'none'}; image dir {image_dir})"
        )
    return rows, skipped


def check_caption_tsv(tsv_path: str | os.PathLike, image_dir: str | os.PathLike) -> None:
    """The checks of :func:`read_caption_tsv` that need no pass over the rows (the TSV and the
    image dir exist, the header is right): cheap enough to run before anything is started."""
    tsv_path, image_dir = Path(tsv_path), Path(image_dir)
    if not tsv_path.is_file():
        raise FileNotFoundError(f"caption TSV not found: {tsv_path}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image dir not found: {image_dir} (needed by {tsv_path})")
    with open(tsv_path, "rb") as f:
        _check_header(f.readline(), tsv_path)


def _check_header(raw: bytes, tsv_path: Path) -> None:
    """Require the exact ``caption<TAB>image`` header (a UTF-8 BOM and CRLF are tolerated)."""
    expected = "\t".join(TSV_HEADER)
    if not raw:
        raise ValueError(f"{tsv_path}: empty file; expected the header line {expected!r}")
    header = raw.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if tuple(f.strip() for f in header.split("\t")) != TSV_HEADER:
        raise ValueError(
            f"{tsv_path}: first line must be the header {expected!r} (caption, TAB, image file name); "
            f"found {header[:200]!r}"
        )


def _parse_row(index: int, raw: bytes, image_dir: Path, existing: "_ImageIndex") -> CaptionRow | str:
    """A CaptionRow, or the reason (a ROW_SKIP_REASONS entry) why the line is not usable."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bad_encoding"
    line = line.rstrip("\r")
    if not line.strip():
        return "blank_line"
    fields = line.split("\t")
    if len(fields) != 2:
        return "bad_fields"
    caption, image = fields[0].strip(), fields[1].strip()
    if not caption:
        return "empty_caption"
    if not image:
        return "empty_image_name"
    if not existing.contains(image):
        return "missing_image"
    return CaptionRow(index=index, caption=caption, image_path=str(image_dir / image))


class _ImageIndex:
    """Answers "does image_dir/name exist as a file" with one directory listing.

    One ``scandir`` of a flat 3M-file directory is far cheaper than 3M ``stat`` calls on a
    network filesystem; names with a sub-directory fall back to a ``stat``.
    """

    def __init__(self, image_dir: Path):
        self.image_dir = image_dir
        with os.scandir(image_dir) as entries:
            self.top_level = {e.name for e in entries if e.is_file()}

    def contains(self, name: str) -> bool:
        if "/" not in name and os.sep not in name:
            return name in self.top_level
        return (self.image_dir / name).is_file()


def _log_read_summary(tsv_path: Path, n_valid: int, skipped: Counter) -> None:
    if is_main_process():
        logger.info(
            "read %s: %d valid rows, %d skipped (%s)",
            tsv_path, n_valid, sum(skipped.values()), format_counts(skipped) or "none",
        )


def format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v)


# ------------------------------------------------------------------------------ dataset


class CaptionDataset(Dataset):
    """Image-caption pairs from :func:`read_caption_tsv` rows, images decoded on access.

    A sample is ``{"index", "caption", "pixels"}`` with pixels = ``preprocess(rgb_image)``
    (3, H, W); an unusable image gives ``{"index", "caption", "pixels": None, "skip": reason}``.
    ``read_skipped`` holds the row-level skip counts of the TSV (empty when rows were given).
    Rows are kept as a :class:`RowTable` (``self.rows``).
    """

    def __init__(
        self,
        rows: Sequence[CaptionRow],
        preprocess: Callable[[Image.Image], torch.Tensor],
        checks: ImageChecks = ImageChecks(),
        read_skipped: Counter | None = None,
    ):
        self.rows = rows if isinstance(rows, RowTable) else RowTable(rows)
        self.preprocess = preprocess
        self.checks = checks
        self.read_skipped = Counter(read_skipped or {})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        sample: dict[str, Any] = {"index": row.index, "caption": row.caption, "pixels": None}
        try:
            image = load_rgb_image(row.image_path, self.checks)
        except UnusableImage as e:
            logger.debug("skipping %s (row %d): %s", row.image_path, row.index, e)
            sample["skip"] = e.reason
            return sample
        try:
            sample["pixels"] = self.preprocess(image)
        except Exception as e:  # a transform bug or an odd image: count it, never stop the epoch
            logger.warning("preprocess failed on %s (row %d): %s: %s", row.image_path, row.index, type(e).__name__, e)
            sample["skip"] = "preprocess_error"
        return sample


def build_cc3m_datasets(
    dataset_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    preprocess: Callable[[Image.Image], torch.Tensor],
    split: str = "train",
    checks: ImageChecks = ImageChecks(),
) -> CaptionDataset:
    """The CC3M dataset of one split, read from ``<dataset_dir>/cc3m_<split>.tsv``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rows, skipped = read_caption_tsv(Path(dataset_dir) / f"cc3m_{split}.tsv", image_dir)
    return CaptionDataset(rows, preprocess, checks=checks, read_skipped=skipped)


# ----------------------------------------------------------------------------- collator


class CaptionCollator:
    """Collate caption samples into a batch (layout in the module docstring).

    Works for both :class:`CaptionDataset` (``pixels``) and the cached dataset (CLIP
    features): every key of :data:`FEATURE_KEYS` present in the kept samples is stacked.
    Skipped samples are dropped and counted; a batch may end up empty (B = 0), which the
    trainer detects with :func:`is_empty_batch`.
    """

    def __init__(self, tokenizer, max_len: int, ret_id: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.ret_id = ret_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        kept = [s for s in samples if s.get("skip") is None]
        batch: dict[str, Any] = {
            "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
            "captions": [s["caption"] for s in kept],
            "skipped": Counter(s["skip"] for s in samples if s.get("skip") is not None),
        }
        batch.update(_stack_features(kept))
        batch.update(self._tokenize(batch["captions"]))
        return batch

    def _tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if not captions:  # tokenize_captions needs at least one caption to size its padding
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {k: empty.clone() for k in ("caption_ids", "caption_mask", "ret_ids", "ret_mask")}
        return tokenize_captions(self.tokenizer, captions, self.max_len, self.ret_id)


def _stack_features(kept: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for key in FEATURE_KEYS:
        values = [s.get(key) for s in kept]
        present = [v is not None for v in values]
        if kept and all(present):
            out[key] = torch.stack(values)
        elif any(present):
            raise ValueError(f"batch mixes samples with and without {key!r}")
    return out


def num_samples(batch: Mapping[str, Any]) -> int:
    """Number of kept samples in a collated batch."""
    return len(batch["captions"])


def is_empty_batch(batch: Mapping[str, Any]) -> bool:
    """True when every sample of the batch was skipped (the trainer skips and counts it)."""
    return num_samples(batch) == 0


# ------------------------------------------------------------------------- skip counter


class SkipCounter:
    """Accumulates skipped-sample counts (per reason) and empty batches over an epoch.

    Call :meth:`update` with every collated batch, then :meth:`log` once at the end of the
    epoch. Counts are per rank; :meth:`reduced` sums them over ranks (a collective: call it on
    every rank).
    """

    def __init__(self, reasons: Mapping[str, int] | None = None):
        self.reasons: Counter = Counter(reasons or {})
        self.kept = 0
        self.empty_batches = 0

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add one collated batch's counts."""
        self.reasons.update(batch["skipped"])
        n = num_samples(batch)
        self.kept += n
        self.empty_batches += int(n == 0)

    def add(self, reasons: Mapping[str, int] | Iterable[str]) -> None:
        """Add counts from elsewhere (e.g. rows dropped when reading the TSV)."""
        self.reasons.update(reasons)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def reset(self) -> None:
        self.reasons.clear()
        self.kept = 0
        self.empty_batches = 0

    def reduced(self) -> "SkipCounter":
        """Counts summed over all ranks (identity without a process group)."""
        if not is_initialized() or get_world_size() == 1:
            return self._copy()
        import torch.distributed as dist

        gathered: list = [None] * get_world_size()
        dist.all_gather_object(gathered, (dict(self.reasons), self.kept, self.empty_batches))
        total = SkipCounter()
        for reasons, kept, empty in gathered:
            total.reasons.update(reasons)
            total.kept += kept
            total.empty_batches += empty
        return total

    def _copy(self) -> "SkipCounter":
        out = SkipCounter(self.reasons)
        out.kept, out.empty_batches = self.kept, self.empty_batches
        return out

    def summary(self, what: str = "epoch") -> str:
        """One line: kept, skipped per reason, empty batches."""
        seen = self.kept + self.skipped
        share = 100.0 * self.skipped / seen if seen else 0.0
        return (
            f"{what}: {self.kept} samples used, {self.skipped} skipped ({share:.2f}%)"
            f"{' [' + format_counts(self.reasons) + ']' if self.skipped else ''}, "
            f"{self.empty_batches} empty batches"
        )

    def log(self, what: str = "epoch", all_ranks: bool = True) -> str:
        """Log :meth:`summary` on rank 0 (over all ranks when ``all_ranks``, a collective)."""
        counter = self.reduced() if all_ranks else self
        line = counter.summary(what)
        if is_main_process():
            logger.info("%s", line)
        return line
