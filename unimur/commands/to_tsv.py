"""Write the seed's TSV (``caption<TAB>image``) from img2dataset's output, so the seed's
``--dataset-dir``/``--image-dir`` command line (and FROMAGe's) can read it:

    python -m unimur.commands.to_tsv --dataset-format img2dataset --dataset-dir cc3m --out-dir dataset
    python -m unimur.commands.to_tsv --dataset-format wds --dataset-dir cc3m --out-dir dataset --image-out images

Writes ``<out-dir>/cc3m_train.tsv`` and ``cc3m_val.tsv``. Every source row becomes one line,
in source order, so the TSV reader finds the same rows, indices and skips: a row img2dataset
marked failed keeps its would-be image name (the file is absent: ``missing_image``), an empty
caption stays empty (``empty_caption``), a non-UTF-8 caption keeps its bytes (``bad_encoding``).
Image names are relative to the image dir to train with: for ``img2dataset`` the dataset dir
itself (``train/00000/000000000.jpg``; nothing is copied); for ``wds`` the images are
extracted under ``--image-out`` (default ``<out-dir>/images``), at paths unique per shard path.
The image dir to pass to ``main.py --image-dir`` is printed.

Shards are not trusted: a row the shard reader refuses (a member name that is absolute, holds
``..`` or a control character; a repeated key; a truncated shard: ``unimur.data.cc3m_sources``) is
counted and logged, and neither written to the TSV nor extracted, and every extracted path is
checked to resolve inside ``--image-out`` before it is written. A failed run removes its
temporary TSV; the previous TSV, if any, is left as it was.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from unimur.data.cc3m import TSV_HEADER, format_counts
from unimur.data.cc3m_sources import SPLIT_DIRS, split_entries
from unimur.utils.images import image_bytes_or_path

logger = logging.getLogger(__name__)


def write_split_tsv(fmt: str, dataset_dir: str | os.PathLike, split: str, tsv_path: Path,
                    image_out: Path | None = None) -> tuple[int, Path]:
    """Write one split's TSV; return (lines written, image dir the names are relative to)."""
    root, entries, _ = split_entries(fmt, dataset_dir, split)
    prefix = root.name  # "train" / "training" / ...: names relative to the split folder's parent
    image_dir = root.parent if fmt == "img2dataset" else image_out
    tsv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tsv_path.with_name(f"{tsv_path.name}.tmp-{os.getpid()}")
    n, refused = 0, Counter()
    try:
        with open(tmp, "wb") as f:
            f.write("\t".join(TSV_HEADER).encode() + b"\n")
            for entry in entries:
                if entry.skip:  # counted by the reader's own log too; never written or extracted
                    refused[entry.skip] += 1
                    continue
                name = f"{prefix}/{entry.name}"
                if any(c in name for c in "\t\r\n"):  # from the user's own folder names
                    raise ValueError(f"image name {name!r} holds a tab or line break: a TSV cannot hold it")
                if fmt == "wds" and entry.ref is not None:
                    _extract(entry.ref, image_out, name)
                caption = entry.caption if isinstance(entry.caption, bytes) else entry.caption.encode("utf-8")
                f.write(caption.replace(b"\t", b" ").replace(b"\n", b" ").replace(b"\r", b" ") + b"\t" + name.encode() + b"\n")
                n += 1
        os.replace(tmp, tsv_path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave cc3m_<split>.tsv.tmp-<pid> behind
        raise
    if refused:
        logger.warning("%s: %d source rows not written (%s)", tsv_path, sum(refused.values()), format_counts(refused))
    return n, image_dir


def _extract(ref: str, image_out: Path, name: str) -> None:
    """Write the image bytes at ``image_out/name``; refuse a path that resolves outside
    ``image_out`` (a ``..`` the reader missed, or a symlink already inside the folder)."""
    out = Path(os.path.realpath(image_out))
    dest = Path(os.path.realpath(out / name))
    if out not in dest.parents:
        raise ValueError(f"image {name!r} would be written outside {image_out} (at {dest}); refused")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(image_bytes_or_path(ref).getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset-format", choices=("img2dataset", "wds"), required=True)
    p.add_argument("--dataset-dir", required=True,
                   help="folder with train/ and val/ (img2dataset output folders), or for wds a brace pattern with {split}")
    p.add_argument("--out-dir", required=True, help="where cc3m_train.tsv and cc3m_val.tsv are written")
    p.add_argument("--image-out", default=None, help="wds only: where images are extracted (default <out-dir>/images)")
    p.add_argument("--splits", nargs="+", choices=tuple(SPLIT_DIRS), default=list(SPLIT_DIRS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.image_out and args.dataset_format != "wds":
        p.error("--image-out has no effect with --dataset-format img2dataset (images stay where they are)")
    image_out = Path(args.image_out or Path(args.out_dir) / "images")
    try:
        for split in args.splits:
            tsv = Path(args.out_dir) / f"cc3m_{split}.tsv"
            n, image_dir = write_split_tsv(args.dataset_format, args.dataset_dir, split, tsv, image_out)
            logger.info("wrote %s: %d rows (images under %s)", tsv, n, image_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"train with: --dataset-dir {args.out_dir} --image-dir {image_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
