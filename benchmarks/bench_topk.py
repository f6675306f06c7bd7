"""Throughput and peak memory of ``unimur.ranking.topk_chunked`` vs a full-matrix baseline.

The baseline is the plain approach: ``s = q @ index.T`` ([Q, N] at once), then
``torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]``. Each method runs in its own
subprocess that builds the same seeded random index (L2-normalised, float32), so peak memory
(peak RSS on CPU: VmHWM reset after the index is built, else ``getrusage``'s ru_maxrss;
``torch.cuda.max_memory_allocated`` on GPU) is measured per method and not
polluted by the other. The parent also checks that both methods return the same top-k ids.

    python benchmarks/bench_topk.py                    # 1M x 768 index, 256 queries, k=10
    python benchmarks/bench_topk.py --n-index 200000 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from unimur.ranking import topk_chunked  # noqa: E402

METHODS = ("chunked", "baseline")
_RESULT_TAG = "RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-index", type=int, default=1_000_000, help="index rows (shrunk if it does not fit)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--n-queries", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--index-chunk", type=int, default=65536)
    p.add_argument("--query-chunk", type=int, default=1024)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)  # internal: one method
    p.add_argument("--out", help=argparse.SUPPRESS)  # internal: where the worker saves its ids
    return p.parse_args(argv)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ---------------------------------------------------------------- worker (one method)

def make_data(n_index: int, dim: int, n_queries: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, L2-normalised float32 queries [Q, D] and index [N, D] (identical in every worker)."""
    g = torch.Generator(device=device).manual_seed(seed)
    index = torch.randn(n_index, dim, generator=g, device=device)
    index.div_(index.norm(dim=1, keepdim=True))  # in place: no second 3 GB buffer
    queries = torch.randn(n_queries, dim, generator=g, device=device)
    queries.div_(queries.norm(dim=1, keepdim=True))
    return queries, index


def baseline_topk(queries: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, k] ids from the full [Q, N] matrix and a full sort (the memory-hungry reference)."""
    return torch.argsort(queries @ index.T, dim=1, descending=True, stable=True)[:, :k]


def run_method(args: argparse.Namespace, method: str, queries: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if method == "chunked":
        return topk_chunked(queries, index, args.k, index_chunk=args.index_chunk, query_chunk=args.query_chunk)[1]
    return baseline_topk(queries, index, args.k)


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so the peak we read afterwards
    belongs to the timed run and not to index construction."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    rss = _proc_status_mib("VmRSS")
    return rss if rss is not None else peak_rss_mib()


def peak_rss_mib() -> float:
    hwm = _proc_status_mib("VmHWM")  # resettable, unlike getrusage's ru_maxrss
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    queries, index = make_data(args.n_index, args.dim, args.n_queries, args.seed, device)
    run_method(args, args.worker, queries[:8], index[: min(len(index), 65536)])  # warm-up kernels
    sync()
    setup_rss = current_rss_mib()
    peak_was_reset = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        setup_gpu = torch.cuda.memory_allocated() / 2**20

    start = time.perf_counter()
    ids = run_method(args, args.worker, queries, index)
    sync()
    seconds = time.perf_counter() - start

    result = {"method": args.worker, "seconds": seconds, "qps": len(queries) / seconds,
              "setup_rss_mib": setup_rss, "peak_rss_mib": peak_rss_mib(),
              "peak_rss_reset": peak_was_reset}
    if cuda:
        result["setup_gpu_mib"] = setup_gpu
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    torch.save(ids.cpu(), args.out)
    print(_RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent

def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 2**62


def fit_n_index(args: argparse.Namespace, device: str) -> int:
    """Largest N <= --n-index whose baseline (index + [Q,N] scores, sorted values, int64 ids) fits."""
    budget = 0.8 * available_bytes(device)
    n = args.n_index
    per_row = 4 * args.dim + args.n_queries * (4 + 4 + 8)
    while n > 1024 and n * per_row > budget:
        n //= 2
    if n != args.n_index:
        print(f"note: --n-index {args.n_index} does not fit in {budget / 2**30:.1f} GiB for the baseline; "
              f"using {n}")
    return n


def spawn(args: argparse.Namespace, method: str, out: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--out", out,
           "--n-index", str(args.n_index), "--dim", str(args.dim), "--n-queries", str(args.n_queries),
           "--k", str(args.k), "--index-chunk", str(args.index_chunk), "--query-chunk", str(args.query_chunk),
           "--device", args.device, "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    print(f"{method}: failed (exit {proc.returncode}, e.g. out of memory)\n{proc.stderr[-2000:]}")
    return None


def report(results: dict[str, dict], device: str) -> None:
    cuda = device.startswith("cuda")
    mem_key, setup_key = ("peak_gpu_mib", "setup_gpu_mib") if cuda else ("peak_rss_mib", "setup_rss_mib")
    mem_name = "GPU alloc" if cuda else "RSS"
    print(f"\n{'method':<10} {'seconds':>9} {'queries/s':>11} {'peak ' + mem_name + ' MiB':>22} "
          f"{'above index MiB':>16}")
    for name, r in results.items():
        print(f"{name:<10} {r['seconds']:>9.2f} {r['qps']:>11.1f} {r[mem_key]:>22.0f} "
              f"{r[mem_key] - r[setup_key]:>16.0f}")
    if len(results) == 2:
        c, b = results["chunked"], results["baseline"]
        extra_c = max(c[mem_key] - c[setup_key], 1.0)
        extra_b = b[mem_key] - b[setup_key]
        print(f"\nspeed ratio chunked/baseline (queries/s): {c['qps'] / b['qps']:.2f}x")
        print(f"extra memory ratio baseline/chunked ({mem_name} above the index): {extra_b / extra_c:.1f}x")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    device = resolve_device(args.device)
    args.device = device
    print("command:", shlex.join([sys.executable] + sys.argv))
    args.n_index = fit_n_index(args, device)
    threads = torch.get_num_threads()
    print(f"config: index {args.n_index} x {args.dim} float32 (L2-normalised, seed {args.seed}), "
          f"{args.n_queries} queries, k={args.k}, index_chunk={args.index_chunk}, "
          f"query_chunk={args.query_chunk}, device={device}, torch {torch.__version__}, "
          f"{threads} CPU threads" + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""))
    print("timing: one warm-up on 8 queries x 64k rows, then one timed pass over all queries; "
          "each method in its own subprocess (index build not timed); 'above index' = peak during "
          "the timed run minus memory held once queries and index exist")

    results, ids = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = os.path.join(tmp, f"{method}.pt")
            r = spawn(args, method, out)
            if r is not None:
                results[method] = r
                ids[method] = torch.load(out)
    report(results, device)
    if len(ids) == 2:
        same = (ids["chunked"] == ids["baseline"]).all(dim=1).float().mean().item()
        print(f"top-{args.k} ids identical for {100 * same:.1f}% of queries "
              "(differences can only come from float rounding of near-equal scores)")


if __name__ == "__main__":
    main()
