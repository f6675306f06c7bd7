"""Train UniMuR: parse flags, set up processes and logging, build the trainer, train.

The seed README's command works as written (see README.md); the loop lives in
`unimur/trainer.py`, process launch in `unimur/launch.py`. Bad inputs, a run folder in use or
holding an earlier run, or a backbone that cannot be loaded end in one `error: ...` line.
"""
import sys

from unimur.cli import parse_args
from unimur.errors import run_cli
from unimur.launch import launch


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse_args(argv)
    if args.dry_run:
        return dry_run(args, cfg)
    return launch(args, cfg, ["main.py", *argv])


def dry_run(args, cfg) -> dict:
    """Print what the run would need per GPU and per node; start nothing."""
    import torch

    from unimur.memory_plan import detected_gpu_gib, format_plan, memory_plan

    per_node = args.nprocs or torch.cuda.device_count() or 1
    nodes = max(1, args.world_size) if args.multiprocessing_distributed else 1
    plan = memory_plan(cfg, per_node, nodes)
    print(format_plan(plan, cfg, per_node, nodes, args.gpu_memory or detected_gpu_gib()))
    return plan


if __name__ == "__main__":
    sys.exit(run_cli(main))  # expected failures: one `error: ...` line (UNIMUR_TRACEBACK=1: traceback)
