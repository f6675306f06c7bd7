"""Reader for the MMDialog format (SPEC section 5): raw dialogues in, retrieval queries out.

Layout expected under ``mmdialog_dir``::

    <split>/conversations.json          one JSON array of dialogues, or JSON Lines (one per line)
    <split>/<media_key>.jpg             every image: dialogue turns and negative candidates

A dialogue is ``{"conversation_id": int, "conversation": [{"turn": [{"__TEXT__": str} |
{"__MEDIA__": str}, ...]}, ...], "negative_candidate_media_keys": [999 str],
"negative_candidate_texts": [999 str]}`` (negatives only in valid/test).

Each :class:`MMDialogQuery` is one retrieval problem (SPEC section 4): the context is every
element of the earlier turns, in order; the target turn's texts and images are the positives;
the pool is the positives plus the dialogue's negatives. Nothing is dropped silently: every
skipped dialogue, query or element is counted by reason in the returned Counter.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TARGETS = ("last", "every")
Segment = tuple[str, str]  # ("text", str) or ("image", media_key)


@dataclass
class MMDialogQuery:
    """One response-retrieval query: context segments, positives and per-dialogue negatives."""

    conversation_id: int
    turn_index: int  # index of the target turn in the conversation
    context: list[Segment]
    gt_texts: list[str] = field(default_factory=list)
    gt_media_keys: list[str] = field(default_factory=list)
    negative_texts: list[str] = field(default_factory=list)
    negative_media_keys: list[str] = field(default_factory=list)
    # the turn each context segment belongs to (empty: one turn), for the prompt's layout
    context_turns: list[int] = field(default_factory=list)

    def turns(self) -> list[list[Segment]]:
        """The context's segments grouped by turn, oldest first."""
        if not self.context_turns:
            return [list(self.context)]
        out: dict[int, list[Segment]] = {}
        for turn, segment in zip(self.context_turns, self.context):
            out.setdefault(turn, []).append(segment)
        return [out[t] for t in sorted(out)]


def media_path(mmdialog_dir: str | Path, split: str, key: str) -> Path:
    """Image file of ``key``: ``<mmdialog_dir>/<split>/<key>.jpg``."""
    return Path(mmdialog_dir) / split / f"{key}.jpg"


def conversations_path(mmdialog_dir: str | Path, split: str = "test") -> Path:
    return Path(mmdialog_dir) / split / "conversations.json"


# ----------------------------------------------------------------------------------------------
# Reading the container (JSON array or JSON Lines)
# ----------------------------------------------------------------------------------------------


def _first_char(path: Path) -> str:
    """First non-whitespace character of the file ('' if empty), read without loading it all."""
    with path.open("r", encoding="utf-8") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def _iter_json_lines(path: Path, skipped: Counter) -> Iterator[Any]:
    """One dialogue per non-empty line; a malformed line is counted and the rest still read."""
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
                skipped["malformed_json_line"] += 1
                logger.warning("%s:%d: malformed JSON line skipped (%s)", path, lineno,
                               "nested too deeply" if isinstance(e, RecursionError) else e)


