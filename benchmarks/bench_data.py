"""Throughput of the CC3M data pipeline and of the frozen-CLIP feature cache.

Writes N synthetic JPEGs (smooth gradients with a few shapes, so decoding cost resembles
photos more than flat colours do) plus a ``caption<TAB>image`` TSV into a temporary folder,
then measures:

* the TSV reader (rows/s);
* ``CaptionDataset`` + ``CaptionCollator`` through a DataLoader (decode + RGB + preprocess +
  tokenise), rows/s, for each ``--workers`` value;
* the feature-cache build (CLIP forward of every image and caption + write), its hit (load
  with and without the SHA-256 check) and a DataLoader over the cached dataset.

    python benchmarks/bench_data.py                          # 3000 images, tiny-clip, CPU
    python benchmarks/bench_data.py --n-images 5000 --workers 0 4 8 --device cuda \\
        --visual-model ViT-B-32             # random-init ViT-B/32: real encoder cost, no download
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from unimur.data.cached_dataset import CachedCaptionDataset  # noqa: E402
from unimur.data.cc3m import CaptionCollator, CaptionDataset, read_caption_tsv  # noqa: E402
from unimur.data.feature_cache import (  # noqa: E402
    build_feature_cache,
    load_feature_cache,
)
from unimur.model.backbones.registry import load_encoders  # noqa: E402
from unimur.model.tokenizer import build_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=3000)
    p.add_argument("--image-size", type=int, default=320, help="side of the generated JPEGs")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--visual-model", default="tiny-clip", help="encoder identifier (no pretrained tag: no download)")
    p.add_argument("--llm", default="tiny-opt", help="tokenizer identifier")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="cache storage dtype")
    p.add_argument("--keep", default=None, help="write the data here and keep it (default: a temp dir)")
    return p.parse_args(argv)


def make_images(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """n JPEGs and their TSV; returns (tsv, image_dir)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    lines = ["caption\timage"]
    for i in range(n):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        grad = a + (b - a) * ramp[None, :, None] * ramp[:, None, None]  # (size, size, 3)
        img = Image.fromarray(grad.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 10, size // 4))]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 256, 3).tolist()))
        img.save(image_dir / f"{i:06d}.jpg", quality=90)
        lines.append(f'a "synthetic" picture number {i} with three circles\t{i:06d}.jpg')
    tsv = root / "cc3m_train.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv, image_dir


def drain(loader: DataLoader) -> tuple[int, float]:
    """(rows delivered, seconds) for one pass."""
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["captions"])
    return n, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_data_"))
    print(f"threads={torch.get_num_threads()} cpus={os.cpu_count()} device={args.device} root={root}")

    start = time.perf_counter()
    tsv, image_dir = make_images(root, args.n_images, args.image_size)
    print(f"generated {args.n_images} JPEGs of {args.image_size}px in {time.perf_counter() - start:.1f}s")

    start = time.perf_counter()
    rows, _ = read_caption_tsv(tsv, image_dir)
    t = time.perf_counter() - start
    print(f"read_caption_tsv: {len(rows)} rows in {t * 1e3:.1f} ms ({len(rows) / t:,.0f} rows/s)")

    encoders = load_encoders(args.visual_model)
    tokenizer, ret_id = build_tokenizer(args.llm)
    collator = CaptionCollator(tokenizer, 24, ret_id)
    dataset = CaptionDataset(rows, encoders.preprocess)
    for workers in args.workers:
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, collate_fn=collator)
        n, t = drain(loader)
        print(f"CaptionDataset+collator, workers={workers}: {n} rows in {t:.2f}s ({n / t:,.0f} rows/s)")

    cache_dir = root / "cache"
    for workers in args.workers[-1:]:
        start = time.perf_counter()
        cache = build_feature_cache(rows, encoders, cache_dir, dtype=args.dtype, batch_size=args.batch_size,
                                    num_workers=workers, device=args.device)
        t = time.perf_counter() - start
        size_mb = cache.path.stat().st_size / 2**20
        print(f"feature cache build ({args.visual_model}, {args.dtype}, workers={workers}): {cache.num_rows} rows "
              f"in {t:.2f}s ({cache.num_rows / t:,.0f} rows/s), {size_mb:.1f} MiB")
    for verify in (True, False):
        start = time.perf_counter()
        cache = load_feature_cache(cache_dir, verify_checksum=verify)
        print(f"feature cache load (verify_checksum={verify}): {(time.perf_counter() - start) * 1e3:.1f} ms")
    cached = CachedCaptionDataset(rows, cache)
    for workers in args.workers:
        n, t = drain(DataLoader(cached, batch_size=args.batch_size, num_workers=workers, collate_fn=collator))
        print(f"CachedCaptionDataset+collator, workers={workers}: {n} rows in {t:.2f}s ({n / t:,.0f} rows/s)")


if __name__ == "__main__":
    main()
