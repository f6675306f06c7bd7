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

import collections
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unimur.config import Config
from unimur.data.cc3m_sources import check_split_source
from unimur.errors import EXPECTED, RunFolderError, UniMuRError, explain_backbone_errors, message, show_tracebacks
from unimur.train.checkpoint import LATEST, load_checkpoint
from unimur.train.run_folder import RunLock, check_new_run, check_not_locked, clear_previous_run
from unimur.utils import distributed as dist_utils
from unimur.utils.precision import check_precision, detected_gpu, enable_tf32

logger = logging.getLogger(__name__)

# How to point at a local copy when a frozen backbone cannot be loaded (errors.explain_backbone_errors).
BACKBONE_FIXES = {
    "llm": "pass --opt-version /path/to/folder holding its config.json, weights and tokenizer files",
    "visual": "pass --visual-model NAME:/path/to/open_clip_weights.bin (e.g. "
              "ViT-L-14:/models/clip.bin) or local-dir:/path/to/open_clip_folder",
}

# ----------------------------------------------------------------------------------------------
# Logging: console at once, <run>/train.log once the run folder exists
# ----------------------------------------------------------------------------------------------

_FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
_pending: "_Pending | None" = None      # rank 0's records kept until train.log can be opened
_run_log: logging.Handler | None = None  # rank 0's train.log handler, once attached


class _Pending(logging.Handler):
    """Keeps records in memory (the newest 10,000) until the run folder exists."""

    def __init__(self):
        super().__init__()
        self.records: collections.deque = collections.deque(maxlen=10_000)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _RunLogHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        # A full disk fails the log as well as the checkpoint: the one-line error on the console
        # says what happened, and a logging traceback for every later line would bury it.
        pass


