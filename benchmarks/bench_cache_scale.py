"""The feature cache at CC3M size: disk size, start-up time to the first batch, RSS per process.

A synthetic index of --rows rows (captions and image names; no image files, no encoder: random
features) and its cache are written, then 1 and 4 fresh processes start against the cache at
once, each timing: the row table (stands in for reading the index), the cache open (key +
integrity check + memory map), the cached dataset and the first batch of a shuffled
DataLoader, then 50 more batches; each reports its peak RSS (VmHWM), its RSS, PSS, shared and private memory.

* ``after`` (the default): fp16, shard-level fingerprint, stamp check (size + mtime + header hash);
* ``before``: what the trainer did before issue 17: fp32, per-image fingerprint (one ``stat``
  per row; the images do not exist here, so a failing stat: a lower bound), full SHA-256 at
  every start.

    python benchmarks/bench_cache_scale.py                           # 3.3M rows, after
    python benchmarks/bench_cache_scale.py --rows 300000 --mode before after

Needs rows x (sum of dims) x 2 bytes of free disk (fp16; x4 for fp32): ~17 GB at 3.3M rows
with ViT-L/14 dims. The cache files are deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from unimur.data import feature_cache as fc  # noqa: E402
from unimur.data.cached_dataset import CachedCaptionDataset  # noqa: E402
from unimur.data.cc3m import CaptionRow, RowTable  # noqa: E402
from unimur.utils.images import ImageChecks  # noqa: E402

MODES = {"after": {"dtype": "fp16", "shard_fingerprint": True, "verify": False},
         "before": {"dtype": "fp32", "shard_fingerprint": False, "verify": True}}


class FakeEncoders:
    identity = "bench-cache-scale"

    def __init__(self, dims):
        self.image_pooled_dim, self.image_embed_dim, self.text_embed_dim = dims

    def encode_image(self, *_):
        raise RuntimeError("cache miss in the benchmark: it must start from the written cache")

    encode_text = encode_image


def synthetic_rows(n: int, image_dir: Path) -> RowTable:
    return RowTable(CaptionRow(i, f"a synthetic caption number {i} of a photo", f"{image_dir}/{i // 10000:05d}/{i:09d}.jpg")
                    for i in range(n))


def shard_fingerprint(n: int) -> str:
    """What unimur.data.cc3m_sources computes for img2dataset shards of 10,000 rows (stats of each index file)."""
    files = [[f"{s:05d}.parquet", 400_000, 1_700_000_000_000_000_000 + s] for s in range((n + 9999) // 10000)]
    return "bench:" + json.dumps(files)[:64] + str(len(files))


def write_cache(args, mode: str, cache_dir: Path, rows: RowTable) -> dict:
    m = MODES[mode]
    cache_dir.mkdir(parents=True, exist_ok=True)
    enc = FakeEncoders(args.dims)
    dtype = fc.STORAGE_DTYPES[m["dtype"]]
    started = time.time()
    parts = fc._key_parts(enc, rows, m["dtype"], ImageChecks(), shard_fingerprint(args.rows) if m["shard_fingerprint"] else None)
    key = fc._key_from_parts(parts)
    chunk_rows = 65536
    g = torch.Generator().manual_seed(0)
    pieces = {}
    for name, dim in zip(fc.FEATURE_NAMES, args.dims):
        chunk = torch.randn(chunk_rows, dim, generator=g).to(dtype)
        full, rest = divmod(args.rows, chunk_rows)
        pieces[name] = [chunk] * full + ([chunk[:rest]] if rest else [])  # the writer streams the pieces
    pieces["valid"] = [torch.ones(args.rows, dtype=torch.bool)]
    pieces["skip_code"] = [torch.zeros(args.rows, dtype=torch.uint8)]
    fc._write_final(cache_dir, "features", pieces, key, parts, {"world_size": 1})
    size = fc.cache_paths(cache_dir)[0].stat().st_size
    return {"mode": mode, "rows": args.rows, "cache_bytes": size, "write_s": round(time.time() - started, 1)}


def child(args) -> None:
    """One process starting against the cache: prints one JSON line."""
    t0 = time.perf_counter()
    m = MODES[args.mode]
    rows = synthetic_rows(args.rows, Path(args.dir) / "images")
    t_rows = time.perf_counter()
    cache = fc.load_or_build_feature_cache(
        rows, FakeEncoders(args.dims), args.dir, dtype=m["dtype"], verify_checksum=m["verify"],
        fingerprint=shard_fingerprint(args.rows) if m["shard_fingerprint"] else None)
    t_cache = time.perf_counter()
    ds = CachedCaptionDataset(rows, cache)
    loader = DataLoader(ds, batch_size=180, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)),
                        collate_fn=lambda s: {k: torch.stack([x[k] for x in s]) for k in ("image_pooled", "image_embed", "text_embed")})
    it = iter(loader)
    next(it)
    t_first = time.perf_counter()
    for _ in range(50):
        next(it)
    mem = {}
    with open("/proc/self/status") as f:  # VmHWM: peak RSS (ru_maxrss keeps the parent's peak across exec)
        mem["VmHWM"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean"):
                mem[k] = int(v.split()[0]) // 1024
    print(json.dumps({"rows_s": round(t_rows - t0, 2), "cache_open_s": round(t_cache - t_rows, 2),
                      "first_batch_s": round(t_first - t0, 2), "cache_to_first_batch_s": round(t_first - t_rows, 2),
                      **{f"{k}_mb": v for k, v in mem.items()}}))


def run_procs(args, mode: str, n: int) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--rows", str(args.rows), "--dir", args.dir,
           "--dims", *map(str, args.dims)]
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = round(time.perf_counter() - started, 2)
    return [{**o, "wall_incl_python_start_s": wall} for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=3_300_000)
    p.add_argument("--dims", type=int, nargs=3, default=[1024, 768, 768], help="pooled, embed, text (ViT-L/14)")
    p.add_argument("--mode", nargs="+", choices=tuple(MODES), default=["after"])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dir", default=None, help="cache folder (default: a temporary folder under /work or /tmp)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.mode[0]
        return child(args)
    temp = args.dir is None
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_cache_scale_", dir="/work" if os.access("/work", os.W_OK) else None))
    try:
        t = time.time()
        rows = synthetic_rows(args.rows, root / "images")
        print(f"row table of {args.rows:,} rows: {time.time() - t:.1f}s")
        for mode in args.mode:
            cache_dir = root / mode
            args.dir = str(cache_dir)
            info = write_cache(args, mode, cache_dir, rows)
            print(f"[{mode}] {MODES[mode]} cache on disk: {info['cache_bytes'] / 1e9:.2f} GB (written in {info['write_s']}s)")
            for n in args.procs:
                for i, r in enumerate(run_procs(args, mode, n)):
                    print(f"[{mode}] {n} proc(s), #{i}: " + ", ".join(f"{k}={v}" for k, v in r.items()))
            if not args.keep:
                shutil.rmtree(cache_dir)
    finally:
        if temp and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
