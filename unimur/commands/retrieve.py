"""Answer a dialogue with a trained model: the top-k images and text responses, with scores.

    python -m unimur.commands.retrieve --model-dir unimur_model --texts responses.txt \\
        --query "look at my cat" --query-image my_cat.jpg --query "do you have another one?"
    python -m unimur.commands.retrieve --model-dir unimur_model --images pool.safetensors --texts texts.jsonl \\
        --dialogue dialogue.json -k 3 --json
    python -m unimur.commands.retrieve --model-dir unimur_model --image-dir my_photos/ --query "a red star"

Image pool: --images (an embedding file from unimur/extract_vis_emb.py; a .pkl such as FROMAGe's
cc3m_embeddings.pkl needs --allow-pickle), --image-dir (embedded now, cached for the next run), or,
with neither, the one embedding file kept in --model-dir (the seed README's layout; the command
says which file it uses). Text pool: --texts, one response per line or JSON Lines.

The dialogue: --query TEXT and --query-image FILE_OR_POOL_ID, repeated, each one turn, in order;
or --dialogue FILE in MMDialog's turn format (images allowed inside turns; see unimur/inference/dialogue.py).
The model reads it as the MMDialog evaluation does (--prompt-style: FROMAGe's Q:/A: lines by
default; a dialogue longer than the LLM's positions loses its oldest turns, and the answer says
so) and one unified embedding scores both pools. --image-rule / --image-threshold / --text-ranking are
the evaluation's output rules (evals/eval_mmdialog.py). Expected failures print one
`error: ...` line and exit 1 (UNIMUR_TRACEBACK=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

# The --help of each response rule of unimur.inference.rules (IMAGE_RULES, TEXT_RANKINGS; SPEC
# section 4), written here so that `--help` does not import torch.
IMAGE_RULE_HELP = {
    "always": "an image with every response (UniMuR)",
    "threshold": "an image only when the top image's cosine exceeds --image-threshold",
    "ret-token": "an image only when greedy decoding after the dialogue (up to --ret-max-tokens, "
                 "cut at the first newline) yields [RET], ranked by that [RET]'s embedding (FROMAGe)",
}
TEXT_RANKING_HELP = {
    "embedding": "cosine of the unified embedding with each text's retrieval-space embedding (UniMuR)",
    "likelihood": "summed log p(text | dialogue) under the frozen LLM (FROMAGe's scoring)",
}


# ----------------------------------------------------------------------------------------------
# Flags shared with unimur.commands.app
# ----------------------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model, pools and output rules (the same flags for this command and `unimur.commands.app`)."""
    p.add_argument("--model-dir", default="unimur_model", help="pruned model folder; default: %(default)s")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--images", metavar="FILE",
                      help="image embeddings (.safetensors from unimur/extract_vis_emb.py, or a .pkl "
                           "with --allow-pickle); default: the embedding file in --model-dir, if any")
    pool.add_argument("--image-dir", metavar="DIR", help="embed the images of DIR now (cached under "
                                                         "$UNIMUR_CACHE/pools for later runs)")
    p.add_argument("--image-root", metavar="DIR", help="folder the pool's image ids are relative to "
                                                       "(to show files); default: as recorded")
    p.add_argument("--texts", metavar="FILE", help="candidate responses: one per line, or .jsonl")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading a .pkl embedding file (unpickling runs code from the file)")
    p.add_argument("--skip-nonfinite-embeddings", action="store_true",
                   help="leave out (and count) image embedding rows holding NaN or inf; default: refuse the file")
    p.add_argument("--image-rule", choices=tuple(IMAGE_RULE_HELP), default=None,
                   help="when to output an image: " + "; ".join(f"{k}: {v}" for k, v in IMAGE_RULE_HELP.items())
                        + " (default: always, or threshold when --image-threshold is given)")
    p.add_argument("--image-threshold", type=float, default=None, metavar="T")
    p.add_argument("--text-ranking", choices=tuple(TEXT_RANKING_HELP), default=None,
                   help="; ".join(f"{k}: {v}" for k, v in TEXT_RANKING_HELP.items())
                        + " (default: likelihood for a method=fromage model, else embedding)")
    p.add_argument("--ret-max-tokens", type=int, default=32, metavar="N",
                   help="ret-token: greedy tokens generated after the dialogue; default: %(default)s (FROMAGe's)")
    p.add_argument("--prompt-style", choices=("dialogue", "flat"), default="dialogue",
                   help="dialogue: each turn on its own line after Q: / A:, ending in 'A:' (FROMAGe's); "
                        "flat: the turns' pieces run together; default: %(default)s")
    p.add_argument("--max-context-tokens", type=int, default=None, metavar="N",
                   help="positions the dialogue may take; longer ones lose their oldest turns; "
                        "default: the LLM's maximum positions")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=64, help="pool embedding batch; default: %(default)s")
    p.add_argument("--cache-dir", default=None, help="--image-dir cache; default: $UNIMUR_CACHE/pools")


