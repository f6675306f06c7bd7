"""Where CC3M rows come from: the seed's TSV, img2dataset's ``files`` layout, webdataset shards.

``--dataset-format`` picks the reader; all three give the same thing, a :class:`SplitData`
(valid rows, row-level skip counts, a shard-level fingerprint), which feeds the one dataset /
feature-cache build (``unimur.data.feature_cache``). Layouts, per split (train, val):

* ``tsv`` (default, the seed's): ``<dataset-dir>/cc3m_<split>.tsv`` with images under
  ``--image-dir``. FROMAGe's image layout is accepted too: when ``--image-dir`` holds
  ``cc3m/training`` (train) / ``cc3m/validation`` (val), image names resolve there.
* ``img2dataset``: ``<dataset-dir>/<split>/`` (or ``training``/``validation``) is an img2dataset
  output folder written with ``--output_format files``: ``00000.parquet`` (columns key,
  caption, status) beside ``00000/<key>.jpg`` (+ ``.txt``, ``.json``). Captions come from the
  parquet (one read per shard, no per-image file reads).
* ``wds``: ``<dataset-dir>/<split>/*.tar`` (img2dataset ``--output_format webdataset``), or a
  brace pattern with a ``{split}`` placeholder, e.g. ``cc3m/{split}/{00000..00331}.tar``.
  A sample is the members sharing a key (the name up to the first dot): an image
  (``.jpg``/``.jpeg``/``.png``/``.webp``) and a ``.txt`` caption. When img2dataset's
  ``<shard>.parquet`` sits beside a tar, its rows (with their status) define the samples.

Skips are counted with the TSV reader's reasons (``unimur.data.cc3m.ROW_SKIP_REASONS``), in its
order, so a converted TSV (``python -m unimur.commands.to_tsv``) gives the same counts: a row
img2dataset marked failed (status != success) or whose image is absent is ``missing_image``;
an empty caption is ``empty_caption``; a caption that is not UTF-8 is ``bad_encoding``.
Tabs and line breaks inside captions become spaces (a TSV cannot hold them).

Shards come from outside, so their names are not trusted (:data:`READER_SKIP_REASONS`, counted
and logged like the others): a member or key that is absolute, holds a ``..`` component or a
control / line-separator character is ``unsafe_name`` (it would write outside ``--image-out``
or split a TSV line); a key that occurs in two samples of one shard, or twice with one
extension, is ``duplicate_key`` for every occurrence (which image goes with which caption is
not known; webdataset itself raises); a shard cut short (no end-of-archive block) is counted
once as ``truncated_shard``, and the sample whose bytes are cut as ``truncated_sample``
(samples past the cut are lost: with img2dataset's parquet beside the tar they are counted as
``missing_image``). Image names are made unique per shard *path* (``a/00000.tar`` and
``b/00000.tar`` give ``a/00000/...`` and ``b/00000/...``).

Tar shards are read with the standard ``tarfile`` module, not the ``webdataset`` library: one
sequential pass over each shard's headers records every image member's byte offset, and a
sample is later read with one ``seek`` + ``read`` (:func:`tar_member_ref`), so the dataset
stays map-style (the sampler's resumable order, rank sharding, workers, the cache build's
row order) and bad samples are counted rather than handled by webdataset's error handlers.
No new dependency. Parquet is read with pyarrow.

Fingerprint (cache key): name, size and mtime of each index file (the TSV; each parquet /
tar) and the mtime of each image folder (changes when files are added, removed or renamed),
never a per-image ``stat``: start-up cost does not grow with the number of images.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from unimur.data.cc3m import CaptionRow, RowTable, check_caption_tsv, format_counts, read_caption_tsv
from unimur.utils.distributed import is_main_process

logger = logging.getLogger(__name__)

__all__ = ["DATASET_FORMATS", "SplitData", "Entry", "read_split", "check_split_source", "split_entries",
           "split_image_dir", "expand_braces", "tar_member_ref"]

DATASET_FORMATS = ("tsv", "img2dataset", "wds")
SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "validation")}
FROMAGE_IMAGE_DIRS = {"train": "cc3m/training", "val": "cc3m/validation"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SOURCE_VERSION = 2  # 2: shard-path-unique names, unsafe / duplicate / truncated members skipped
# Reasons the shard readers skip a row for, before the TSV reader's checks (see module docstring).
READER_SKIP_REASONS = ("unsafe_name", "duplicate_key", "truncated_sample", "truncated_shard")


@dataclass
class SplitData:
    """One split, read. rows: valid rows; skipped: row-level skip counts; fingerprint: hex
    SHA-256 of the shard-level description (``files``) of the source."""

    rows: RowTable
    skipped: Counter
    fingerprint: str
    files: list


@dataclass(frozen=True, slots=True)
class Entry:
    """One source row before the checks. caption: str, or the raw bytes when not UTF-8.
    name: image name relative to the split's root (what the TSV converter writes).
    ref: what :func:`unimur.utils.images.load_rgb_image` opens, None when the image is absent.
    skip: why the shard reader refuses the row (``unsafe_name``, ...), None otherwise."""

    caption: str | bytes
    name: str
    ref: str | None
    skip: str | None = None  # a READER_SKIP_REASONS entry: the row is counted, never used


# ----------------------------------------------------------------------------- reading


def read_split(fmt: str, dataset_dir: str | os.PathLike, image_dir: str | os.PathLike, split: str) -> SplitData:
    """Rows, skip counts and fingerprint of one split in format `fmt` (see module docstring)."""
    _check_format(fmt)
    if fmt == "tsv":
        tsv, images = Path(dataset_dir) / f"cc3m_{split}.tsv", split_image_dir(image_dir, split)
        rows, skipped = read_caption_tsv(tsv, images)
        files = [_file_stat(tsv), _dir_stat(images)]
        return SplitData(RowTable(rows), skipped, _digest(fmt, files), files)
    root, entries, files = split_entries(fmt, dataset_dir, split)
    rows, skipped = _rows_of(entries, root)
    return SplitData(rows, skipped, _digest(fmt, files), files)


def check_split_source(fmt: str, dataset_dir: str | os.PathLike, image_dir: str | os.PathLike, split: str) -> None:
    """The cheap checks (the split's index files exist): run before anything is started."""
    _check_format(fmt)
    if fmt == "tsv":
        check_caption_tsv(Path(dataset_dir) / f"cc3m_{split}.tsv", split_image_dir(image_dir, split))
    elif fmt == "img2dataset":
        _parquets(_split_root(dataset_dir, split))
    else:
        _tar_shards(dataset_dir, split)


def split_image_dir(image_dir: str | os.PathLike, split: str) -> Path:
    """``image_dir``, or its FROMAGe sub-folder ``cc3m/training`` / ``cc3m/validation`` when present."""
    fromage = Path(image_dir) / FROMAGE_IMAGE_DIRS[split]
    return fromage if fromage.is_dir() else Path(image_dir)


def split_entries(fmt: str, dataset_dir: str | os.PathLike, split: str) -> tuple[Path, Iterator[Entry], list]:
    """(root the entry names are relative to, entries in row order, shard-level file stats)."""
    if fmt == "img2dataset":
        root = _split_root(dataset_dir, split)
        parquets = _parquets(root)
        files = [_file_stat(p) for p in parquets] + [_dir_stat(root / p.stem) for p in parquets]
        return root, _img2dataset_entries(root, parquets), files
    if fmt == "wds":
        tars = _tar_shards(dataset_dir, split)
        sidecars = [t.with_suffix(".parquet") for t in tars]
        files = [_file_stat(t) for t in tars] + [_file_stat(p) for p in sidecars if p.is_file()]
        return Path(os.path.commonpath([t.parent for t in tars])), _wds_entries(tars), files
    raise ValueError(f"no entry reader for dataset format {fmt!r}")


def _rows_of(entries: Iterable[Entry], root: Path) -> tuple[RowTable, Counter]:
    rows: list[CaptionRow] = []
    skipped: Counter = Counter()
    n = -1
    for n, entry in enumerate(entries):
        reason = entry_skip_reason(entry)
        if reason:
            skipped[reason] += 1
        else:
            rows.append(CaptionRow(index=n, caption=entry.caption, image_path=entry.ref))
    if is_main_process():
        logger.info("read %s: %d valid rows, %d skipped (%s)", root, len(rows), sum(skipped.values()),
                    format_counts(skipped) or "none")
    if not rows:
        raise ValueError(f"{root}: no valid row (of {n + 1}; skipped: {format_counts(skipped) or 'none'})")
    return RowTable(rows), skipped


def entry_skip_reason(entry: Entry) -> str | None:
    """The shard reader's reason, else the TSV reader's, checked in its order (None: a valid row)."""
    if entry.skip:
        return entry.skip
    if isinstance(entry.caption, bytes):
        return "bad_encoding"
    if not entry.caption:
        return "empty_caption"
    if entry.ref is None:
        return "missing_image"
    return None


def clean_caption(text: str | None) -> str:
    """Tabs and line breaks to spaces, surrounding whitespace stripped (a TSV field)."""
    return (text or "").replace("\t", " ").replace("\r", " ").replace("\n", " ").strip()


def unsafe_name(name: str) -> str | None:
    """Why a member name / key from a shard cannot become a path under the output folder
    (None: it can). Checked before anything is written: an absolute path or a ``..``
    component would leave the folder; a control or line-separator character would split the
    TSV line (and readers that split on U+2028)."""
    if not name:
        return "empty name"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' component"
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        return "control character"
    return None


# ---------------------------------------------------------------------------- img2dataset


def _split_root(dataset_dir: str | os.PathLike, split: str) -> Path:
    for name in SPLIT_DIRS[split]:
        if (Path(dataset_dir) / name).is_dir():
            return Path(dataset_dir) / name
    raise FileNotFoundError(f"{split} split not found: expected a folder {' or '.join(SPLIT_DIRS[split])} "
                            f"in {dataset_dir} (img2dataset's output folder of that split)")


def _parquets(root: Path) -> list[Path]:
    parquets = sorted(p for p in root.glob("*.parquet") if p.is_file())
    if not parquets:
        raise FileNotFoundError(f"{root}: no img2dataset index (*.parquet); expected img2dataset's "
                                "output folder (--output_format files)")
    return parquets


def _read_parquet(path: Path) -> tuple[list, list, list]:
    """(keys, captions, statuses) of an img2dataset shard index; one-line ValueError if unreadable."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise ValueError(f"{path}: unreadable parquet ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    missing = [c for c in ("key", "caption") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} missing (img2dataset writes key, caption, status)")
    import pyarrow as pa

    caption_type = table.schema.field("caption").type
    if not (pa.types.is_string(caption_type) or pa.types.is_large_string(caption_type) or pa.types.is_null(caption_type)):
        raise ValueError(f"{path}: column caption holds {caption_type}, expected strings (img2dataset writes text captions)")
    n = table.num_rows
    status = table.column("status").to_pylist() if "status" in table.column_names else ["success"] * n
    return [str(k) for k in table.column("key").to_pylist()], table.column("caption").to_pylist(), status


def _img2dataset_entries(root: Path, parquets: list[Path]) -> Iterator[Entry]:
    for parquet in parquets:
        shard = parquet.stem
        folder = root / shard
        names = set(os.listdir(folder)) if folder.is_dir() else set()  # one listing per shard
        for key, caption, status in zip(*_read_parquet(parquet)):
            if unsafe_name(key):
                logger.warning("%s: key %r skipped (%s)", parquet, key, unsafe_name(key))
                yield Entry(clean_caption(caption), f"{shard}/", None, skip="unsafe_name")
                continue
            image = next((f"{key}.{e}" for e in IMAGE_EXTS if f"{key}.{e}" in names), None)
            ok = status == "success" and image is not None
            yield Entry(clean_caption(caption), f"{shard}/{image or key + '.jpg'}", str(folder / image) if ok else None)


# ------------------------------------------------------------------------------ webdataset


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as webdataset/braceexpand do it: ``{00000..00012}`` (zero padding
    kept) and ``{a,b}``, several groups allowed."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"{pattern}: brace group {{{body}}} is neither a range a..b nor a list a,b")
    return [out for o in options for out in expand_braces(head + o + tail)]


def _tar_shards(dataset_dir: str | os.PathLike, split: str) -> list[Path]:
    spec = str(dataset_dir)
    if "{" in spec:
        tars = [Path(p) for p in expand_braces(spec.replace("{split}", split))]
        absent = [str(t) for t in tars if not t.is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} shard(s) of {spec} not found, e.g. {absent[0]}")
        return tars
    root = _split_root(dataset_dir, split)
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{root}: no webdataset shard (*.tar)")
    return tars


def tar_member_ref(tar: Path, offset: int, size: int) -> str:
    """An image reference to bytes inside a tar. NUL cannot occur in a file path, so the
    reference can never be mistaken for one (``unimur.data.cc3m`` opens it)."""
    return f"{tar}\0{offset}\0{size}"


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class _Sample:
    image: tuple | None = None  # (offset, size, ext)
    txt: bytes | None = None
    groups: int = 0  # runs of consecutive members with this key (webdataset's samples)
    skip: str | None = None


def _scan_tar(tar: Path) -> tuple[dict[str, _Sample], bool]:
    """(key -> sample, keys in order of first appearance; whether the shard is cut short).

    Members are grouped as webdataset groups them (consecutive members sharing a key). A
    member whose bytes run past the end of the file, or a missing end-of-archive block, means
    the shard was cut: what was read before the cut is kept, the cut sample is skipped."""
    samples: dict[str, _Sample] = {}
    size = tar.stat().st_size
    truncated, last_key, seen = False, None, 0
    try:
        with tarfile.open(tar, "r:") as tf:
            members = iter(tf)
            while True:
                try:
                    member = next(members)
                except StopIteration:
                    truncated = not _ends_with_zero_block(tar, tf.offset, size)
                    break
                except tarfile.ReadError:  # "unexpected end of data": the previous member is cut
                    if not seen:
                        raise
                    truncated = True
                    break
                seen += 1
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                sample = samples.setdefault(key, _Sample())
                if key != last_key:
                    sample.groups += 1
                last_key = key
                why = unsafe_name(member.name)
                if why:
                    if sample.skip != "unsafe_name":
                        logger.warning("%s: member %r skipped (%s)", tar, member.name, why)
                    sample.skip = "unsafe_name"
                    continue
                if member.offset_data + member.size > size:
                    sample.skip, truncated = "truncated_sample", True
                    break
                if ext in IMAGE_EXTS:
                    if sample.image is not None or sample.groups > 1:
                        sample.skip = sample.skip or "duplicate_key"
                    sample.image = (member.offset_data, member.size, ext)
                elif ext == "txt":
                    if sample.txt is not None or sample.groups > 1:
                        sample.skip = sample.skip or "duplicate_key"
                    sample.txt = tf.extractfile(member).read()
                elif sample.groups > 1:
                    sample.skip = sample.skip or "duplicate_key"
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{tar}: unreadable tar shard ({type(e).__name__}: {e})") from e
    if truncated:
        logger.warning("%s: truncated (the file ends before the tar's end-of-archive block); "
                       "samples past the cut are lost", tar)
    dups = sum(s.groups for s in samples.values() if s.skip == "duplicate_key")
    if dups:
        logger.warning("%s: %d samples share a key with another sample; skipped", tar, dups)
    return samples, truncated


def _ends_with_zero_block(tar: Path, offset: int, size: int) -> bool:
    """Whether a 512-byte zero block (end of archive) sits where the member headers stopped."""
    if offset + tarfile.BLOCKSIZE > size:
        return False
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE


def _decode(raw: bytes | None) -> str | bytes:
    if raw is None:
        return ""
    try:
        return clean_caption(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return raw


def _wds_entries(tars: list[Path]) -> Iterator[Entry]:
    root = Path(os.path.commonpath([t.parent for t in tars]))
    for tar in tars:
        samples, truncated = _scan_tar(tar)
        # unique per shard path: a/00000.tar and b/00000.tar must not extract to one folder
        shard = tar.relative_to(root).with_suffix("").as_posix()
        parquet = tar.with_suffix(".parquet")
        if parquet.is_file():  # img2dataset's index: failed rows are listed there, absent from the tar
            rows = [(str(k), clean_caption(c), s == "success") for k, c, s in zip(*_read_parquet(parquet))]
        else:
            rows = [(k, _decode(s.txt), True) for k, s in samples.items()
                    for _ in range(max(s.groups, 1) if s.skip == "duplicate_key" else 1)]
        for key, caption, ok in rows:
            sample = samples.get(key)
            skip = sample.skip if sample is not None else ("unsafe_name" if unsafe_name(key) else None)
            if skip:
                yield Entry(caption, f"{shard}/", None, skip=skip)
                continue
            image = sample.image if ok and sample is not None else None
            ext = image[2] if image else "jpg"
            ref = tar_member_ref(tar, image[0], image[1]) if image else None
            yield Entry(caption, f"{shard}/{key}.{ext}", ref)
        if truncated:
            yield Entry("", f"{shard}/", None, skip="truncated_shard")


# ----------------------------------------------------------------------------- fingerprint


def _file_stat(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _dir_stat(path: Path) -> list:
    try:
        return [path.name + "/", -1, path.stat().st_mtime_ns]
    except OSError:
        return [path.name + "/", -1, -1]


def _digest(fmt: str, files: list) -> str:
    return hashlib.sha256(json.dumps([f"{fmt}/{SOURCE_VERSION}", files]).encode()).hexdigest()


def _check_format(fmt: str) -> None:
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"dataset format {fmt!r}: expected one of {DATASET_FORMATS}")
