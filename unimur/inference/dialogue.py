"""A dialogue given by a person (command line, file or web page) as model context pieces.

A dialogue is a list of turns; a turn is a list of segments ``("text", str)`` or
``("image", ref)``, as :mod:`unimur.data.mmdialog` reads them. Files use MMDialog's turn format::

    {"conversation": [{"turn": [{"__TEXT__": "look at my cat"}, {"__MEDIA__": "cat.jpg"}]},
                      {"turn": [{"__TEXT__": "so cute! do you have another one?"}]}]}

(or just the list of turns; or a whole MMDialog ``conversations.json``, array or JSON Lines, with
``conversation_id`` choosing the dialogue). As in the MMDialog evaluation, the context is every
segment of every turn, in order. An image ``ref`` is an id of the image pool (its stored W_cap
input feature is used, exactly as the evaluation does), or else an image file: absolute, relative
to the dialogue file's folder, or MMDialog's ``<folder>/<media_key>.jpg``.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from unimur.data.mmdialog import Segment, parse_turn
from unimur.inference.image_embeddings import ImageEmbeddings
from unimur.utils.images import UnusableImage, load_rgb_image

logger = logging.getLogger(__name__)

Turn = list[Segment]


def read_dialogue(path: str | Path, conversation_id: int | str | None = None) -> list[Turn]:
    """The turns of the dialogue in ``path`` (formats in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dialogue file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e})") from e
    return parse_dialogue_json(text, conversation_id, source=str(path))


def parse_dialogue_json(text: str, conversation_id: int | str | None = None, source: str = "the dialogue"
                        ) -> list[Turn]:
    """Turns from JSON text: a dialogue object, a list of turns, a list of dialogues (JSON or JSON
    Lines, ``conversation_id`` choosing one), or a list of strings (one text turn each)."""
    try:  # one JSON value ...
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:  # ... or JSON Lines, one dialogue per line; split on "\n" only, as
        # the evaluation's reader does (str.splitlines also splits at U+2028 inside a string)
        items = [_json_line(line, n, source) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    except RecursionError as e:
        raise ValueError(f"{source}: JSON nested too deeply to read (not MMDialog's turn format)") from e
    if items and all(isinstance(t, str) for t in items):
        turns = [[("text", t.strip())] for t in items if t.strip()]
        if not turns:
            raise ValueError(f"{source}: the dialogue is empty")
        return turns
    if items and all(isinstance(t, dict) and "turn" in t for t in items):
        raw = {"conversation": items}                       # a bare list of turns
    else:
        raw = _choose(items, conversation_id, source)
    turns = [parse_turn(t, Counter()) for t in raw.get("conversation") or []]
    if not turns or any(t is None for t in turns):
        raise ValueError(f"{source}: not in MMDialog's turn format: expected {{\"conversation\": [{{\"turn\": "
                         f"[{{\"__TEXT__\": ...}} | {{\"__MEDIA__\": ...}}]}}, ...]}} or a list of such turns")
    return turns


def _json_line(line: str, lineno: int, source: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}:{lineno}: not JSON ({e.msg}); expected MMDialog's turn format") from e
    except RecursionError as e:
        raise ValueError(f"{source}:{lineno}: JSON nested too deeply to read (not MMDialog's turn format)") from e


def _choose(items: list[Any], conversation_id: int | str | None, path: str) -> dict[str, Any]:
    dialogues = [d for d in items if isinstance(d, dict) and "conversation" in d]
    if not dialogues:
        raise ValueError(f"{path}: no dialogue in MMDialog's turn format (a \"conversation\" list of turns)")
    if conversation_id is not None:
        match = [d for d in dialogues if str(d.get("conversation_id")) == str(conversation_id)]
        if not match:
            raise ValueError(f"{path}: no dialogue with conversation_id {conversation_id}")
        return match[0]
    if len(dialogues) > 1:
        raise ValueError(f"{path} holds {len(dialogues)} dialogues: choose one with --conversation-id")
    return dialogues[0]


def select_turns(turns: list[Turn], n: int | None) -> list[Turn]:
    """The first ``n`` turns (``n`` < 0: all but the last ``-n``, e.g. -1 leaves out the target turn)."""
    if n is None:
        return turns
    kept = turns[:n]
    if not kept:
        raise ValueError(f"--turns {n} leaves no turn of the dialogue's {len(turns)}")
    return kept


def to_turn_pieces(turns: Sequence[Turn], pool: ImageEmbeddings | None = None,
                   base_dir: str | Path | None = None) -> list[list]:
    """Each turn as context pieces (`unimur.inference.prompting` lays them out): text as ``str``, each
    image as the pool's W_cap input feature (a 1-D tensor) when ``ref`` is a pool id, else as a
    PIL image read from file."""
    rows = _pool_rows(pool)
    out: list[list] = []
    for t, turn in enumerate(turns, 1):
        pieces: list = []
        for kind, value in turn:
            if kind == "text":
                if value.strip():
                    pieces.append(value)
                continue
            row = rows.get(str(value))
            if row is not None:
                pieces.append(pool.cap_features[row])
            else:
                pieces.append(_image_from_file(str(value), base_dir, t))
        if pieces:
            out.append(pieces)
    if not out:
        raise ValueError("the dialogue is empty: give at least one turn with text or an image")
    return out


def to_pieces(turns: Sequence[Turn], pool: ImageEmbeddings | None = None,
              base_dir: str | Path | None = None) -> list:
    """Every turn's pieces in order (the ``flat`` prompt's context), see :func:`to_turn_pieces`."""
    return [p for turn in to_turn_pieces(turns, pool, base_dir) for p in turn]


def _pool_rows(pool: ImageEmbeddings | None) -> dict[str, int]:
    """Pool id -> row, also by file stem (MMDialog media keys against ids like ``<key>.jpg``),
    for pools that carry W_cap input features."""
    if pool is None or pool.cap_features is None:
        return {}
    rows = pool.position()
    for i, image_id in enumerate(pool.ids):
        rows.setdefault(Path(image_id).stem, i)
    return rows


def _image_from_file(ref: str, base_dir: str | Path | None, turn: int):
    base = Path(base_dir) if base_dir is not None else Path(".")
    candidates = [Path(ref)] if Path(ref).is_absolute() else [base / ref, Path(ref)]
    candidates.append(base / f"{ref}.jpg")  # MMDialog: media key -> <split>/<key>.jpg
    for path in candidates:
        if path.is_file():
            try:
                return load_rgb_image(path)
            except UnusableImage as e:
                raise ValueError(f"image {ref!r} in turn {turn}: {path} is unusable ({e})") from e
    raise ValueError(f"image {ref!r} in turn {turn}: not an id of the image pool and no such file "
                     f"({', '.join(str(p) for p in candidates)})")


def render(turns: Sequence[Turn]) -> list[str]:
    """One line per turn, images as ``[image: ref]``."""
    return [" ".join(v if k == "text" else f"[image: {Path(str(v)).name}]" for k, v in turn)
            for turn in turns]


def dump_dialogue(turns: Sequence[Turn]) -> str:
    """``turns`` in MMDialog's turn format (what :func:`read_dialogue` reads)."""
    rows = [json.dumps({"turn": [{"__TEXT__": v} if k == "text" else {"__MEDIA__": v} for k, v in turn]})
            for turn in turns]
    return '{"conversation": [\n  ' + ",\n  ".join(rows) + "\n]}\n"  # one turn per line