def _not_a_repeated_download_error(record: logging.LogRecord) -> bool:
    # open_clip logs its failed download at ERROR and then raises it; the one-line error that
    # explain_backbone_errors makes of the exception says it again, with what to do.
    return not (record.levelno >= logging.ERROR and f"{os.sep}open_clip{os.sep}" in record.pathname
                and "download" in record.getMessage().lower())


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere, to the console; rank 0 also keeps its records
    for train.log, which :func:`attach_run_log` opens once the run folder may be created."""
    global _pending, _run_log
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT.format(rank=rank), "%H:%M:%S"))
    console.addFilter(_not_a_repeated_download_error)
    root.addHandler(console)
    _pending, _run_log = (_Pending(), None) if rank == 0 else (None, None)
    if _pending is not None:
        root.addHandler(_pending)
    root.setLevel(level)


def attach_run_log(run_dir: Path) -> None:
    """Open <run_dir>/train.log (rank 0, folder exists) and write the records kept so far."""
    global _pending, _run_log
    if _run_log is not None:
        return
    root = logging.getLogger()
    _run_log = _RunLogHandler(run_dir / "train.log")
    _run_log.setFormatter(logging.Formatter(_FORMAT.format(rank=0), "%H:%M:%S"))
    if _pending is not None:
        root.removeHandler(_pending)
        for record in _pending.records:
            _run_log.handle(record)
        _pending = None
    root.addHandler(_run_log)


def _error_to_run_log(message: str) -> None:
    """The one-line error, in train.log only (the command prints it on the console)."""
    if _run_log is not None:
        _run_log.handle(logging.makeLogRecord({"name": __name__, "levelno": logging.ERROR,
                                               "levelname": "ERROR", "msg": f"error: {message}"}))


def record_error(run_dir: Path, message: str) -> None:
    """A failure before training started, appended to an existing run folder's train.log
    (never creating the folder), unless another trainer holds the folder."""
    if not run_dir.is_dir():
        return
    try:
        check_not_locked(run_dir)
    except RunFolderError:
        return
    handler = _RunLogHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=0), "%H:%M:%S"))
    handler.handle(logging.makeLogRecord({"name": __name__, "levelno": logging.ERROR,
                                          "levelname": "ERROR", "msg": f"error: {message}"}))
    handler.close()


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.log_base_dir) / cfg.train.exp_name


# ----------------------------------------------------------------------------------------------
# Checks before anything starts
# ----------------------------------------------------------------------------------------------


def preflight(args, cfg: Config, run_dir: Path, check_folder: bool = True) -> None:
    """What can be checked in a second, before processes, the run folder or the model exist:
    the run folder may be used, the caption TSVs and image dir exist with the right header,
    the checkpoint to resume from is a UniMuR training checkpoint."""
    if check_folder:
        check_not_locked(run_dir)
        check_new_run(run_dir, args.resume, getattr(args, "overwrite", False))
    for split in ("train", "val"):
        check_split_source(cfg.data.dataset_format, cfg.data.dataset_dir, cfg.data.image_dir, split)
    resume = run_dir / LATEST if args.resume == "latest" else (Path(args.resume) if args.resume else None)
    if resume is not None and (args.resume != "latest" or resume.exists()):
        load_checkpoint(resume)


def _first_node(args) -> bool:
    """The process that owns the run folder's checks: one per run (torchrun rank 0, the
    spawning parent on node 0, or the single process)."""
    return args.rank == 0 and os.environ.get("RANK", "0") == "0"


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------


def _device(args, local_rank: int) -> torch.device:
    want = args.device or dist_utils.default_device()
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
    """Start training in the mode the flags and environment ask for; returns rank 0's state.

    Expected failures (bad inputs, a run folder in use, a backbone that cannot be loaded, a
    checkpoint that cannot be written) raise one of :data:`unimur.errors.EXPECTED` with a
    one-line message, also written to train.log when the run folder exists.
    """
    run_dir = run_dir_of(cfg)
    first = _first_node(args)
    try:
        preflight(args, cfg, run_dir, check_folder=first)
    except EXPECTED as e:
        if first and not isinstance(e, RunFolderError):  # never write into a refused folder
            record_error(run_dir, message(e))
        raise
    if args.multiprocessing_distributed:
        nprocs = args.nprocs or torch.cuda.device_count() or 1
        world = nprocs * args.world_size
        ctx = mp.get_context("spawn")
        result = ctx.SimpleQueue()
        try:
            mp.start_processes(_worker, args=(nprocs, world, args, cfg, argv, result), nprocs=nprocs,
                               start_method="spawn", join=True)
        except mp.ProcessExitedException:
            errors = [m for kind, m in _drain(result) if kind == "error"]
            if errors:  # a worker's expected failure (already in train.log): print it once
                raise UniMuRError(errors[0]) from None
            raise
        return next((m for kind, m in _drain(result) if kind == "state"), None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / SLURM-style env://
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        return _run(local, rank, world, "env://", args, cfg, argv)
    return _run(0, 0, 1, None, args, cfg, argv)


def _drain(queue) -> list[tuple[str, object]]:
    """The ("state" | "error", value) pairs the workers left in ``queue``."""
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def _worker(local_rank, nprocs, world, args, cfg, argv, result):
    rank = args.rank * nprocs + local_rank
    try:
        state = _run(local_rank, rank, world, args.dist_url, args, cfg, argv)
    except EXPECTED as e:
        if show_tracebacks():
            raise
        # the parent prints it once; exiting non-zero makes it stop the other workers
        result.put(("error", message(e)))
        sys.exit(1)
    if rank == 0:
        result.put(("state", state))


def _run(local_rank: int, rank: int, world: int, init_method: str | None, args, cfg: Config, argv):
    from unimur.train.trainer import Trainer, write_run_info

    run_dir = run_dir_of(cfg)
    overwrite = getattr(args, "overwrite", False)
    setup_logging(rank)
    # Rank 0 holds the run folder's lock for the whole run. An existing folder is locked before
    # the trainer reads its checkpoint or clears its temp files; a new one is created only once
    # the trainer is built, i.e. once the data, backbones and checkpoint have all been read.
    lock = RunLock(run_dir) if rank == 0 else None
    try:
        if lock is not None and run_dir.is_dir():
            lock.acquire()
            if not overwrite:  # with --overwrite the old train.log goes once the new run starts
                attach_run_log(run_dir)
        device = _device(args, local_rank)
        # before any weight is read: a GPU that cannot run the precision stops in one line
        check_precision(cfg.train.precision, detected_gpu(device.index or 0) if device.type == "cuda" else None)
        enable_tf32()
        if device.type == "cpu" and world > 1:
            # share the cores instead of oversubscribing them world-fold
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        # a launcher (torchrun) gets its process group and DDP even for one process, so a
        # one-GPU check runs the collectives a multi-GPU run runs
        if world > 1 or init_method == "env://":
            dist_utils.init(_backend(args, device), init_method, world, rank, args.dist_timeout)
            logger.info("process group up: rank %d of world size %d (%s, %s backend, timeout %g min)", rank, world,
                        init_method, dist.get_backend(), args.dist_timeout)
        with explain_backbone_errors(cfg.model.llm, cfg.model.visual_model, BACKBONE_FIXES):
            trainer = Trainer(cfg, run_dir, device, resume=args.resume)
        if lock is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            check_new_run(run_dir, args.resume, overwrite)  # in case another run wrote here meanwhile
            if overwrite:
                clear_previous_run(run_dir)
            attach_run_log(run_dir)
        if args.evaluate:  # FROMAGe's -e: the run's own record is left as it is
            return evaluate_checkpoint(trainer, args.resume)
        if lock is not None:
            write_run_info(run_dir, cfg, argv, trainer.model)
        return trainer.fit()
    except EXPECTED as e:
        _error_to_run_log(message(e))
        raise
    finally:
        if lock is not None:
            lock.release()
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
