"""Console scripts of the installed package (``pip install .``; see pyproject.toml).

    unimur-train            = python main.py
    unimur-eval-visdial     = python evals/eval_visdial.py
    unimur-eval-mmdialog    = python evals/eval_mmdialog.py
    unimur-extract-vis-emb  = python unimur/extract_vis_emb.py
    unimur-prune            = python unimur/prune_model_ckpt.py
    unimur-retrieve         = python -m unimur.inference.session
    unimur-app              = python -m unimur.commands.app
    unimur-demo             = python -m unimur_demo.pipeline

Each takes the same flags as the command on its right. The evaluation commands run the
repository's ``evals/`` scripts themselves: from a checkout (an editable install) or from the
copy a wheel ships inside the package (``unimur/_evals/evals``), put on ``sys.path`` only for the
command's own process, so no top-level ``evals`` package is installed.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Sequence

_EVAL_FILES = ("common.py", "eval_visdial.py", "eval_mmdialog.py")


def train(argv: Sequence[str] | None = None, prog: str = "unimur-train"):
    """``python main.py``: parse the training flags, then print the memory plan (``--dry-run``)
    or launch the process(es) and train. Returns rank 0's train state (or the plan)."""
    from unimur.commands.train_flags import parse_args
    from unimur.train.launch import launch

    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse_args(argv)
    if args.dry_run:
        return dry_run(args, cfg)
    return launch(args, cfg, [prog, *argv])


def dry_run(args, cfg) -> dict:
    """Print what the run would do and need per GPU and per node; start nothing. A precision
    the GPU found here cannot run ends in the same one-line error the run would give."""
    import torch

    from unimur.train.memory_plan import format_plan, format_run, memory_plan
    from unimur.utils.precision import check_precision, detected_gpu

    gpu = detected_gpu()
    check_precision(cfg.train.precision, gpu)
    per_node = args.nprocs or torch.cuda.device_count() or 1
    nodes = max(1, args.world_size) if args.multiprocessing_distributed else 1
    plan = memory_plan(cfg, per_node, nodes)
    backend = args.dist_backend if gpu is not None or args.dist_backend != "nccl" else "gloo (nccl needs GPUs)"
    print(format_run(cfg, gpu, per_node, nodes, backend, args.dist_timeout))
    print(format_plan(plan, cfg, per_node, nodes, args.gpu_memory or (gpu.total_gib if gpu else None)))
    return plan


def train_cli() -> int:
    from unimur.errors import run_cli

    return run_cli(train)


def evals_dir() -> Path:
    """The folder holding the evaluation scripts: the checkout's ``evals/`` or the packaged copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "evals", here / "_evals" / "evals"):
        if all((candidate / f).is_file() for f in _EVAL_FILES):
            return candidate
    raise FileNotFoundError(f"the evaluation scripts ({', '.join(_EVAL_FILES)}) are neither in "
                            f"{here.parent / 'evals'} nor in {here / '_evals' / 'evals'}")


def _eval_script(name: str) -> int:
    folder = evals_dir()
    loaded = sys.modules.get("evals")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").parent != folder:
        for key in [k for k in sys.modules if k == "evals" or k.startswith("evals.")]:
            del sys.modules[key]  # another package named `evals`: ours must win in this process
    sys.path.insert(0, str(folder.parent))
    script = importlib.import_module(f"evals.{name}")
    common = importlib.import_module("evals.common")
    return common.run_cli(script.main)


def eval_visdial() -> int:
    return _eval_script("eval_visdial")


def eval_mmdialog() -> int:
    return _eval_script("eval_mmdialog")


def extract_vis_emb() -> int:
    from unimur.inference.extract import main

    main()
    return 0


def prune() -> int:
    from unimur.train.export import main

    main()
    return 0


def retrieve() -> int:
    from unimur.inference.session import run_cli

    return run_cli()


def app() -> int:
    from unimur.commands.app import main
    from unimur.inference.session import run_cli

    return run_cli(entry=main)


def demo() -> int:
    from unimur_demo.pipeline import main

    return main()
