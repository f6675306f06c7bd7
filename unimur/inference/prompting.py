"""How a dialogue is laid out for the LLM, and fitted to its positions.

Two prompt styles (``--prompt-style``), the same for every method so that a comparison differs
only in what each method does with the prompt:

* ``dialogue`` (default; FROMAGe's, ``demo/app.py`` line 85 and
  ``evals/eval_visdial_generation.py`` lines 214-218): each context turn on its own line after
  a speaker mark, ``Q: `` / ``A: `` alternating so that the response to predict is an ``A:``,
  images in their place inside their turn, the prompt ending in ``\\nA:``. A candidate response
  is read as the continuation after ``A:`` (with its leading space, so that its first word is
  tokenised as it is inside a sentence).
* ``flat``: every text piece and image of the context in order, with nothing between them, and
  candidates read as they are (the layout of this codebase before the dialogue style).

A context longer than the LLM's positions is fitted by dropping its oldest turns (whole turns,
images with their turn) until it fits with what must follow it (``[RET]``, the longest
candidate text, the generated tokens); :class:`PromptBuilder` counts with the model's tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from PIL import Image

PROMPT_STYLES = ("dialogue", "flat")
DEFAULT_PROMPT_STYLE = "dialogue"

# A context piece: text, a PIL image, or an image's W_cap input feature (1-D tensor).
Piece = Union[str, Image.Image, torch.Tensor]
Turn = Sequence[Piece]


def check_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r}: expected one of {PROMPT_STYLES}")
    return style


def speaker_marks(n_turns: int) -> list[str]:
    """``Q: `` / ``A: `` per context turn, alternating so that turn ``n_turns`` (the response)
    would be an ``A:``: the last context turn is always a ``Q:``."""
    return ["Q: " if (n_turns - j) % 2 == 1 else "A: " for j in range(n_turns)]


def layout(turns: Sequence[Turn], style: str = DEFAULT_PROMPT_STYLE) -> list[Piece]:
    """The context pieces of ``turns`` (each a list of pieces) in ``style``."""
    check_style(style)
    if style == "flat":
        return [p for turn in turns for p in turn if not (isinstance(p, str) and not p.strip())]
    pieces: list[Piece] = []
    for j, (mark, turn) in enumerate(zip(speaker_marks(len(turns)), turns)):
        head = ("\n" if j else "") + mark.rstrip()   # "Q:" / "\nA:"; a text adds " <text>"
        for p in turn:
            if isinstance(p, str):
                if p.strip():
                    pieces.append(f"{head} {p.strip()}" if head is not None else f" {p.strip()}")
                    head = None
            else:
                if head is not None:
                    pieces.append(head)
                    head = None
                pieces.append(p)
        if head is not None:  # a turn with nothing usable keeps its mark
            pieces.append(head)
    pieces.append("\nA:")
    return pieces


def candidate_text(text: str, style: str = DEFAULT_PROMPT_STYLE) -> str:
    """A candidate response as read after the prompt: after ``A:`` with its space (dialogue)."""
    return " " + text.strip() if check_style(style) == "dialogue" else text


@dataclass
class FittedPrompt:
    pieces: list[Piece]
    turns_dropped: int = 0     # oldest turns left out so that the prompt fits
    cut: bool = False          # True when turns were dropped (or, for a single huge turn, tokens)


@dataclass
class PromptBuilder:
    """Lays out a dialogue and fits it to ``max_tokens`` positions (None: no limit).

    ``count_text(s)``: tokens of one text piece; ``image_tokens``: positions per image;
    ``prefix_tokens``: what the model puts before the context (BOS).
    """

    style: str = DEFAULT_PROMPT_STYLE
    max_tokens: int | None = None
    count_text: Callable[[str], int] | None = None
    image_tokens: int = 1
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        check_style(self.style)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max context tokens must be >= 1, got {self.max_tokens}")

    def length(self, pieces: Sequence[Piece]) -> int:
        count = self.count_text or (lambda s: len(s.split()))
        return self.prefix_tokens + sum(count(p) if isinstance(p, str) else self.image_tokens for p in pieces)

    def candidate_tokens(self, texts: Sequence[str]) -> int:
        """Positions the longest candidate response takes after the prompt."""
        count = self.count_text or (lambda s: len(s.split()))
        return max((count(candidate_text(t, self.style)) for t in texts), default=0)

    def build(self, turns: Sequence[Turn], reserve: int = 1) -> FittedPrompt:
        """``turns`` laid out, dropping the oldest turns until the prompt plus ``reserve``
        positions (``[RET]``, a candidate, generated tokens) fit in ``max_tokens``. When even
        the last turn alone does not fit it is kept whole: the model then keeps the most recent
        positions (``UniMuR.encode_context``'s ``max_len``), and the prompt counts as cut."""
        turns = [list(t) for t in turns]
        pieces = layout(turns, self.style)
        if self.max_tokens is None:
            return FittedPrompt(pieces)
        budget = self.max_tokens - reserve
        dropped = 0
        while len(turns) - dropped > 1 and self.length(pieces) > budget:
            dropped += 1
            pieces = layout(turns[dropped:], self.style)
        return FittedPrompt(pieces, dropped, dropped > 0 or self.length(pieces) > budget)
