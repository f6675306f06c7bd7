"""Procedural synthetic captioned images, written in the real CC3M / VisDial / MMDialog formats.

No captioned image set and no CLIP weights can be downloaded where this project is tested (SPEC
section 6), so the whole pipeline (training, VisDial and MMDialog evaluation) is exercised on data
drawn here: one to three coloured shapes on a plain background, with compositional captions:
short noun phrases ("a red star above a green circle") and, for half of them, several-sentence
descriptions ("the picture shows two shapes. the star is red. ...").

A seed-determined set of (colour, shape) pairs is *held out*: it never appears in the training
split, but does appear in the validation split and the two dialogue benchmarks, so retrieval of an
unseen combination of seen words measures composition rather than memorisation. The VisDial and
MMDialog texts use wordings ("in the middle", "big", "what color is ...") that the training
captions do not, to measure robustness to unseen phrasing.

Usage::

    python -m unimur.synthetic --out data/synth --seed 0
    python -m unimur.synthetic --out /tmp/tiny --seed 1 --n-train 50 --n-val 10 \\
        --n-visdial 8 --n-mmdialog 8 --image-size 32 --n-negatives 20

Output layout (``DIR`` = ``--out``)::

    DIR/meta.json                                   held-out pairs and per-item attributes
    DIR/dataset/cc3m_train.tsv, cc3m_val.tsv        caption<TAB>image, image relative to DIR/images
    DIR/images/train_000000.jpg ...
    DIR/VisualDialog/visdial_1.0_val.json
    DIR/VisualDialog/visdial_1.0_val_dense_annotations.json
    DIR/VisualDialog/VisualDialog_val2018/VisualDialog_val2018_<12-digit image_id>.jpg
    DIR/MMDialog/test/conversations.json            one JSON array
    DIR/MMDialog/test/<media_key>.jpg               dialogue images and the shared negative pool

The same seed and sizes always give byte-identical files: every random draw comes from a numpy
Generator seeded by (seed, stream name), never from a global RNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "pink": (250, 130, 190),
    "brown": (125, 75, 30),
}
# Background colours are disjoint from object colours, so "a white circle" never means the
# background and a colour word always names exactly one object.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
}
SIZES: dict[str, float] = {"small": 0.09, "large": 0.14}  # radius as a fraction of the side
# Centres as fractions of the side. left/center/right share a row and top/center/bottom a
# column, which is what makes "to the left of" / "above" well defined (see _relation).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.22, 0.5),
    "right": (0.78, 0.5),
    "top": (0.5, 0.22),
    "bottom": (0.5, 0.78),
    "center": (0.5, 0.5),
}
# Caption wording (training style) versus dialogue wording (evaluation style).
CAPTION_POSITION = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
DIALOGUE_POSITION = {"left": "on the left side", "right": "on the right side",
                     "top": "near the top", "bottom": "near the bottom", "center": "in the middle"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
DESCRIBED_FRACTION = 0.5  # share of CC3M captions that are several-sentence descriptions
# Uninformative sentences of such descriptions (none is a VisDial answer or question).
FILLER_SENTENCES = ("flat vector illustration", "clip art style", "nothing else is in the picture",
                    "the picture has no writing", "a simple computer drawing")
EMOJI = (":smile:", ":wave:", ":heart_eyes:", ":thumbsup:", ":joy:", ":pray:", ":sunny:")

Pair = tuple[str, str]  # (colour, shape)

# Bumped whenever the same seed and sizes would draw different data, so that a saved dataset
# (the demo reuses its own) is known to be stale. 2: several-sentence training descriptions.
GENERATOR_VERSION = 2

DEFAULT_SIZES: dict[str, Any] = {
    "n_train": 2000,
    "n_val": 200,
    "n_visdial": 100,
    "n_mmdialog": 100,
    "image_size": 64,
    "n_negatives": 999,
    "n_heldout": 6,
    "heldout_frac": 0.5,
}


@dataclass(frozen=True)
class Obj:
    """One drawn object."""

    colour: str
    shape: str
    size: str
    position: str

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)

    def to_meta(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "size": self.size,
                "position": self.position}


@dataclass(frozen=True)
class Scene:
    """A background colour plus one to three objects with distinct colours, shapes, positions."""

    background: str
    objects: tuple[Obj, ...]

    def to_meta(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_meta() for o in self.objects]}


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per output stream, so e.g. changing ``n_val`` leaves train alone."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode("utf-8"))])


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4  # draw at 4x then downscale: cheap anti-aliasing, still deterministic


def _regular_polygon(cx: float, cy: float, radii: Sequence[float], start_deg: float
                     ) -> list[tuple[float, float]]:
    """Vertices evenly spaced in angle; ``radii`` cycles (two radii make a star)."""
    n = len(radii)
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return [(cx + r * float(np.cos(a)), cy + r * float(np.sin(a)))
            for r, a in zip(radii, angles, strict=True)]


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        h = 0.85 * r  # roughly the circle's area, so "large" means the same for every shape
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, [1.15 * r] * 3, -90.0), fill=fill)
    elif obj.shape == "star":
        draw.polygon(_regular_polygon(cx, cy, [1.1 * r, 0.45 * r] * 5, -90.0), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)],
                     fill=fill)
    elif obj.shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, [r] * 6, 0.0), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {obj.shape!r}")


def draw_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` as an RGB image of ``image_size`` pixels; ``rng`` jitters the centres."""
    side = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        jitter = rng.uniform(-0.02, 0.02, size=2)
        _draw_object(draw, obj, (fx + jitter[0]) * side, (fy + jitter[1]) * side,
                     SIZES[obj.size] * side)
    return img.reduce(_SUPERSAMPLE)  # box-average each 4x4 block: fast and exact


