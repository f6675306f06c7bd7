"""MMDialog test, multimodal response retrieval (paper Table 1; SPEC section 4).

    python unimur/extract_vis_emb.py                  # optional: embed the test images once
    python evals/eval_mmdialog.py                     # unimur_model/ on MMDialog/test
    python evals/eval_mmdialog.py --embeddings mmdialog_test.safetensors --target last \\
        --output results/mmdialog.json --examples-png mmdialog.png

Per query, the pool is its ground-truth elements plus its negatives; a query whose pool holds
fewer than --n-negatives negatives per modality (999 in MMDialog) is skipped and counted, never
scored as a full pool. Reports text, image and overall R@1/5/10 (plus MRR, mean rank), the image
retrieval rate and the cross-modal consistency. The split is read and scored --chunk-size
queries at a time (memory does not grow with it). Without --embeddings each chunk's images
are embedded as it comes; with it, the file must have been extracted with this model (its
weights digest is compared) unless --allow-embeddings-mismatch, which the results record.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from unimur.commands.eval_common import (
    add_common_args,
    check_embeddings_model,
    check_model_dir,
    load_embedder,
    model_info,
    report,
    require_path,
)
from unimur.data.mmdialog import TARGETS, MMDialogStream, conversations_path
from unimur.data.synthetic.generator import mmdialog_attribute_labels
from unimur.errors import run_cli
from unimur.evaluation.mmdialog.protocol import MMDIALOG_NEGATIVES, evaluate_mmdialog
from unimur.inference.image_embeddings import check_widths, finite_rows, load_image_embeddings, model_widths
from unimur.inference.prompting import DEFAULT_PROMPT_STYLE, PROMPT_STYLES
from unimur.inference.rules import IMAGE_RULES, RET_MAX_TOKENS, TEXT_RANKINGS, response_rules
from unimur.model.pretrained import read_model_config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python evals/eval_mmdialog.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--mmdialog-dir", default="MMDialog",
                   help="holds <split>/conversations.json and <split>/<media_key>.jpg; "
                        "default: %(default)s")
    p.add_argument("--split", default="test", help="default: %(default)s")
    p.add_argument("--target", default="last", choices=TARGETS,
                   help="target turn: the last one (paper) or every turn after the first; "
                        "default: %(default)s")
    p.add_argument("--embeddings", default=None, metavar="FILE",
                   help="precomputed image embeddings from unimur/extract_vis_emb.py "
                        "(.safetensors; a .pkl needs --allow-pickle); default: embed the images now")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading a .pkl embedding file (unpickling runs code from the file)")
    p.add_argument("--skip-nonfinite-embeddings", action="store_true",
                   help="leave out (and count) --embeddings rows holding NaN or inf; default: refuse the file")
    p.add_argument("--allow-embeddings-mismatch", action="store_true",
                   help="evaluate with --embeddings extracted by another model (its weights "
                        "digest differs); recorded in the results")
    p.add_argument("--n-negatives", type=int, default=MMDIALOG_NEGATIVES, metavar="N",
                   help="negatives per modality in a full candidate pool; queries with fewer "
                        "are skipped and counted. A smaller set states its own size (a synthetic "
                        "set: the --n-negatives it was generated with); default: %(default)s")
    p.add_argument("--image-threshold", type=float, default=None, metavar="T",
                   help="with --image-rule threshold: output an image only when its cosine exceeds T")
    p.add_argument("--image-rule", choices=IMAGE_RULES, default=None,
                   help="when an image is output: always (UniMuR), threshold (--image-threshold), "
                        "ret-token (FROMAGe: only when the model generates [RET] after the context); "
                        "default: ret-token for a method=fromage model, else always (threshold with "
                        "--image-threshold)")
    p.add_argument("--ret-max-tokens", type=int, default=RET_MAX_TOKENS, metavar="N",
                   help="ret-token: greedy tokens generated after the context (cut at the first "
                        "newline) among which a [RET] shows an image; FROMAGe's: %(default)s")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default=DEFAULT_PROMPT_STYLE,
                   help="dialogue: each turn on its own line after Q: / A:, ending in '\\nA:' "
                        "(FROMAGe's); flat: the turns' pieces run together; default: %(default)s")
    p.add_argument("--max-context-tokens", type=int, default=None, metavar="N",
                   help="positions a context may take; longer ones lose their oldest turns "
                        "(counted); default: the LLM's maximum positions")
    p.add_argument("--text-ranking", choices=TEXT_RANKINGS, default=None,
                   help="embedding (UniMuR: cosine with u) or likelihood (FROMAGe: log p(text | "
                        "context) under the frozen LLM); default: likelihood for a method=fromage "
                        "model (it has no text space), else embedding")
    p.add_argument("--chunk-size", type=int, default=64, metavar="N",
                   help="dialogues embedded and scored together (memory does not grow with the "
                        "split); default: %(default)s")
    p.add_argument("--attribute-labels", default=None, metavar="META.json",
                   help="labels for the attribute consistency (a synthetic set's meta.json); "
                        "default: <mmdialog-dir>/../meta.json when it is a synthetic set's")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.n_negatives < 1:
        raise ValueError(f"--n-negatives must be >= 1, got {args.n_negatives}")
    if args.max_context_tokens is not None and args.max_context_tokens < 2:
        raise ValueError(f"--max-context-tokens must be >= 2, got {args.max_context_tokens}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Read and check the data, the embeddings and the model folder before loading the model: a
    # wrong path or a damaged file should fail in a second, not after minutes of loading.
    require_path(conversations_path(args.mmdialog_dir, args.split), "MMDialog conversations file",
                 "pass --mmdialog-dir: the folder with <split>/conversations.json and the images "
                 "(see https://github.com/victorsungo/MMDialog)")
    # a stream: the split is read again, chunk by chunk, during the evaluation; reading up to its
    # first usable query now catches a wrong file or format before the model loads
    data = MMDialogStream(args.mmdialog_dir, args.split, args.target, check_images=not args.embeddings)
    data.first_query()
    check_model_dir(args.model_dir)
    embeddings, embeddings_check = None, None
    if args.embeddings:
        require_path(args.embeddings, "embedding file",
                     "write it with `python unimur/extract_vis_emb.py`, or omit --embeddings")
        embeddings = load_image_embeddings(args.embeddings, allow_pickle=args.allow_pickle)
        embeddings = finite_rows(embeddings, args.embeddings, args.skip_nonfinite_embeddings)
        embeddings_check = check_embeddings_model(embeddings, args.embeddings, args.model_dir,
                                                  args.allow_embeddings_mismatch)
    image_rule, text_ranking = response_rules(read_model_config(args.model_dir).method, args.image_rule,
                                              args.text_ranking, args.image_threshold)
    labels_path = args.attribute_labels or _synthetic_meta(args.mmdialog_dir)
    labels = mmdialog_attribute_labels(labels_path) if labels_path else None
    embedder = load_embedder(args.model_dir, args.device, args.batch_size, args.num_workers,
                             progress=not args.no_progress)
    if embeddings is not None:
        check_widths(embeddings, args.embeddings, model_widths(embedder.model))
    results = evaluate_mmdialog(embedder, args.mmdialog_dir, split=args.split, target=args.target,
                                embeddings=embeddings, image_threshold=args.image_threshold,
                                n_negatives=args.n_negatives, data=data, image_rule=image_rule,
                                text_ranking=text_ranking, ret_max_tokens=args.ret_max_tokens,
                                prompt_style=args.prompt_style, max_context_tokens=args.max_context_tokens,
                                attribute_labels=labels, chunk_size=args.chunk_size)
    results["settings"]["attribute_labels"] = str(labels_path) if labels_path else None
    results["settings"]["embeddings_file"] = str(Path(args.embeddings).resolve()) if args.embeddings else None
    results["settings"]["embeddings_check"] = embeddings_check
    if embeddings_check and "note" in embeddings_check:
        results["notes"].append(embeddings_check["note"])
    results["model"] = model_info(args.model_dir, embedder)
    print(report(results, args.output, args.examples_png))
    return results


def _synthetic_meta(mmdialog_dir: str) -> Path | None:
    """A synthetic set's meta.json beside its MMDialog folder (it knows what each image shows)."""
    meta = Path(mmdialog_dir).resolve().parent / "meta.json"
    if not meta.is_file():
        return None
    try:
        return meta if "generator_version" in json.loads(meta.read_text()) else None
    except ValueError:
        return None


def cli() -> int:
    """The ``unimur-eval-mmdialog`` console script (``python evals/eval_mmdialog.py``)."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
