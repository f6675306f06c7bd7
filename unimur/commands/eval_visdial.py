"""VisDial 1.0 val, dialogue-to-image retrieval (paper Table 3; SPEC section 4).

    python evals/eval_visdial.py                      # unimur_model/ on VisualDialog/
    python evals/eval_visdial.py --model-dir unimur_model --visdial-dir VisualDialog \\
        --context caption+rounds --rounds 10 --output results/visdial.json --examples-png visdial.png

Reports R@1/5/10, MRR and mean rank for dialogue->image (the intended direction) and
image->dialogue (FROMAGe's released script's direction); the pool is every evaluated image.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from unimur.commands.eval_common import (
    add_common_args,
    check_model_dir,
    load_embedder,
    model_info,
    report,
    require_path,
)
from unimur.data.visdial import CONTEXTS, load_visdial, visdial_paths
from unimur.errors import run_cli
from unimur.evaluation.visdial import evaluate_visdial
from unimur.inference.rules import RET_MAX_TOKENS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python evals/eval_visdial.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--visdial-dir", default="VisualDialog",
                   help="holds visdial_1.0_<split>.json and VisualDialog_<split>2018/; "
                        "default: %(default)s")
    p.add_argument("--split", default="val", help="default: %(default)s")
    p.add_argument("--context", default="rounds", choices=CONTEXTS,
                   help="query text: the rounds only, or the caption then the rounds; "
                        "default: %(default)s")
    p.add_argument("--rounds", type=int, default=10, help="rounds in the query; default: %(default)s")
    p.add_argument("--image-rule", choices=("always", "ret-token"), default="always",
                   help="ret-token: count a dialogue's image as output only when the model generates "
                        "[RET] after it (FROMAGe), adding the image retrieval rate; default: %(default)s")
    p.add_argument("--ret-max-tokens", type=int, default=RET_MAX_TOKENS, metavar="N",
                   help="ret-token: greedy tokens generated after the dialogue (cut at the first "
                        "newline) among which a [RET] outputs an image; FROMAGe's: %(default)s")
    p.add_argument("--image-resize", choices=("crop", "squash"), default="crop",
                   help="crop: the encoder's preprocessing (short side, centre crop); squash: resize "
                        "to the square input first, as FROMAGe's evaluation does (to reproduce its "
                        "numbers); default: %(default)s")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Read and check the data and the model folder before loading the model: a wrong path or a
    # truncated JSON should fail in a second, not after minutes of loading.
    json_path, _ = visdial_paths(args.visdial_dir, args.split)
    require_path(json_path, "VisDial annotation file",
                 "pass --visdial-dir: the folder with visdial_1.0_val.json and "
                 "VisualDialog_val2018/ (see the README's 'Preparing Evaluation Datasets')")
    data = load_visdial(args.visdial_dir, args.split)
    check_model_dir(args.model_dir)
    embedder = load_embedder(args.model_dir, args.device, args.batch_size, args.num_workers,
                             progress=not args.no_progress, image_resize=args.image_resize)
    results = evaluate_visdial(embedder, args.visdial_dir, context=args.context,
                               rounds=args.rounds, split=args.split, data=data,
                               image_rule=args.image_rule, ret_max_tokens=args.ret_max_tokens)
    results["settings"]["image_resize"] = args.image_resize
    results["model"] = model_info(args.model_dir, embedder)
    print(report(results, args.output, args.examples_png))
    return results


def cli() -> int:
    """The ``unimur-eval-visdial`` console script (``python evals/eval_visdial.py``)."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
