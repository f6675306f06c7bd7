"""Reader for the VisDial 1.0 format (SPEC section 5): raw JSON in, dialogues and queries out.

Layout expected under ``visdial_dir`` (the README's ``VisualDialog`` folder)::

    visdial_1.0_val.json
    visdial_1.0_val_dense_annotations.json          (optional)
    VisualDialog_val2018/VisualDialog_val2018_<image_id zero-padded to 12>.jpg

``visdial_1.0_val.json`` is ``{"split", "version", "data": {"questions": [str], "answers": [str],
"dialogs": [{"image_id": int, "caption": str, "dialog": [{"question": int, "answer": int,
"answer_options": [100 ints], "gt_index": int}, ...]}]}}``; questions and answers are indices into
the two string tables, and question strings carry no trailing ``?``.

This module only turns the JSON into :class:`VisDialDialog` objects and query strings; ranking and
metrics live in the shared retrieval code.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONTEXTS = ("rounds", "caption+rounds")


@dataclass
class VisDialDialog:
    """One dialogue: its image, caption and (question, answer) rounds as plain strings."""

    image_id: int
    image_path: Path
    caption: str
    rounds: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class VisDialDense:
    """One dense annotation: relevance of the 100 answer options of one (1-based) round."""

    image_id: int
    round_id: int
    relevance: list[float]


def visdial_paths(visdial_dir: str | Path, split: str = "val") -> tuple[Path, Path]:
    """(annotation JSON, image folder) for ``split`` under ``visdial_dir``."""
    root = Path(visdial_dir)
    return root / f"visdial_1.0_{split}.json", root / f"VisualDialog_{split}2018"


def visdial_image_path(visdial_dir: str | Path, image_id: int, split: str = "val") -> Path:
    """``VisualDialog_val2018/VisualDialog_val2018_000000185565.jpg`` for image 185565."""
    _, image_dir = visdial_paths(visdial_dir, split)
    return image_dir / f"VisualDialog_{split}2018_{int(image_id):012d}.jpg"


def _read_json(path: Path) -> Any:
    """Parse ``path``; a missing or malformed file fails with the path in the message."""
    if not path.is_file():
        raise FileNotFoundError(f"VisDial annotation file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: truncated or malformed JSON ({e})") from e


def _tables(data: Any, path: Path) -> tuple[list[str], list[str], list[Any]]:
    """The question table, answer table and dialog list, validated at the top level."""
    try:
        inner = data["data"]
        questions, answers, dialogs = inner["questions"], inner["answers"], inner["dialogs"]
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a VisDial 1.0 file (missing {e}); expected "
                         f"{{'data': {{'questions', 'answers', 'dialogs'}}}}") from e
    if not all(isinstance(x, list) for x in (questions, answers, dialogs)):
        raise ValueError(f"{path}: data.questions, data.answers and data.dialogs must be lists")
    return questions, answers, dialogs


def _index(table: list[str], value: Any) -> str | None:
    """``table[value]`` if ``value`` is a valid index (not a bool, not negative), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(table):
        return None
    return table[value]


def _parse_rounds(raw_rounds: Any, questions: list[str], answers: list[str],
                  skipped: Counter) -> list[tuple[str, str]] | None:
    """The dialogue's rounds as strings, or None if any round has a bad index.

    A round without an ``answer`` key (the real test split's last round) is dropped and counted;
    one bad index anywhere invalidates the whole dialogue, since its query would change meaning.
    """
    if not isinstance(raw_rounds, list):
        skipped["malformed_dialog"] += 1
        return None
    rounds: list[tuple[str, str]] = []
    bad = 0
    for r in raw_rounds:
        if not isinstance(r, dict) or "question" not in r:
            bad += 1
            continue
        if "answer" not in r:
            skipped["round_without_answer"] += 1
            continue
        q, a = _index(questions, r["question"]), _index(answers, r["answer"])
        if q is None or a is None:
            bad += 1
            continue
        rounds.append((q.strip().rstrip("?").strip(), a.strip().rstrip(".").strip()))
    if bad:
        skipped["bad_round_index"] += bad
        skipped["dialog_with_bad_round"] += 1
        return None
    return rounds