def _save_jpeg(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)


# ----------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------


def all_pairs() -> list[Pair]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def choose_heldout_pairs(seed: int, n_heldout: int) -> list[Pair]:
    """A seed-determined partial matching of colours to shapes.

    A matching (each colour and each shape in at most one held-out pair) keeps every colour and
    every shape present in training with other partners, so held-out pairs are new combinations
    of known words, never unknown words.
    """
    limit = min(len(COLOURS), len(SHAPES))
    if not 0 <= n_heldout <= limit:
        raise ValueError(f"n_heldout must be in [0, {limit}], got {n_heldout}")
    rng = _rng(seed, "heldout")
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    return sorted(zip(colours[:n_heldout], shapes[:n_heldout], strict=True))


def sample_scene(rng: np.random.Generator, allowed: Sequence[Pair],
                 forced: Pair | None = None) -> Scene:
    """One to three objects with distinct colours, shapes and positions.

    ``forced`` (if given) is the first object's pair, even if it is not in ``allowed``; the other
    objects only use ``allowed`` pairs.
    """
    n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    positions = [list(POSITIONS)[i] for i in rng.permutation(len(POSITIONS))[:n_objects]]
    pairs: list[Pair] = [forced] if forced is not None else []
    while len(pairs) < n_objects:
        used_c = {c for c, _ in pairs}
        used_s = {s for _, s in pairs}
        free = [p for p in allowed if p[0] not in used_c and p[1] not in used_s]
        if not free:  # cannot happen with the vocabulary above, but never loop forever
            break
        pairs.append(_pick(rng, free))
    objects = tuple(Obj(c, s, _pick(rng, list(SIZES)), pos)
                    for (c, s), pos in zip(pairs, positions[:len(pairs)], strict=True))
    return Scene(background=_pick(rng, list(BACKGROUNDS)), objects=objects)


def _eval_scene(rng: np.random.Generator, seen: Sequence[Pair], heldout: Sequence[Pair],
                heldout_frac: float) -> tuple[Scene, bool]:
    """An evaluation scene whose first object is a held-out pair with probability heldout_frac."""
    use_heldout = bool(heldout) and bool(rng.random() < heldout_frac)
    forced = _pick(rng, heldout) if use_heldout else _pick(rng, seen)
    return sample_scene(rng, seen, forced=forced), use_heldout


# ----------------------------------------------------------------------------------------------
# Language
# ----------------------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    """Prefix the right indefinite article ("an orange star", "a large orange star")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _np(obj: Obj, with_size: bool) -> str:
    """'a large red circle' / 'a red circle'. Colour always directly precedes shape, which is
    what the held-out check in the tests relies on."""
    core = f"{obj.colour} {obj.shape}"
    return _a(f"{obj.size} {core}" if with_size else core)


def _relation(o1: Obj, o2: Obj) -> str | None:
    """Spatial relation of o1 to o2 when they share a row or a column, else None."""
    (x1, y1), (x2, y2) = POSITIONS[o1.position], POSITIONS[o2.position]
    if y1 == y2:
        return "to the left of" if x1 < x2 else "to the right of"
    if x1 == x2:
        return "above" if y1 < y2 else "below"
    return None