# Characters read at a time from a JSON array; an element longer than this doubles the read.
_ARRAY_READ_CHARS = 1 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _ArrayText:
    """A sliding window over a JSON array file: only the undecoded tail is kept."""

    def __init__(self, f) -> None:
        self.f, self.buf, self.pos, self.eof = f, "", 0, False

    def more(self, chars: int) -> bool:
        """Append up to ``chars`` characters (dropping what was decoded); False at end of file."""
        chunk = self.f.read(chars)
        if not chunk:
            self.eof = True
            return False
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return True

    def next_char(self) -> str:
        """The next non-whitespace character ('' at end of file), not consumed."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more(_ARRAY_READ_CHARS):
                return self.buf[self.pos:self.pos + 1]


def _iter_json_array(path: Path) -> Iterator[Any]:
    """Elements of the top-level JSON array in ``path``, decoded one at a time.

    MMDialog's test split as one array is gigabytes of text (999 + 999 negatives per dialogue):
    ``json.load`` would hold all of it, parsed, at once. The standard library's
    ``JSONDecoder.raw_decode`` decodes one element from a window of the file, so only the
    element being read is in memory (no third-party streaming parser needed). A truncated or
    malformed array raises ValueError naming the file when the reader reaches the damage.
    """
    decoder = json.JSONDecoder()

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: truncated or malformed JSON array ({why})")

    with path.open("r", encoding="utf-8") as f:
        text = _ArrayText(f)
        if text.next_char() != "[":
            raise bad("it does not start with '['")
        text.pos += 1
        if text.next_char() == "]":
            text.pos += 1
        else:
            while True:
                text.next_char()
                chars = _ARRAY_READ_CHARS
                while True:
                    try:
                        value, end = decoder.raw_decode(text.buf, text.pos)
                    except RecursionError as e:  # where such an element ends is unknown: damage
                        raise bad("an element is nested too deeply to read") from e
                    except json.JSONDecodeError as e:
                        # an element cut by the window: read more (doubling, so a long element
                        # costs linear time) and decode again; at end of file it is damage
                        if not text.more(chars):
                            raise bad(str(e)) from e
                        chars *= 2
                        continue
                    # a number at the window's edge may go on ("12" of "123"): read on first
                    if end == len(text.buf) and not text.eof and text.more(chars):
                        continue
                    break
                text.pos = end
                yield value
                sep = text.next_char()
                if sep == "]":
                    text.pos += 1
                    break
                if sep != ",":
                    raise bad(f"expected ',' or ']' after element, found {sep or 'end of file'!r}")
                text.pos += 1
                if text.next_char() == "]":
                    raise bad("trailing comma")
        if text.next_char():
            raise bad("extra data after the array")


def read_dialogues(path: str | Path, skipped: Counter | None = None) -> Iterator[Any]:
    """Yield raw dialogues from ``path`` one at a time, detecting a JSON array versus JSON Lines.

    A file starting with ``[`` is one JSON array (a truncated or malformed one raises ValueError
    naming the file, since nothing after the damage can be trusted); anything else is read as
    JSON Lines. Either way only the dialogue being read is held in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMDialog conversations file not found: {path}")
    skipped = Counter() if skipped is None else skipped
    if _first_char(path) == "[":
        yield from _iter_json_array(path)
    else:
        yield from _iter_json_lines(path, skipped)


# ----------------------------------------------------------------------------------------------
# Turning dialogues into queries
# ----------------------------------------------------------------------------------------------


class _ImageCheck:
    """Cached ``media_path(...).is_file()``: negative keys repeat across dialogues. The cache is
    bounded (least recently used keys go first) so it does not grow with the split."""

    def __init__(self, mmdialog_dir: str | Path, split: str, enabled: bool,
                 max_items: int = 1_000_000) -> None:
        self.root, self.split, self.enabled, self.max_items = mmdialog_dir, split, enabled, max_items
        self._cache: OrderedDict[str, bool] = OrderedDict()

    def __call__(self, key: str) -> bool:
        if not self.enabled:
            return True
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = media_path(self.root, self.split, key).is_file()
            if len(self._cache) > self.max_items:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return found


def _parse_turn(turn: Any, skipped: Counter) -> list[Segment] | None:
    """A turn's elements as segments (empty texts dropped and counted); None if malformed."""
    elements = turn.get("turn") if isinstance(turn, dict) else None
    if not isinstance(elements, list):
        return None
    segments: list[Segment] = []
    for element in elements:
        if isinstance(element, dict) and isinstance(element.get("__TEXT__"), str):
            text = element["__TEXT__"].strip()
            if text:
                segments.append(("text", text))
            else:
                skipped["empty_text_element"] += 1
        elif isinstance(element, dict) and isinstance(element.get("__MEDIA__"), str | int):
            segments.append(("image", str(element["__MEDIA__"])))
        else:
            skipped["unknown_element"] += 1
    return segments


def parse_turn(turn: Any, skipped: Counter | None = None) -> list[Segment] | None:
    """A turn ``{"turn": [{"__TEXT__": ...} | {"__MEDIA__": ...}, ...]}`` as segments (empty texts
    dropped), or None if malformed; ``skipped`` counts dropped elements by reason."""
    return _parse_turn(turn, Counter() if skipped is None else skipped)


def _negatives(raw: dict[str, Any], has_image: _ImageCheck, skipped: Counter
               ) -> tuple[list[str], list[str]]:
    """The dialogue's negative texts and media keys; empty texts and missing images counted."""
    texts: list[str] = []
    for t in raw.get("negative_candidate_texts") or []:
        if isinstance(t, str) and t.strip():
            texts.append(t.strip())
        else:
            skipped["empty_negative_text"] += 1
    keys: list[str] = []
    for k in raw.get("negative_candidate_media_keys") or []:
        if has_image(str(k)):
            keys.append(str(k))
        else:
            skipped["missing_negative_image"] += 1
    return texts, keys


def _context(turns: list[list[Segment]], has_image: _ImageCheck, skipped: Counter
             ) -> tuple[list[Segment], list[int]]:
    """Every segment of ``turns`` in order, with its turn's index; images without a file are
    dropped and counted."""
    context: list[Segment] = []
    turn_of: list[int] = []
    for t, segments in enumerate(turns):
        for kind, value in segments:
            if kind == "image" and not has_image(value):
                skipped["missing_context_image"] += 1
                continue
            context.append((kind, value))
            turn_of.append(t)
    return context, turn_of


def _dialogue_queries(raw: Any, target: str, has_image: _ImageCheck, skipped: Counter
                      ) -> list[MMDialogQuery]:
    """All queries of one raw dialogue (one for ``last``, one per later turn for ``every``)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("conversation"), list):
        skipped["malformed_dialogue"] += 1
        return []
    turns = [_parse_turn(t, skipped) for t in raw["conversation"]]
    if any(t is None for t in turns):
        skipped["malformed_dialogue"] += 1
        return []
    if len(turns) < 2:
        skipped["too_few_turns"] += 1
        return []
    conversation_id = raw.get("conversation_id")
    try:
        conversation_id = int(conversation_id)
    except (TypeError, ValueError):
        skipped["malformed_dialogue"] += 1
        return []
    neg_texts, neg_keys = _negatives(raw, has_image, skipped)
    target_turns = [len(turns) - 1] if target == "last" else range(1, len(turns))
    queries = []
    for t in target_turns:
        gt = turns[t]
        if not gt:
            skipped["empty_target_turn"] += 1
            continue
        # an element repeated in the target turn is one answer: scored twice it would weigh twice
        gt_texts = _distinct([v for kind, v in gt if kind == "text"], "duplicate_gt_text", skipped)
        gt_keys = _distinct([v for kind, v in gt if kind == "image"], "duplicate_gt_image", skipped)
        if not all(has_image(k) for k in gt_keys):
            skipped["missing_target_image"] += 1
            continue
        context, turn_of = _context(turns[:t], has_image, skipped)
        if not context:
            skipped["empty_context"] += 1
            continue
        queries.append(MMDialogQuery(conversation_id, t, context,
                                     gt_texts=gt_texts, gt_media_keys=gt_keys, negative_texts=neg_texts,
                                     negative_media_keys=neg_keys, context_turns=turn_of))
    return queries


def _distinct(values: list[str], reason: str, skipped: Counter) -> list[str]:
    """``values`` in order, each once; the repeats are counted under ``reason``."""
    kept = list(dict.fromkeys(values))
    if len(kept) < len(values):
        skipped[reason] += len(values) - len(kept)
    return kept


class MMDialogStream:
    """The queries of ``<mmdialog_dir>/<split>/conversations.json``, yielded as the file is read.

    Only the dialogue being read (and the queries the consumer keeps) is in memory, whatever the
    split's size: the evaluation consumes it chunk by chunk. ``skipped`` counts what the reader
    dropped so far, by reason (see :func:`load_mmdialog`); ``n_dialogues`` / ``n_queries`` what
    it read. Each iteration reads the file again from the start (the counts restart too). At the
    end of an iteration a file that gave no usable query raises ValueError naming it.
    """

    def __init__(self, mmdialog_dir: str | Path, split: str = "test", target: str = "last",
                 check_images: bool = True) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.mmdialog_dir, self.split, self.target = mmdialog_dir, split, target
        self.check_images = check_images
        self.path = conversations_path(mmdialog_dir, split)
        if not self.path.is_file():
            raise FileNotFoundError(f"MMDialog conversations file not found: {self.path}")
        self.skipped: Counter = Counter()
        self.n_dialogues = self.n_queries = 0

    def _read(self) -> Iterator[MMDialogQuery]:
        self.skipped.clear()  # the same Counter object: callers may hold it
        self.n_dialogues = self.n_queries = 0
        has_image = _ImageCheck(self.mmdialog_dir, self.split, self.check_images)
        seen_ids: set[int] = set()  # one int per dialogue: small next to the dialogues themselves
        for raw in read_dialogues(self.path, self.skipped):
            self.n_dialogues += 1
            queries = _dialogue_queries(raw, self.target, has_image, self.skipped)
            if queries and queries[0].conversation_id in seen_ids:
                # listed twice: scored twice it would weigh twice in every mean
                self.skipped["duplicate_dialogue"] += 1
                logger.warning("%s: conversation_id %d listed again; scored once", self.path,
                               queries[0].conversation_id)
                continue
            if queries:
                seen_ids.add(queries[0].conversation_id)
            for query in queries:
                self.n_queries += 1
                yield query

    def __iter__(self) -> Iterator[MMDialogQuery]:
        yield from self._read()
        self._check_end()

    def first_query(self) -> MMDialogQuery:
        """Read until the first usable query (a quick check of the file before a long run);
        raises like a full read if there is none."""
        for query in self._read():
            return query
        self._check_end()
        raise AssertionError("unreachable: _check_end raises when there is no query")

    def _check_end(self) -> None:
        skipped, path = self.skipped, self.path
        if self.n_dialogues == 0 and skipped["malformed_json_line"]:
            raise ValueError(f"{path}: no line parses as JSON ({skipped['malformed_json_line']} "
                             f"malformed lines); is it a truncated JSON array?")
        if not self.n_queries:
            raise ValueError(f"{path}: no usable query in {self.n_dialogues} dialogues "
                             f"(skipped: {dict(skipped)})")
        if skipped:
            logger.warning("MMDialog %s: %d queries from %d dialogues, skipped %s", path,
                           self.n_queries, self.n_dialogues, dict(skipped))
        else:
            logger.info("MMDialog %s: %d queries from %d dialogues", path, self.n_queries,
                        self.n_dialogues)


def load_mmdialog(mmdialog_dir: str | Path, split: str = "test", target: str = "last",
                  check_images: bool = True) -> tuple[list[MMDialogQuery], Counter]:
    """Read ``<mmdialog_dir>/<split>/conversations.json`` into a list of retrieval queries
    (all in memory: for a whole test split iterate a :class:`MMDialogStream` instead).

    ``target="last"`` makes one query per dialogue (its last turn; the paper's setting);
    ``"every"`` one per turn after the first. ``check_images=False`` skips the file existence
    checks (faster on a slow file system, for callers that check later).

    The Counter counts, by reason: ``too_few_turns``, ``malformed_dialogue``,
    ``duplicate_dialogue`` (a ``conversation_id`` seen before: only its first listing is read)
    (dialogues); ``empty_target_turn``, ``missing_target_image``, ``empty_context`` (queries);
    ``empty_text_element``, ``unknown_element``, ``missing_context_image``,
    ``missing_negative_image``, ``empty_negative_text``, ``duplicate_gt_text``,
    ``duplicate_gt_image`` (a ground-truth element repeated in the target turn: kept once)
    (dropped elements);
    ``malformed_json_line`` (JSON Lines only). Context images that are missing are dropped
    from the context (counted once per query that would have used them), while a missing
    target image drops the query: without it the query has a positive that cannot be scored.
    Raises FileNotFoundError / ValueError naming the file if it is missing, a truncated JSON
    array, or yields no usable query.
    """
    stream = MMDialogStream(mmdialog_dir, split, target, check_images)
    queries = list(stream)
    return queries, Counter(stream.skipped)
