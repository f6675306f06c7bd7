"""Answer a dialogue with a trained model: the top-k images and text responses, with scores.

    python -m unimur.inference.session --model-dir unimur_model --texts responses.txt \\
        --query "look at my cat" --query-image my_cat.jpg --query "do you have another one?"
    python -m unimur.inference.session --model-dir unimur_model --images pool.safetensors --texts texts.jsonl \\
        --dialogue dialogue.json -k 3 --json
    python -m unimur.inference.session --model-dir unimur_model --image-dir my_photos/ --query "a red star"

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
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("unimur.inference.session")

# The evaluation's response rules (SPEC section 4, MMDialog; unimur/evaluation/mmdialog/protocol.py): a name, a
# description, and a branch in Session.answer each.
IMAGE_RULES = {
    "always": "an image with every response (UniMuR)",
    "threshold": "an image only when the top image's cosine exceeds --image-threshold",
    "ret-token": "an image only when greedy decoding after the dialogue (up to --ret-max-tokens, "
                 "cut at the first newline) yields [RET], ranked by that [RET]'s embedding (FROMAGe)",
}
TEXT_RANKINGS = {
    "embedding": "cosine of the unified embedding with each text's retrieval-space embedding (UniMuR)",
    "likelihood": "summed log p(text | dialogue) under the frozen LLM (FROMAGe's scoring)",
}


# ----------------------------------------------------------------------------------------------
# Flags shared with unimur.commands.app
# ----------------------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model, pools and output rules (the same flags for `unimur.inference.session` and `unimur.commands.app`)."""
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
    p.add_argument("--image-rule", choices=tuple(IMAGE_RULES), default=None,
                   help="when to output an image: " + "; ".join(f"{k}: {v}" for k, v in IMAGE_RULES.items())
                        + " (default: always, or threshold when --image-threshold is given)")
    p.add_argument("--image-threshold", type=float, default=None, metavar="T")
    p.add_argument("--text-ranking", choices=tuple(TEXT_RANKINGS), default=None,
                   help="; ".join(f"{k}: {v}" for k, v in TEXT_RANKINGS.items())
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


def rules_of(args: argparse.Namespace, method: str) -> tuple[str, str]:
    """(image rule, text ranking): the evaluation's defaults for the model's method."""
    from unimur.inference.rules import response_rules

    return response_rules(method, args.image_rule, args.text_ranking, args.image_threshold)


# ----------------------------------------------------------------------------------------------
# A loaded model with its pools
# ----------------------------------------------------------------------------------------------


@dataclass
class Session:
    """A model, its pools and the output rules: what the command and the web app answer with."""

    retriever: Any                       # unimur.inference.retriever.Retriever
    model_dir: str
    image_source: str | None             # what the image pool is, for the record
    text_source: str | None
    image_rule: str = "always"
    image_threshold: float | None = None
    text_ranking: str = "embedding"
    image_root: str | None = None
    settings: dict = field(default_factory=dict)
    likelihood_texts: list[str] | None = None   # the text pool, ranked by LLM likelihood
    ret_max_tokens: int = 32
    prompt: Any = None                   # unimur.inference.prompting.PromptBuilder: layout and fit

    @classmethod
    def open(cls, args: argparse.Namespace) -> "Session":
        """Check the inputs, load the model, then the pools (texts are embedded once, here)."""
        import torch

        from unimur.model.model import UniMuR
        from unimur.inference.pools import find_model_embeddings, read_texts
        from unimur.model.pretrained import read_model_config
        from unimur.inference.retriever import Retriever

        rule, ranking = rules_of(args, read_model_config(args.model_dir).method)  # a wrong folder fails here
        threshold = args.image_threshold
        texts = read_texts(args.texts) if args.texts else None
        images_file = args.images
        if not images_file and not args.image_dir:
            found = find_model_embeddings(args.model_dir)
            if found is not None:
                logger.info("image pool: %s (the embedding file in --model-dir; --images chooses another)",
                            found)
                images_file = str(found)
        if images_file and not Path(images_file).is_file():
            raise FileNotFoundError(f"image embedding file not found: {images_file}")
        if not (images_file or args.image_dir or texts):
            raise ValueError(f"no pool to retrieve from: {args.model_dir} holds no embedding file; give "
                             f"--images FILE, --image-dir DIR and/or --texts FILE")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = UniMuR.from_pretrained(args.model_dir, device=device)
        sha = json.loads((Path(args.model_dir) / "manifest.json").read_text())["weights_sha256"]
        images = _image_pool(model, args, images_file, sha)
        # likelihood ranking scores the texts per dialogue: they are not embedded up front
        retriever = Retriever.from_model(model, images, texts if ranking == "embedding" else None,
                                         batch_size=args.batch_size)
        if args.ret_max_tokens < 1:
            raise ValueError(f"--ret-max-tokens must be >= 1, got {args.ret_max_tokens}")
        prompt = retriever.embedder.prompt_builder(args.prompt_style, args.max_context_tokens)
        return cls(retriever, str(args.model_dir), images_file or args.image_dir, args.texts, rule,
                   threshold, ranking, args.image_root or args.image_dir,
                   likelihood_texts=texts if ranking == "likelihood" else None,
                   ret_max_tokens=args.ret_max_tokens, prompt=prompt)

    @property
    def images(self):
        return self.retriever.images

    def reserve(self) -> int:
        """Positions the dialogue must leave free: [RET], the generated tokens (ret-token), the
        longest candidate (likelihood)."""
        room = 1 if self.image_rule != "ret-token" else self.ret_max_tokens + 1
        if self.likelihood_texts is not None:
            room = max(room, self.prompt.candidate_tokens(self.likelihood_texts))
        return room

    def answer(self, turns: Sequence[Sequence], k: int = 3) -> dict[str, Any]:
        """Top-``k`` images and texts for one dialogue: its turns, each a list of pieces (text,
        PIL images, W_cap features), laid out and fitted by the session's prompt builder."""
        from unimur.inference.pools import image_file

        if k < 1:
            raise ValueError(f"-k must be >= 1, got {k}")
        fitted = self.prompt.build(turns, self.reserve())
        pieces = fitted.pieces
        result = self.retriever.retrieve([pieces], k=k)[0]
        ranked = result.texts if self.likelihood_texts is None else self._by_likelihood(pieces, k)
        texts = [{"rank": r, "text": t, "score": round(s, 4)} for r, (t, s) in enumerate(ranked, 1)]
        output, generated, top_images = None, None, result.images
        if top_images:  # the evaluation's rules: threshold compares the top image's cosine, strictly
            if self.image_rule == "ret-token":
                gen = self.retriever.embedder.generate_responses([pieces], self.ret_max_tokens)
                output, generated = bool(gen.ret[0]), gen.texts[0]
                if output:  # FROMAGe retrieves with the generated [RET]'s state
                    top_images = self.retriever.rank_images(gen.u[:1], k)[0]
            else:
                output = self.image_rule == "always" or top_images[0][1] > self.image_threshold
        images = [{"rank": r, "id": i, "score": round(s, 4),
                   "file": str(f) if (f := image_file(i, self.images, self.image_root)) else None}
                  for r, (i, s) in enumerate(top_images, 1)]
        return {"images": images, "texts": texts, "image_output": output, "generated_text": generated,
                "context_cut": {"cut": fitted.cut, "turns_dropped": fitted.turns_dropped},
                "settings": {"model_dir": self.model_dir, "image_pool": self.image_source,
                             "image_pool_size": len(self.images) if self.images is not None else 0,
                             "text_pool": self.text_source,
                             "text_pool_size": len(self.retriever.texts or self.likelihood_texts or []),
                             "image_rule": self.image_rule, "image_threshold": self.image_threshold,
                             "text_ranking": self.text_ranking, "prompt_style": self.prompt.style,
                             "max_context_tokens": self.prompt.max_tokens, "k": k}}

    def _by_likelihood(self, pieces: Sequence, k: int) -> list[tuple[str, float]]:
        """Top-k texts by summed log p(text | dialogue), FROMAGe's scoring (ties: pool order)."""
        import torch

        from unimur.inference.prompting import candidate_text

        read_as = [candidate_text(t, self.prompt.style) for t in self.likelihood_texts]
        sums, _ = self.retriever.embedder.text_log_likelihoods(list(pieces), read_as)
        order = torch.argsort(-sums, stable=True)[:k].tolist()
        return [(self.likelihood_texts[i], float(sums[i])) for i in order]


def _image_pool(model, args: argparse.Namespace, images_file: str | None, sha: str):
    from unimur.inference.image_embeddings import model_widths
    from unimur.inference.pools import image_dir_pool, load_image_pool
    from unimur.inference.retriever import ModelEmbedder

    if images_file:
        return load_image_pool(images_file, args.allow_pickle, sha, widths=model_widths(model),
                               skip_nonfinite=args.skip_nonfinite_embeddings)
    if args.image_dir:
        embedder = ModelEmbedder(model, batch_size=args.batch_size, progress=True)
        return image_dir_pool(embedder, args.image_dir, sha, args.cache_dir)
    return None


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
    p = argparse.ArgumentParser(prog="python -m unimur.inference.session", description=__doc__,
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
    session = Session.open(args)
    answer = session.answer(to_turn_pieces(turns, session.images, base), k=args.k)
    answer["dialogue"] = render(turns)
    print(json.dumps(answer, indent=1) if args.json else format_answer(answer, answer["dialogue"]))
    return answer


def run_cli(argv: Sequence[str] | None = None, entry=main) -> int:
    """``entry(argv)``; expected failures (missing files, bad input) become one ``error: ...`` line."""
    try:
        entry(argv)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if os.environ.get("UNIMUR_TRACEBACK"):
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        sys.stderr.write(f"error: {' '.join(message.split())}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli())