def described_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A longer, several-sentence CC3M-style description, sentences in random order:
    "flat vector illustration. the star is brown and large, at the top. two shapes on a gray
    background. the small triangle is blue."

    It names each object's colour apart from its shape and mixes in uninformative sentences,
    as real captions do. Without such captions every training context is one short noun
    phrase, and the unified embedding of any longer text (a 10-round VisDial dialogue)
    collapses onto one shared direction: measured in the demo, a mean cosine of 0.8 between
    dialogue embeddings, against 0.17 between caption embeddings. The dialogue form itself
    ("Q: ...? A: ...") never appears in training."""
    objs, bg = scene.objects, scene.background
    count = "one shape" if len(objs) == 1 else f"{NUMBER_WORDS[len(objs)]} shapes"
    sentences = [_pick(rng, [f"{count} on {_a(bg)} background", f"{_a(bg)} picture with {count}",
                             f"the picture shows {count}"])]
    for o in objs:
        sentences.append(_pick(rng, [
            f"the {o.shape} is {o.colour} and {o.size}, {CAPTION_POSITION[o.position]}",
            f"the {o.shape} {CAPTION_POSITION[o.position]} is {o.colour}",
            f"the {o.size} {o.shape} is {o.colour}",
        ]))
    n_filler = int(rng.integers(0, 3))
    sentences += [FILLER_SENTENCES[int(i)] for i in rng.permutation(len(FILLER_SENTENCES))[:n_filler]]
    return ". ".join(sentences[int(i)] for i in rng.permutation(len(sentences)))


def caption_for(scene: Scene, rng: np.random.Generator) -> str:
    """A training-style (CC3M) caption: a short noun phrase (several templates per object count)
    or, with probability DESCRIBED_FRACTION, a several-sentence description."""
    if rng.random() < DESCRIBED_FRACTION:
        return described_caption(scene, rng)
    objs, bg = scene.objects, scene.background
    size = bool(rng.random() < 0.5)
    if len(objs) == 1:
        o = objs[0]
        templates = [
            f"{_np(o, True)}",
            f"{_np(o, size)} {CAPTION_POSITION[o.position]}",
            f"{_np(o, size)} on {_a(bg)} background",
            f"a picture of {_np(o, size)} {CAPTION_POSITION[o.position]}",
            f"a drawing of {_np(o, True)} on {_a(bg)} background",
        ]
    elif len(objs) == 2:
        o1, o2 = objs
        rel = _relation(o1, o2)
        templates = [
            f"{_np(o1, size)} {CAPTION_POSITION[o1.position]} and "
            f"{_np(o2, size)} {CAPTION_POSITION[o2.position]}",
            f"{_np(o1, size)} and {_np(o2, size)} on {_a(bg)} background",
            f"two shapes: {_np(o1, True)} and {_np(o2, True)}",
        ]
        if rel is not None:
            templates.append(f"{_np(o1, size)} {rel} {_np(o2, size)}")
    else:
        o1, o2, o3 = objs
        templates = [
            f"{_np(o1, size)}, {_np(o2, size)} and {_np(o3, size)}",
            f"three shapes on {_a(bg)} background: {_np(o1, False)}, {_np(o2, False)} "
            f"and {_np(o3, False)}",
            f"{_np(o1, False)} {CAPTION_POSITION[o1.position]}, {_np(o2, False)} "
            f"{CAPTION_POSITION[o2.position]} and {_np(o3, False)} {CAPTION_POSITION[o3.position]}",
        ]
    return _pick(rng, templates)


def dialogue_caption_for(scene: Scene, rng: np.random.Generator) -> str:
    """A VisDial caption: COCO-like, only partly descriptive, worded unlike the training set."""
    objs, o = scene.objects, scene.objects[0]
    if len(objs) == 1:
        templates = [f"a simple drawing of {_a(o.shape)}",
                     f"there is {_a(o.colour)} {o.shape} {DIALOGUE_POSITION[o.position]}"]
    else:
        others = len(objs) - 1
        templates = [f"a drawing with {NUMBER_WORDS[len(objs)]} shapes on {_a(scene.background)} "
                     f"background",
                     f"{_a(o.colour)} {o.shape} next to {NUMBER_WORDS[others]} other "
                     f"shape{'s' if others > 1 else ''}"]
    return _pick(rng, templates)


def visdial_rounds(scene: Scene, rng: np.random.Generator, n_rounds: int = 10
                   ) -> list[tuple[str, str]]:
    """``n_rounds`` (question, answer) pairs about ``scene``, in VisDial style (no '?')."""
    objs = scene.objects
    n = len(objs)
    # Always ask the count, each object's colour and its place: enough to identify the image.
    required: list[tuple[str, str]] = [(
        _pick(rng, ["how many objects are there", "how many shapes can you see"]),
        "just one" if n == 1 else NUMBER_WORDS[n])]
    for o in objs:
        required.append((f"what color is the {o.shape}",
                         _pick(rng, [f"it is {o.colour}", o.colour, f"it's {o.colour}"])))
        required.append((f"where is the {o.shape}", DIALOGUE_POSITION[o.position]))
    optional: list[tuple[str, str]] = []
    for o in objs:
        optional.append((f"is the {o.shape} big",
                         "yes, it is big" if o.size == "large" else "no, it is small"))
        optional.append((f"what shape is the {o.colour} one", _a(o.shape)))
        other = _pick(rng, [p for p in POSITIONS if p != o.position])
        asked = _pick(rng, [o.position, other])
        optional.append((f"is the {o.shape} {DIALOGUE_POSITION[asked]}",
                         "yes" if asked == o.position else f"no, {DIALOGUE_POSITION[o.position]}"))
    present = {o.shape for o in objs}
    for shape in SHAPES:
        optional.append((f"is there {_a(shape)}",
                         "yes, there is one" if shape in present else "no"))
    optional += [
        ("what color is the background",
         _pick(rng, [scene.background, f"it is {scene.background}"])),
        ("is this a photo", "no, it is a drawing"),
        ("are there any people", "no"),
        ("is there any text", "no text"),
        ("is it daytime", "i can't tell"),
    ]
    chosen = list(required[:n_rounds])
    for i in rng.permutation(len(optional))[: max(0, n_rounds - len(chosen))]:
        chosen.append(optional[int(i)])
    order = rng.permutation(len(chosen))
    return [chosen[int(i)] for i in order]


# Distractor answers guarantee 100 distinct answer options per round however small the set is.
_DISTRACTOR_ANSWERS: list[str] = (
    ["yes", "no", "maybe", "not sure", "i think so", "i don't think so", "one", "two", "three",
     "four", "five", "many", "none", "i can't tell", "yes, it is", "no, it isn't"]
    + [f"it is {c}" for c in COLOURS] + list(COLOURS) + [f"it's {c}" for c in COLOURS]
    + [f"it is {b}" for b in BACKGROUNDS] + list(BACKGROUNDS)
    + [_a(s) for s in SHAPES] + [f"it is {_a(s)}" for s in SHAPES]
    + list(DIALOGUE_POSITION.values()) + [f"no, {p}" for p in DIALOGUE_POSITION.values()]
    + ["yes, it is big", "no, it is small", "yes, there is one", "no, it is a drawing",
       "no text", "just one", "it is a photo", "a little", "very big", "quite small",
       "i don't know", "hard to say", "it is dark", "it is bright", "yes, very", "not at all"]
    + [f"i think it is {c}" for c in COLOURS] + [f"probably {_a(s)}" for s in SHAPES]
    + [f"yes, {p}" for p in DIALOGUE_POSITION.values()] + [f"there are {w}" for w in
                                                            ("two", "three", "four", "many")]
)


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=True), encoding="utf-8")


def _write_cc3m_split(out: Path, split: str, n: int, seed: int, image_size: int,
                      seen: Sequence[Pair], heldout: Sequence[Pair], heldout_frac: float
                      ) -> list[dict[str, Any]]:
    """Draw one CC3M-format split; training only uses seen pairs."""
    rng = _rng(seed, f"cc3m_{split}")
    rows, meta = ["caption\timage"], []
    for i in range(n):
        if split == "train":
            scene, is_heldout = sample_scene(rng, seen), False
        else:
            scene, is_heldout = _eval_scene(rng, seen, heldout, heldout_frac)
        name = f"{split}_{i:06d}.jpg"
        caption = caption_for(scene, rng)
        _save_jpeg(draw_scene(scene, image_size, rng), out / "images" / name)
        rows.append(f"{caption}\t{name}")
        meta.append({"image": name, "caption": caption, "heldout": is_heldout, **scene.to_meta()})
    tsv = out / "dataset" / f"cc3m_{split}.tsv"
    tsv.parent.mkdir(parents=True, exist_ok=True)
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return meta


def visdial_image_name(image_id: int, split: str = "val") -> str:
    """``VisualDialog_val2018_000000185565.jpg``: the real file naming."""
    return f"VisualDialog_{split}2018_{image_id:012d}.jpg"


def _write_visdial(out: Path, n: int, seed: int, image_size: int, seen: Sequence[Pair],
                   heldout: Sequence[Pair], heldout_frac: float) -> list[dict[str, Any]]:
    """VisDial 1.0 val: 10 rounds per dialogue, 100 answer options with the truth at gt_index."""
    rng = _rng(seed, "visdial")
    root = out / "VisualDialog"
    image_ids = sorted(int(x) + 100_000 for x in rng.choice(900_000, size=n, replace=False))
    questions: dict[str, int] = {}
    answers: dict[str, int] = {}

    def index(table: dict[str, int], text: str) -> int:
        return table.setdefault(text, len(table))

    raw, meta = [], []
    for image_id in image_ids:
        scene, is_heldout = _eval_scene(rng, seen, heldout, heldout_frac)
        _save_jpeg(draw_scene(scene, image_size, rng),
                   root / "VisualDialog_val2018" / visdial_image_name(image_id))
        rounds = visdial_rounds(scene, rng)
        raw.append((image_id, dialogue_caption_for(scene, rng),
                    [(index(questions, q), index(answers, a)) for q, a in rounds]))
        meta.append({"image_id": image_id, "heldout": is_heldout, **scene.to_meta()})
    for text in _DISTRACTOR_ANSWERS:
        index(answers, text)
    n_answers = len(answers)
    if n_answers < 100:  # pragma: no cover - the distractor list alone has more than 100
        raise RuntimeError("answer pool smaller than the 100 options VisDial needs")

    dialogs, dense = [], []
    for image_id, caption, qa in raw:
        dialog = []
        for q_idx, a_idx in qa:
            others = rng.choice(n_answers - 1, size=99, replace=False)
            others = [int(o) + int(o >= a_idx) for o in others]  # skip the true answer's index
            gt_index = int(rng.integers(100))
            options = others[:gt_index] + [a_idx] + others[gt_index:]
            dialog.append({"question": q_idx, "answer": a_idx, "answer_options": options,
                           "gt_index": gt_index})
        dialogs.append({"image_id": image_id, "caption": caption, "dialog": dialog})
        # Dense annotations score one round per dialogue, like the real val file.
        round_id = int(rng.integers(1, len(dialog) + 1))
        gt = dialog[round_id - 1]["gt_index"]
        dense.append({"image_id": image_id, "round_id": round_id,
                      "gt_relevance": [1.0 if k == gt else 0.0 for k in range(100)]})
    _write_json(root / "visdial_1.0_val.json", {
        "split": "val2018", "version": "1.0",
        "data": {"questions": list(questions), "answers": list(answers), "dialogs": dialogs}})
    _write_json(root / "visdial_1.0_val_dense_annotations.json", dense)
    return meta


def _media_keys(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """Unique signed 19-digit integers as strings, like MMDialog's ``-1000012098956892692``."""
    keys: list[str] = []
    while len(keys) < n:
        value = int(rng.integers(10**18, 2**63 - 1, dtype=np.int64))
        key = str(-value if rng.random() < 0.5 else value)
        if key not in taken:
            taken.add(key)
            keys.append(key)
    return keys


