"""Process launch: single process, `--multiprocessing-distributed` (one process per GPU,
spawned here), or `torchrun` (env:// variables set by the launcher, any number of nodes).

    # one process (CPU or one GPU)
    python main.py --dataset_dir dataset/ --image-dir data/ ...
    # one node, all its GPUs (the seed README's command)
    python main.py --dist-url tcp://127.0.0.1:23456 --dist-backend nccl \
        --multiprocessing-distributed --world-size 1 --rank 0 ...
    # torchrun, two nodes of 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 main.py ...
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import Config

logger = logging.getLogger(__name__)


def setup_logging(rank: int, run_dir: Path | None) -> None:
    """INFO on rank 0 (console + <run>/train.log), warnings only elsewhere."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if rank == 0 and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(level)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.log_base_dir) / cfg.train.exp_name


def _device(args, local_rank: int) -> torch.device:
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    device = torch.device(want)
    if device.type == "cuda" and device.index is not None:  # --gpu N / --device cuda:N
        torch.cuda.set_device(device.index)
    return device


def _backend(args, device: torch.device) -> str:
    if device.type != "cuda" and args.dist_backend == "nccl":
        logger.warning("--dist-backend nccl needs GPUs; using gloo on %s", device.type)
        return "gloo"
    return args.dist_backend


def launch(args, cfg: Config, argv: list[str]):
    """Start training in the mode the flags and environment ask for; returns rank 0's state."""
    if args.multiprocessing_distributed:
        nprocs = args.nprocs or torch.cuda.device_count() or 1
        world = nprocs * args.world_size
        ctx = mp.get_context("spawn")
        result = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(nprocs, world, args, cfg, argv, result), nprocs=nprocs,
                           start_method="spawn", join=True)
        return result.get() if not result.empty() else None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / SLURM-style env://
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        return _run(local, rank, world, "env://", args, cfg, argv)
    return _run(0, 0, 1, None, args, cfg, argv)


def _worker(local_rank, nprocs, world, args, cfg, argv, result):
    rank = args.rank * nprocs + local_rank
    state = _run(local_rank, rank, world, args.dist_url, args, cfg, argv)
    if rank == 0:
        result.put(state)


def _run(local_rank: int, rank: int, world: int, init_method: str | None, args, cfg: Config, argv):
    from .trainer import Trainer, write_run_info

    run_dir = run_dir_of(cfg)
    setup_logging(rank, run_dir)
    device = _device(args, local_rank)
    if device.type == "cpu" and world > 1:
        # share the cores instead of oversubscribing them world-fold
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group(_backend(args, device), init_method=init_method, world_size=world, rank=rank)
        logger.info("process group up: rank %d of world size %d (%s, %s backend)", rank, world,
                    init_method, dist.get_backend())
    try:
        trainer = Trainer(cfg, run_dir, device, resume=args.resume)
        if args.evaluate:
            return evaluate_checkpoint(trainer, args.resume)
        if rank == 0:
            write_run_info(run_dir, cfg, argv, trainer.model)
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def evaluate_checkpoint(trainer, resume: str) -> dict[str, float]:
    """FROMAGe's -e/--evaluate: validate the resumed checkpoint once and write the metrics to
    <run>/eval_step<N>.json (and metrics.jsonl); the run's own files are left as they are."""
    import json

    metrics = trainer.validate()
    if trainer.rank == 0:
        out = trainer.run_dir / f"eval_step{trainer.state.step}.json"
        out.write_text(json.dumps({"checkpoint": str(resume), "step": trainer.state.step, "metrics": metrics},
                                  indent=2, sort_keys=True) + "\n")
        logger.info("evaluated %s (step %d): wrote %s", resume, trainer.state.step, out)
    return metrics
