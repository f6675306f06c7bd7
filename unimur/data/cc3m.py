"""CC3M caption data: the TSV reader, image loading, the dataset and the batch collator.

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

Colour handling (:func:`to_rgb`): grayscale, palette, CMYK and YCbCr images are converted
to RGB; anything with transparency (RGBA, LA, PA, palette or L/RGB with a ``tRNS`` key) is
composited on white, because CLIP-style pipelines and web pages show transparent pixels on a
light background while a plain ``convert("RGB")`` exposes whatever colour the invisible pixels
happen to store (often black); 16-bit and 32-bit grayscale is rescaled to 8 bits rather than
clipped (a plain ``convert`` saturates 16-bit values to white). EXIF orientation is applied
first (:func:`prepare_image`): phones store photos sideways with an Orientation tag, browsers and
Gradio show them upright, and the same photo must get the same embedding through every door
(training, ``extract_vis_emb.py``, ``unimur.inference.session``, the app, a PIL image handed to the model).
open_clip and FROMAGe ignore the tag, so for such photos (only) features differ from theirs.
:data:`IMAGE_LOADER_VERSION` names these rules; the feature caches' keys include it.

Degenerate images, decided here: an image whose shorter side is below 8 px is skipped
(``too_small``). In web crawls these are tracking pixels, spacers and "image removed"
stubs rather than the photo the caption describes, and upsampling one to the encoder's
resolution gives a flat colour. Aspect ratios beyond 20:1 are skipped (``extreme_aspect``):
CLIP's resize-shorter-side-then-center-crop keeps under 5% of such a banner, and the
intermediate resize of a 1:10^5 strip would take gigabytes.

Batch layout produced by :class:`CaptionCollator` (B = kept samples, possibly 0):

* ``index`` (B,) long: row index of each sample in its TSV (0 = first line after the header);
* ``captions``: list of B caption strings;
* ``pixels`` (B, 3, H, W) for :class:`CaptionDataset`, or ``image_pooled`` (B, Dp),
  ``image_embed`` (B, Dv), ``text_embed`` (B, Dt) for the cached dataset
  (``unimur.data.feature_cache.CachedCaptionDataset``); absent when B == 0;
* ``caption_ids``/``caption_mask``/``ret_ids``/``ret_mask``: from
  :func:`unimur.model.tokenizer.tokenize_captions` ((0, 0) tensors when B == 0);
* ``skipped``: ``Counter`` of the reasons of the samples dropped from this batch.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from unimur.utils.distributed import get_world_size, is_initialized, is_main_process
from unimur.model.tokenizer import tokenize_captions

logger = logging.getLogger(__name__)

__all__ = [
    "TSV_HEADER",
    "ROW_SKIP_REASONS",
    "IMAGE_SKIP_REASONS",
    "FEATURE_KEYS",
    "CaptionRow",
    "RowTable",
    "ImageChecks",
    "UnusableImage",
    "read_caption_tsv",
    "load_rgb_image",
    "prepare_image",
    "to_rgb",
    "IMAGE_LOADER_VERSION",
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

# Kinds of unusable images found when a sample is loaded. The order is part of the feature
# cache format (skip codes are 1 + position here): append new reasons, never reorder.
IMAGE_SKIP_REASONS = (
    "missing_image",
    "unreadable_image",
    "not_an_image",
    "corrupt_image",
    "too_large",
    "too_small",
    "extreme_aspect",
    "unsupported_mode",
    "preprocess_error",
)

# The image loading rules (load_rgb_image / prepare_image): part of every cache key of features
# computed from image files. 2: EXIF orientation applied.
IMAGE_LOADER_VERSION = 2

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


# ------------------------------------------------------------------------ image loading


@dataclass(frozen=True)
class ImageChecks:
    """Limits beyond which an image is skipped rather than fed to the encoder.

    min_side: shorter side in pixels below which an image is ``too_small`` (see module doc).
    max_aspect: longer/shorter side ratio above which an image is ``extreme_aspect``.
    max_pixels: width*height above which an image is ``too_large`` (checked from the header,
        before decoding; PIL's own decompression-bomb limit by default).
    """

    min_side: int = 8
    max_aspect: float = 20.0
    max_pixels: int = 89_478_485


class UnusableImage(Exception):
    """An image that cannot be used; ``reason`` is one of IMAGE_SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_rgb_image(path: str | os.PathLike, checks: ImageChecks = ImageChecks()) -> Image.Image:
    """Open, check, fully decode and convert an image to RGB; raise UnusableImage otherwise."""
    try:
        with warnings.catch_warnings():
            # PIL only *warns* between MAX_IMAGE_PIXELS and twice that: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(image_bytes_or_path(path))
    except FileNotFoundError as e:
        raise UnusableImage("missing_image", str(e)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnusableImage("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise UnusableImage("not_an_image", str(e)) from e
    except OSError as e:  # permissions, a directory, I/O errors
        raise UnusableImage("unreadable_image", str(e)) from e
    except Exception as e:  # PIL plugins raise SyntaxError, struct.error, ... on garbage headers
        raise UnusableImage("not_an_image", f"{type(e).__name__}: {e}") from e
    with img:
        _check_geometry(img.size, checks)
        try:
            img.load()  # decode now, so a truncated file fails here and not inside preprocess
        except Exception as e:  # OSError("image file is truncated"), SyntaxError, ValueError, ...
            raise UnusableImage("corrupt_image", f"{type(e).__name__}: {e}") from e
        return prepare_image(img)


def prepare_image(img: Image.Image) -> Image.Image:
    """A decoded image as the encoders see it, wherever it comes from: EXIF orientation
    applied, then :func:`to_rgb` (alpha composited on white). Returns a new image."""
    return to_rgb(_upright(img))


_ORIENTATION = 0x0112  # EXIF tag 274


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF Orientation tag says (1 or absent: as stored)."""
    try:
        if img.getexif().get(_ORIENTATION, 1) in (1, None):
            return img
        return ImageOps.exif_transpose(img)
    except Exception as e:  # a malformed EXIF block: the pixels are still usable as stored
        logger.debug("EXIF orientation not applied (%s: %s)", type(e).__name__, e)
        return img


def image_bytes_or_path(path: str | os.PathLike):
    """A path, or for a tar member reference (``tar<NUL>offset<NUL>size``, see
    ``unimur.data.cc3m_sources.tar_member_ref``) its bytes: one seek + read, no tar parsing."""
    path = os.fspath(path)
    if "\0" not in path:
        return path
    tar, offset, size = path.split("\0")
    with open(tar, "rb") as f:
        f.seek(int(offset))
        return io.BytesIO(f.read(int(size)))  # a short read surfaces as a corrupt image


def _check_geometry(size: tuple[int, int], checks: ImageChecks) -> None:
    width, height = size
    if width * height > checks.max_pixels:
        raise UnusableImage("too_large", f"{width}x{height} pixels")
    if min(width, height) < checks.min_side:
        raise UnusableImage("too_small", f"{width}x{height} pixels")
    if max(width, height) > checks.max_aspect * min(width, height):
        raise UnusableImage("extreme_aspect", f"{width}x{height} pixels")


_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image to RGB (see module docstring for the rules)."""
    try:
        if img.mode == "RGB" and "transparency" not in img.info:
            return img.copy()  # a copy, so the caller may close the original file
        if _has_alpha(img):
            return _composite_on_white(img)
        if img.mode in _HIGH_BIT_DEPTH_MODES:
            return _high_bit_depth_to_rgb(img)
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, ...
    except (ValueError, OSError) as e:  # e.g. "conversion from LAB to RGB not supported"
        raise UnusableImage("unsupported_mode", f"mode {img.mode}: {e}") from e


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit RGB by rescaling (convert() would clip).

    ``I;16*`` spans 0..65535. ``I`` and ``F`` carry no range: values already within 0..255 are
    kept, values within 0..65535 are treated as 16-bit, anything else is min-max stretched.
    """
    values = np.asarray(img).astype(np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
        values = values / 257.0
    elif lo < 0 or hi > 65535:
        values = (values - lo) / max(hi - lo, 1e-12) * 255.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


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