# Response templates shared by targets and negative texts, so the wording alone never gives the
# target away: "{np}" is "a red circle", "{shape}"/"{colour}" fill the two answer forms.
_NP_RESPONSES = ("here is {np}", "here is {np} :smile:", "sure, {np} for you", "this one has {np}",
                 "look, {np}", "i found {np}", "how about {np}", "maybe {np} will do",
                 "i have {np} here", "check out {np} :thumbsup:")
_ANSWER_RESPONSES = ("the {shape} is {colour}", "that {shape} looks {colour} to me")
_CHITCHAT = ("haha that's funny :joy:", "i love it", "good morning :sunny:", "see you later",
             "thanks a lot :pray:", "that is so cool", "not today, sorry", "what do you think",
             "i like drawing", "nice to meet you", "have a great day :smile:", "really?",
             "let me check", "sounds good :thumbsup:", "i am not sure", "maybe tomorrow",
             "that's amazing :heart_eyes:", "hello there :wave:", "no worries", "ok")


def _text_pool() -> tuple[list[str], list[Pair | None]]:
    """Every candidate response text with the (colour, shape) pair it names (None: none)."""
    texts: list[str] = []
    pairs: list[Pair | None] = []
    for colour, shape in all_pairs():
        for template in _NP_RESPONSES:
            for size in ("", "small ", "large "):
                texts.append(template.format(np=_a(f"{size}{colour} {shape}")))
                pairs.append((colour, shape))
        for template in _ANSWER_RESPONSES:
            texts.append(template.format(shape=shape, colour=colour))
            pairs.append((colour, shape))
    texts += list(_CHITCHAT)
    pairs += [None] * len(_CHITCHAT)
    return texts, pairs