def add_dialogue_file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dialogue", metavar="FILE", help="a dialogue in MMDialog's turn format")
    p.add_argument("--conversation-id", default=None, help="the dialogue to use from a file of several")
    p.add_argument("--turns", type=int, default=None, dest="n_turns", metavar="N",
                   help="use the first N turns (N < 0: all but the last -N, e.g. -1 leaves out "
                        "a dialogue's target turn)")


def session_from_args(args: argparse.Namespace):
    """The :class:`~unimur.inference.session.Session` the flags of :func:`add_model_args` ask for."""
    from unimur.inference.session import Session

    return Session.open(args.model_dir, images=args.images, image_dir=args.image_dir, texts=args.texts,
                        image_root=args.image_root, image_rule=args.image_rule,
                        image_threshold=args.image_threshold, text_ranking=args.text_ranking,
                        ret_max_tokens=args.ret_max_tokens, prompt_style=args.prompt_style,
                        max_context_tokens=args.max_context_tokens, device=args.device,
                        batch_size=args.batch_size, cache_dir=args.cache_dir, allow_pickle=args.allow_pickle,
                        skip_nonfinite_embeddings=args.skip_nonfinite_embeddings)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def format_answer(answer: dict[str, Any], dialogue: Sequence[str]) -> str:
    s = answer["settings"]
    lines = [f"dialogue ({len(dialogue)} turns):"]
    lines += [f"  {i:>2}  {turn}" for i, turn in enumerate(dialogue, 1)]
    rule = s["image_rule"] + (f" {s['image_threshold']}" if s["image_threshold"] is not None else "")
    lines.append(f"model: {s['model_dir']}   image rule: {rule}   text ranking: {s['text_ranking']}   "
                 f"prompt: {s.get('prompt_style')}")
    cut = answer.get("context_cut") or {}
    if cut.get("cut"):
        lines.append(f"note: the dialogue is longer than {s.get('max_context_tokens')} positions: its oldest "
                     f"{cut['turns_dropped']} turn(s) were left out")
    if answer["images"]:
        if answer.get("generated_text") is not None:
            lines.append(f"generated after the dialogue: {answer['generated_text']!r}")
        lines.append(f"\ntop-{len(answer['images'])} images  (pool: {s['image_pool']}, "
                     f"{s['image_pool_size']} images)")
        if not answer["image_output"]:
            why = ("the model did not generate [RET]" if s["image_rule"] == "ret-token"
                   else f"the top score is not above {s['image_threshold']}")
            lines.append(f"  no image output: {why} (candidates shown anyway)")
        lines.append(f"  {'rank':>4}  {'score':>7}  image")
        lines += [f"  {x['rank']:>4}  {x['score']:7.4f}  {x['id']}" for x in answer["images"]]
    if answer["texts"]:
        lines.append(f"\ntop-{len(answer['texts'])} texts  (pool: {s['text_pool']}, "
                     f"{s['text_pool_size']} texts)")
        lines.append(f"  {'rank':>4}  {'score':>7}  text")
        lines += [f"  {x['rank']:>4}  {x['score']:7.4f}  {x['text']}" for x in answer["texts"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


class _Turn(argparse.Action):
    """--query / --query-image append one turn each, in command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        kind = "image" if option_string == "--query-image" else "text"
        turns = list(getattr(namespace, self.dest) or [])
        turns.append([(kind, value)])
        setattr(namespace, self.dest, turns)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m unimur.commands.retrieve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--query", action=_Turn, dest="turns", metavar="TEXT", help="one text turn (repeat)")
    p.add_argument("--query-image", action=_Turn, dest="turns", metavar="FILE",
                   help="one image turn: a file, or an id of the image pool (repeat)")
    add_dialogue_file_args(p)
    p.add_argument("-k", type=int, default=3, help="results per modality; default: %(default)s")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if bool(args.turns) == bool(args.dialogue):
        p.error("give the dialogue as --query/--query-image turns or as --dialogue FILE (one of them)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from unimur.inference.dialogue import read_dialogue, render, select_turns, to_turn_pieces

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    if args.dialogue:
        turns, base = read_dialogue(args.dialogue, args.conversation_id), Path(args.dialogue).parent
    else:
        turns, base = args.turns, Path(".")
    turns = select_turns(turns, args.n_turns)
    session = session_from_args(args)
    answer = session.answer(to_turn_pieces(turns, session.images, base), k=args.k)
    answer["dialogue"] = render(turns)
    print(json.dumps(answer, indent=1) if args.json else format_answer(answer, answer["dialogue"]))
    return answer


def run_cli(argv: Sequence[str] | None = None, entry=main) -> int:
    """``entry(argv)``; expected failures (missing files, bad input) become one ``error: ...`` line."""
    from unimur.errors import run_cli as run_command

    return run_command(entry, argv, one_line=True)


def cli() -> int:
    """The ``unimur-retrieve`` console script."""
    return run_cli()


if __name__ == "__main__":
    sys.exit(cli())
