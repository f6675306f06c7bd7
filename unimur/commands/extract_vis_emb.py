"""Embed an image collection once, for retrieval (FROMAGe's cc3m_embeddings, made safe).

    python unimur/extract_vis_emb.py --model-dir unimur_model --image-dir MMDialog/test \\
        --output unimur_model/mmdialog_test_embeddings.safetensors
    python unimur/extract_vis_emb.py --model-dir unimur_model --image-list images.txt --output OUT \\
        --format fromage-pkl          # FROMAGe's {"paths", "embeddings"} pickle layout
    python unimur/extract_vis_emb.py --convert-pickle cc3m_embeddings.pkl --allow-pickle --output OUT

The work is `unimur.inference.extract`: resumable parts, unreadable images skipped and listed.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from unimur.errors import run_cli
from unimur.inference.extract import convert_pickle, extract, list_images
from unimur.utils.distributed import default_device


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="unimur_model")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--image-dir")
    src.add_argument("--image-list", help="text file, one image path per line (relative to the file)")
    src.add_argument("--convert-pickle", help="FROMAGe .pkl to convert to safetensors (needs --allow-pickle)")
    ap.add_argument("--output", default="unimur_model/image_embeddings.safetensors")
    ap.add_argument("--format", choices=("safetensors", "fromage-pkl"), default="safetensors")
    ap.add_argument("--allow-pickle", action="store_true", help="trust and unpickle a .pkl input")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("-j", "--workers", type=int, default=4)
    ap.add_argument("--part-size", type=int, default=4096, help="images per resumable part")
    ap.add_argument("--device", default=default_device())
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.convert_pickle:
        return convert_pickle(args.convert_pickle, args.output, args.allow_pickle)
    if not (args.image_dir or args.image_list):
        ap.error("give --image-dir or --image-list (or --convert-pickle)")
    ids, paths = list_images(args.image_dir, args.image_list)
    root = args.image_dir or Path(args.image_list).parent
    return extract(args.model_dir, ids, paths, args.output, fmt=args.format, batch_size=args.batch_size,
                   workers=args.workers, part_size=args.part_size, device=args.device, image_root=root)


def cli() -> int:
    """The ``unimur-extract-vis-emb`` console script."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