@dataclass(frozen=True)
class AttributeLabels:
    """What each synthetic MMDialog image shows and each candidate text names, as (colour,
    shape) pairs: the ground truth of the attribute consistency (evaluation, SPEC section 4)."""

    media: dict[str, frozenset]
    texts: dict[str, tuple[str, str] | None]

    def image(self, key: str) -> frozenset:
        return self.media.get(key, frozenset())

    def text(self, text: str) -> tuple[str, str] | None:
        return self.texts.get(text)


def mmdialog_attribute_labels(meta_path: str | Path) -> AttributeLabels:
    """Labels of a synthetic set from its ``meta.json`` (written by :func:`generate`)."""
    meta = json.loads(Path(meta_path).read_text())
    media = {key: frozenset((o["colour"], o["shape"]) for o in m["objects"])
             for key, m in meta["splits"]["mmdialog"]["media"].items()}
    texts, pairs = _text_pool()
    return AttributeLabels(media, dict(zip(texts, pairs)))


def max_negatives() -> int:
    """Largest ``n_negatives`` the text pool supports once a target pair is excluded.

    Chit-chat texts are not counted either: a dialogue's own turns may use some of them.
    """
    texts, pairs = _text_pool()
    worst = max(sum(p == q for p in pairs) for q in all_pairs())
    return len(texts) - worst - len(_CHITCHAT)