def load_visdial(visdial_dir: str | Path, split: str = "val"
                 ) -> tuple[list[VisDialDialog], Counter]:
    """Read ``visdial_1.0_<split>.json`` and keep dialogues whose image file exists.

    Returns the dialogues in file order and a Counter of what was skipped, by reason:
    ``missing_image`` (dialogues), ``malformed_dialog`` (dialogues without a usable image_id or
    dialog list), ``bad_round_index`` (rounds whose question/answer index is out of range),
    ``dialog_with_bad_round`` (dialogues dropped for them), ``round_without_answer`` (rounds).
    Raises FileNotFoundError / ValueError naming the file if it is missing, truncated or not
    VisDial, and ValueError if no dialogue survives.
    """
    json_path, _ = visdial_paths(visdial_dir, split)
    questions, answers, raw_dialogs = _tables(_read_json(json_path), json_path)
    dialogs: list[VisDialDialog] = []
    skipped: Counter = Counter()
    for raw in raw_dialogs:
        image_id = raw.get("image_id") if isinstance(raw, dict) else None
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            skipped["malformed_dialog"] += 1
            continue
        rounds = _parse_rounds(raw.get("dialog"), questions, answers, skipped)
        if rounds is None:
            continue
        image_path = visdial_image_path(visdial_dir, image_id, split)
        if not image_path.is_file():
            skipped["missing_image"] += 1
            continue
        caption = raw.get("caption") if isinstance(raw.get("caption"), str) else ""
        dialogs.append(VisDialDialog(image_id, image_path, caption.strip(), rounds))
    if skipped:
        logger.warning("VisDial %s: kept %d dialogues, skipped %s", json_path, len(dialogs),
                       dict(skipped))
    else:
        logger.info("VisDial %s: %d dialogues", json_path, len(dialogs))
    if not dialogs:
        raise ValueError(f"{json_path}: no usable dialogue (skipped: {dict(skipped)})")
    return dialogs, skipped


def build_visdial_query(dialog: VisDialDialog, context: str = "rounds", rounds: int = 10) -> str:
    """FROMAGe's query text: ``Q: <question>? A: <answer>.`` per round, joined by single spaces.

    ``context="caption+rounds"`` puts the caption (ending in a full stop) first; ``rounds`` keeps
    the first N rounds (FROMAGe used all 10).
    """
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    parts = [f"Q: {q}? A: {a}." for q, a in dialog.rounds[:rounds]]
    if context == "caption+rounds" and dialog.caption:
        caption = dialog.caption if dialog.caption[-1] in ".!?" else dialog.caption + "."
        parts.insert(0, caption)
    if not parts:
        raise ValueError(f"empty query for image {dialog.image_id} (context={context!r}, "
                         f"rounds={rounds})")
    return " ".join(parts)


def load_visdial_dense(path: str | Path) -> list[VisDialDense]:
    """Read dense annotations: a list of ``{"image_id", "round_id", "gt_relevance"}``.

    Train files name the scores ``relevance``; both are accepted. The list is aligned with the
    ``dialogs`` of the matching VisDial file (check ``image_id`` before relying on it). Malformed
    entries raise ValueError naming the file and the entry, since a partly read relevance table
    would silently change NDCG.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: dense annotations must be a JSON list")
    out: list[VisDialDense] = []
    for i, entry in enumerate(data):
        try:
            scores = entry["gt_relevance"] if "gt_relevance" in entry else entry["relevance"]
            item = VisDialDense(int(entry["image_id"]), int(entry["round_id"]),
                                [float(s) for s in scores])
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: malformed dense annotation #{i} ({e!r})") from e
        if item.round_id < 1:
            raise ValueError(f"{path}: entry #{i} has round_id {item.round_id}; it is 1-based")
        out.append(item)
    return out
