"""Prune a training checkpoint to a model folder holding only the trainable weights.

    python unimur/prune_model_ckpt.py --ckpt exp_log/unimur_exp/ckpt_best.pth.tar --output unimur_model/

The seed README's command path, kept as written: the command is `unimur.commands.prune` (flags, `--help`).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: sys.path[0] is unimur/, whose subpackages (data,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # model, utils...) would shadow top-level modules

from unimur.commands.prune import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())  # expected failures: one `error: ...` line