def _opening_turns(rng: np.random.Generator) -> list[list[dict[str, str]]]:
    """Zero or two chit-chat turns (user, then system)."""
    if rng.random() < 0.5:
        return []
    return [[{"__TEXT__": _pick(rng, ["hi there :wave:", "hello! how are you",
                                       "good morning :sunny:", "hey, can you help me"])}],
            [{"__TEXT__": _pick(rng, ["hi! i am fine, thanks :smile:", "hello, nice to meet you",
                                       "of course, what do you need"])}]]


def _make_dialogue(rng: np.random.Generator, pair: Pair, new_image: Callable[[Pair], str]
                   ) -> tuple[list[list[dict[str, str]]], str]:
    """Turns of one dialogue whose last turn is answerable from its context.

    ``new_image(pair)`` draws an image whose first object is ``pair`` and returns its media key.
    Three scenarios: *request* (asked by name; target image, with or without text), *describe*
    (user shows an image and asks its colour; text-only target), *another* (user shows an image
    and asks for one like it; target image, with or without text).
    """
    colour, shape = pair
    np_ = _a(f"{colour} {shape}")
    turns = _opening_turns(rng)
    scenario = _pick(rng, ["request", "describe", "another"])
    if scenario == "request":
        turns.append([{"__TEXT__": _pick(rng, [f"can you show me {np_}",
                                                f"do you have a picture of {np_}",
                                                f"i would like to see {np_} please",
                                                f"send me {np_} :pray:"])}])
    elif scenario == "describe":
        turns.append([{"__MEDIA__": new_image(pair)},
                      {"__TEXT__": _pick(rng, [f"what color is the {shape} in this picture",
                                                f"which color does my {shape} have"])}])
    else:
        turns.append([{"__TEXT__": f"look at my {colour} {shape} :heart_eyes:"},
                      {"__MEDIA__": new_image(pair)}])
        turns.append([{"__TEXT__": _pick(rng, ["wow, it looks great", "nice one :thumbsup:"])}])
        turns.append([{"__TEXT__": _pick(rng, ["do you have another one like it",
                                                "can you send me a similar picture"])}])
    if scenario == "describe":
        target = [{"__TEXT__": _pick(rng, list(_ANSWER_RESPONSES)).format(shape=shape,
                                                                          colour=colour)}]
    else:
        target = [{"__MEDIA__": new_image(pair)}]
        if rng.random() < 0.7:  # most responses pair the image with a sentence
            target.insert(0, {"__TEXT__": _pick(rng, list(_NP_RESPONSES)).format(np=np_)})
    turns.append(target)
    return turns, scenario


