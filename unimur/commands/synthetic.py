"""Generate the synthetic captioned-shape dataset (CC3M, VisDial 1.0 and MMDialog formats):

    python -m unimur.commands.synthetic --out demo_data --seed 0

The generator is `unimur.data.synthetic.generator.generate`; the same seed gives the same files.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Sequence

from unimur.data.synthetic.generator import DEFAULT_SIZES, generate


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m unimur.commands.synthetic",
                                description="Generate a synthetic captioned-shape dataset in the "
                                            "CC3M, VisDial 1.0 and MMDialog formats.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=DEFAULT_SIZES["n_train"])
    p.add_argument("--n-val", type=int, default=DEFAULT_SIZES["n_val"])
    p.add_argument("--n-visdial", type=int, default=DEFAULT_SIZES["n_visdial"])
    p.add_argument("--n-mmdialog", type=int, default=DEFAULT_SIZES["n_mmdialog"])
    p.add_argument("--image-size", type=int, default=DEFAULT_SIZES["image_size"])
    p.add_argument("--n-negatives", type=int, default=DEFAULT_SIZES["n_negatives"],
                   help="negative texts and images per MMDialog dialogue")
    p.add_argument("--n-heldout", type=int, default=DEFAULT_SIZES["n_heldout"],
                   help="number of (colour, shape) pairs kept out of training")
    p.add_argument("--heldout-frac", type=float, default=DEFAULT_SIZES["heldout_frac"],
                   help="fraction of evaluation items built around a held-out pair")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    paths = generate(args.out, args.seed, n_train=args.n_train, n_val=args.n_val,
                     n_visdial=args.n_visdial, n_mmdialog=args.n_mmdialog,
                     image_size=args.image_size, n_negatives=args.n_negatives,
                     n_heldout=args.n_heldout, heldout_frac=args.heldout_frac)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
