"""Prune a training checkpoint to a model folder holding only the trainable weights.

    python unimur/prune_model_ckpt.py --ckpt exp_log/unimur_exp/ckpt_best.pth.tar --output unimur_model/
    unimur-prune --ckpt ... --output ...         # the same, installed

The work is `unimur.train.export.prune` (the checkpoint checked against its own config's
architecture; config.json, model.safetensors, tokenizer/ and manifest.json written).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from unimur.errors import run_cli
from unimur.train.export import prune


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="training checkpoint (ckpt.pth.tar / ckpt_best.pth.tar)")
    ap.add_argument("--output", default="unimur_model/", help="model folder to write")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return prune(args.ckpt, args.output)


def cli() -> int:
    """The ``unimur-prune`` console script."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