def _write_mmdialog(out: Path, n: int, seed: int, image_size: int, n_negatives: int,
                    seen: Sequence[Pair], heldout: Sequence[Pair], heldout_frac: float
                    ) -> dict[str, Any]:
    """MMDialog test: dialogues plus ``n_negatives`` negative texts and images per dialogue,
    drawn from one shared pool (no pool at all when ``n`` is 0)."""
    rng = _rng(seed, "mmdialog")
    root = out / "MMDialog" / "test"
    taken: set[str] = set()
    media_meta: dict[str, Any] = {}

    def add_image(scene: Scene) -> str:
        key = _media_keys(rng, 1, taken)[0]
        _save_jpeg(draw_scene(scene, image_size, rng), root / f"{key}.jpg")
        media_meta[key] = scene.to_meta()
        return key

    def new_image(forced: Pair) -> str:
        return add_image(sample_scene(rng, seen, forced=forced))

    # Shared negative image pool. Each pair may appear in at most `slack` pool images, so that
    # for any target pair at least n_negatives pool images do not show it (no false negatives).
    pool_size = n_negatives + max(10, n_negatives // 4) if n else 0
    slack = pool_size - n_negatives
    pool_keys: list[str] = []
    pair_count: dict[Pair, int] = {p: 0 for p in all_pairs()}
    while len(pool_keys) < pool_size:
        scene = sample_scene(rng, all_pairs())
        if any(pair_count[o.pair] >= slack for o in scene.objects):
            continue  # would leave too few clean negatives for this pair
        for o in scene.objects:
            pair_count[o.pair] += 1
        pool_keys.append(add_image(scene))
    pool_pairs = [{(o["colour"], o["shape"]) for o in media_meta[k]["objects"]} for k in pool_keys]
    texts, text_pairs = _text_pool()

    conversation_base = int(rng.integers(100_000, 900_000))
    dialogues, meta = [], []
    for i in range(n):
        is_heldout = bool(heldout) and bool(rng.random() < heldout_frac)
        pair = _pick(rng, heldout) if is_heldout else _pick(rng, seen)
        turns, scenario = _make_dialogue(rng, pair, new_image)
        # Excluding every text of the dialogue (not only the last turn's) keeps the pool free of
        # false negatives for the "every turn" target option too.
        own_texts = {e["__TEXT__"] for turn in turns for e in turn if "__TEXT__" in e}
        ok_images = [k for k, ps in zip(pool_keys, pool_pairs, strict=True) if pair not in ps]
        ok_texts = [t for t, p in zip(texts, text_pairs, strict=True)
                    if p != pair and t not in own_texts]
        neg_images = [ok_images[int(j)] for j in rng.choice(len(ok_images), n_negatives,
                                                            replace=False)]
        neg_texts = [ok_texts[int(j)] for j in rng.choice(len(ok_texts), n_negatives,
                                                          replace=False)]
        conversation_id = conversation_base + i
        dialogues.append({"conversation_id": conversation_id,
                          "conversation": [{"turn": t} for t in turns],
                          "negative_candidate_media_keys": neg_images,
                          "negative_candidate_texts": neg_texts})
        meta.append({"conversation_id": conversation_id, "scenario": scenario,
                     "target_pair": list(pair), "heldout": is_heldout})
    # One dialogue per line inside the array: still one JSON array, but readable and diffable.
    root.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(json.dumps(d, ensure_ascii=True) for d in dialogues)
    (root / "conversations.json").write_text(f"[\n{body}\n]\n" if body else "[]\n",
                                             encoding="utf-8")
    return {"dialogues": meta, "negative_pool_media_keys": pool_keys, "media": media_meta}


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def _check_sizes(sizes: dict[str, Any]) -> None:
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"unknown size argument(s): {sorted(unknown)}")
    for name in ("n_train", "n_val", "n_visdial", "n_mmdialog"):
        if int(sizes[name]) < 0:
            raise ValueError(f"{name} must be >= 0, got {sizes[name]}")
    if int(sizes["image_size"]) < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {sizes['image_size']}")
    if not 1 <= int(sizes["n_negatives"]) <= max_negatives():
        raise ValueError(f"n_negatives must be in [1, {max_negatives()}] (size of the synthetic "
                         f"text pool), got {sizes['n_negatives']}")
    if not 0.0 <= float(sizes["heldout_frac"]) <= 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1], got {sizes['heldout_frac']}")


