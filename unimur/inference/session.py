"""A trained model with its pools and output rules, answering dialogues: the session shared by
``python -m unimur.commands.retrieve`` and the web app (`unimur.commands.app`).

    session = Session.open("unimur_model", images="pool.safetensors", texts="responses.txt")
    answer = session.answer([[("text", "look at my cat")], [("text", "do you have another one?")]], k=3)

``answer`` lays the turns out as the MMDialog evaluation does (FROMAGe's Q:/A: lines by default;
a dialogue longer than the LLM's positions loses its oldest turns, and the answer says so), and
one unified embedding scores both pools under the evaluation's output rules.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from unimur.inference.embedder import ModelEmbedder
from unimur.inference.image_embeddings import model_widths
from unimur.inference.pools import find_model_embeddings, image_dir_pool, image_file, load_image_pool, read_texts
from unimur.inference.prompting import DEFAULT_PROMPT_STYLE, candidate_text
from unimur.inference.retriever import Retriever
from unimur.inference.rules import RET_MAX_TOKENS, response_rules
from unimur.model.model import UniMuR
from unimur.model.pretrained import read_model_config
from unimur.utils.distributed import default_device

logger = logging.getLogger(__name__)


def _model_dir_embeddings(model_dir: str | Path) -> str | None:
    """The one embedding file kept in the model folder (the seed README's layout), if any."""
    found = find_model_embeddings(model_dir)
    if found is not None:
        logger.info("image pool: %s (the embedding file in --model-dir; --images chooses another)", found)
    return str(found) if found is not None else None


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
    def open(cls, model_dir: str | Path, *, images: str | None = None, image_dir: str | None = None,
             texts: str | None = None, image_root: str | None = None, image_rule: str | None = None,
             image_threshold: float | None = None, text_ranking: str | None = None,
             ret_max_tokens: int = RET_MAX_TOKENS, prompt_style: str = DEFAULT_PROMPT_STYLE,
             max_context_tokens: int | None = None, device: str | None = None, batch_size: int = 64,
             cache_dir: str | None = None, allow_pickle: bool = False,
             skip_nonfinite_embeddings: bool = False) -> "Session":
        """Check the inputs, load the model, then the pools (texts are embedded once, here).

        The image pool is ``images`` (an embedding file), ``image_dir`` (embedded now, cached in
        ``cache_dir``), or with neither the one embedding file kept in ``model_dir``. Rules left
        None take the evaluation's defaults for the model's method (`unimur.inference.rules`)."""
        rule, ranking = response_rules(read_model_config(model_dir).method, image_rule, text_ranking,
                                       image_threshold)  # a wrong folder fails here
        text_pool = read_texts(texts) if texts else None
        images_file = images or (None if image_dir else _model_dir_embeddings(model_dir))
        if images_file and not Path(images_file).is_file():
            raise FileNotFoundError(f"image embedding file not found: {images_file}")
        if not (images_file or image_dir or text_pool):
            raise ValueError(f"no pool to retrieve from: {model_dir} holds no embedding file; give "
                             f"--images FILE, --image-dir DIR and/or --texts FILE")
        if ret_max_tokens < 1:
            raise ValueError(f"--ret-max-tokens must be >= 1, got {ret_max_tokens}")
        model = UniMuR.from_pretrained(model_dir, device=device or default_device())
        sha = json.loads((Path(model_dir) / "manifest.json").read_text())["weights_sha256"]
        if images_file:
            pool = load_image_pool(images_file, allow_pickle, sha, widths=model_widths(model),
                                   skip_nonfinite=skip_nonfinite_embeddings)
        elif image_dir:
            pool = image_dir_pool(ModelEmbedder(model, batch_size=batch_size, progress=True), image_dir, sha,
                                  cache_dir)
        else:
            pool = None
        # likelihood ranking scores the texts per dialogue: they are not embedded up front
        retriever = Retriever.from_model(model, pool, text_pool if ranking == "embedding" else None,
                                         batch_size=batch_size)
        prompt = retriever.embedder.prompt_builder(prompt_style, max_context_tokens)
        return cls(retriever, str(model_dir), images_file or image_dir, texts, rule, image_threshold, ranking,
                   image_root or image_dir, likelihood_texts=text_pool if ranking == "likelihood" else None,
                   ret_max_tokens=ret_max_tokens, prompt=prompt)

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
        read_as = [candidate_text(t, self.prompt.style) for t in self.likelihood_texts]
        sums, _ = self.retriever.embedder.text_log_likelihoods(list(pieces), read_as)
        order = torch.argsort(-sums, stable=True)[:k].tolist()
        return [(self.likelihood_texts[i], float(sums[i])) for i in order]