def output_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where :func:`generate` writes each output under ``out_dir``."""
    out = Path(out_dir)
    return {
        "root": out,
        "meta": out / "meta.json",
        "image_dir": out / "images",
        "train_tsv": out / "dataset" / "cc3m_train.tsv",
        "val_tsv": out / "dataset" / "cc3m_val.tsv",
        "visdial_dir": out / "VisualDialog",
        "visdial_json": out / "VisualDialog" / "visdial_1.0_val.json",
        "visdial_dense_json": out / "VisualDialog" / "visdial_1.0_val_dense_annotations.json",
        "visdial_image_dir": out / "VisualDialog" / "VisualDialog_val2018",
        "mmdialog_dir": out / "MMDialog",
        "mmdialog_json": out / "MMDialog" / "test" / "conversations.json",
    }


def generate(out_dir: str | Path, seed: int = 0, **sizes: Any) -> dict[str, Path]:
    """Write the whole synthetic dataset under ``out_dir`` and return the paths of its parts.

    ``sizes`` overrides :data:`DEFAULT_SIZES` (n_train, n_val, n_visdial, n_mmdialog, image_size,
    n_negatives, n_heldout, heldout_frac). Files are overwritten, never deleted: write to an
    empty folder if a previous, larger run used it.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    cfg = {**DEFAULT_SIZES, **sizes}
    _check_sizes(cfg)
    paths = output_paths(out_dir)
    out = paths["root"]
    out.mkdir(parents=True, exist_ok=True)
    image_size, frac = int(cfg["image_size"]), float(cfg["heldout_frac"])

    heldout = choose_heldout_pairs(seed, int(cfg["n_heldout"]))
    seen = [p for p in all_pairs() if p not in set(heldout)]
    logger.info("held-out (colour, shape) pairs: %s", heldout)

    t0 = time.perf_counter()
    splits: dict[str, Any] = {}
    for split, key in (("train", "n_train"), ("val", "n_val")):
        splits[split] = _write_cc3m_split(out, split, int(cfg[key]), seed, image_size, seen,
                                          heldout, frac)
        logger.info("wrote %d %s pairs (%.1fs)", len(splits[split]), split,
                    time.perf_counter() - t0)
    splits["visdial"] = _write_visdial(out, int(cfg["n_visdial"]), seed, image_size, seen,
                                       heldout, frac)
    logger.info("wrote %d VisDial dialogues (%.1fs)", len(splits["visdial"]),
                time.perf_counter() - t0)
    splits["mmdialog"] = _write_mmdialog(out, int(cfg["n_mmdialog"]), seed, image_size,
                                         int(cfg["n_negatives"]), seen, heldout, frac)
    logger.info("wrote %d MMDialog dialogues, %d media (%.1fs)",
                len(splits["mmdialog"]["dialogues"]), len(splits["mmdialog"]["media"]),
                time.perf_counter() - t0)

    _write_json(paths["meta"], {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "sizes": cfg,
        "vocabulary": {"colours": list(COLOURS), "shapes": list(SHAPES),
                       "backgrounds": list(BACKGROUNDS), "sizes": list(SIZES),
                       "positions": list(POSITIONS)},
        "heldout_pairs": [list(p) for p in heldout],
        "splits": splits,
    })
    return paths


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m unimur.synthetic",
                                description="Generate a synthetic captioned-shape dataset in the "
                                            "CC3M, VisDial 1.0 and MMDialog formats.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=DEFAULT_SIZES["n_train"])
    p.add_argument("--n-val", type=int, default=DEFAULT_SIZES["n_val"])
    p.add_argument("--n-visdial", type=int, default=DEFAULT_SIZES["n_visdial"])
    p.add_argument("--n-mmdialog", type=int, default=DEFAULT_SIZES["n_mmdialog"])
    p.add_argument("--image-size", type=int, default=DEFAULT_SIZES["image_size"])
    p.add_argument("--n-negatives", type=int, default=DEFAULT_SIZES["n_negatives"],
                   help="negative texts and images per MMDialog dialogue")
    p.add_argument("--n-heldout", type=int, default=DEFAULT_SIZES["n_heldout"],
                   help="number of (colour, shape) pairs kept out of training")
    p.add_argument("--heldout-frac", type=float, default=DEFAULT_SIZES["heldout_frac"],
                   help="fraction of evaluation items built around a held-out pair")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    paths = generate(args.out, args.seed, n_train=args.n_train, n_val=args.n_val,
                     n_visdial=args.n_visdial, n_mmdialog=args.n_mmdialog,
                     image_size=args.image_size, n_negatives=args.n_negatives,
                     n_heldout=args.n_heldout, heldout_frac=args.heldout_frac)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
