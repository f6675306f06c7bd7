"""The synthetic sets' pictures and words: vocabulary, scenes, drawing, captions and dialogue
rounds (each draw from a numpy Generator passed in, never a global RNG).

`unimur.data.synthetic.generator` writes them out in the CC3M / VisDial / MMDialog formats.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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


def stream_rng(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per output stream, so e.g. changing ``n_val`` leaves train alone."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode("utf-8"))])


def pick_one(rng: np.random.Generator, items: Sequence[Any]) -> Any:
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


def save_jpeg(img: Image.Image, path: Path) -> None:
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
    rng = stream_rng(seed, "heldout")
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
        pairs.append(pick_one(rng, free))
    objects = tuple(Obj(c, s, pick_one(rng, list(SIZES)), pos)
                    for (c, s), pos in zip(pairs, positions[:len(pairs)], strict=True))
    return Scene(background=pick_one(rng, list(BACKGROUNDS)), objects=objects)


def eval_scene(rng: np.random.Generator, seen: Sequence[Pair], heldout: Sequence[Pair],
                heldout_frac: float) -> tuple[Scene, bool]:
    """An evaluation scene whose first object is a held-out pair with probability heldout_frac."""
    use_heldout = bool(heldout) and bool(rng.random() < heldout_frac)
    forced = pick_one(rng, heldout) if use_heldout else pick_one(rng, seen)
    return sample_scene(rng, seen, forced=forced), use_heldout


# ----------------------------------------------------------------------------------------------
# Language
# ----------------------------------------------------------------------------------------------


def with_article(phrase: str) -> str:
    """Prefix the right indefinite article ("an orange star", "a large orange star")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _np(obj: Obj, with_size: bool) -> str:
    """'a large red circle' / 'a red circle'. Colour always directly precedes shape, which is
    what the held-out check in the tests relies on."""
    core = f"{obj.colour} {obj.shape}"
    return with_article(f"{obj.size} {core}" if with_size else core)


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
    sentences = [pick_one(rng, [f"{count} on {with_article(bg)} background", f"{with_article(bg)} picture with {count}",
                             f"the picture shows {count}"])]
    for o in objs:
        sentences.append(pick_one(rng, [
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
            f"{_np(o, size)} on {with_article(bg)} background",
            f"a picture of {_np(o, size)} {CAPTION_POSITION[o.position]}",
            f"a drawing of {_np(o, True)} on {with_article(bg)} background",
        ]
    elif len(objs) == 2:
        o1, o2 = objs
        rel = _relation(o1, o2)
        templates = [
            f"{_np(o1, size)} {CAPTION_POSITION[o1.position]} and "
            f"{_np(o2, size)} {CAPTION_POSITION[o2.position]}",
            f"{_np(o1, size)} and {_np(o2, size)} on {with_article(bg)} background",
            f"two shapes: {_np(o1, True)} and {_np(o2, True)}",
        ]
        if rel is not None:
            templates.append(f"{_np(o1, size)} {rel} {_np(o2, size)}")
    else:
        o1, o2, o3 = objs
        templates = [
            f"{_np(o1, size)}, {_np(o2, size)} and {_np(o3, size)}",
            f"three shapes on {with_article(bg)} background: {_np(o1, False)}, {_np(o2, False)} "
            f"and {_np(o3, False)}",
            f"{_np(o1, False)} {CAPTION_POSITION[o1.position]}, {_np(o2, False)} "
            f"{CAPTION_POSITION[o2.position]} and {_np(o3, False)} {CAPTION_POSITION[o3.position]}",
        ]
    return pick_one(rng, templates)


def dialogue_caption_for(scene: Scene, rng: np.random.Generator) -> str:
    """A VisDial caption: COCO-like, only partly descriptive, worded unlike the training set."""
    objs, o = scene.objects, scene.objects[0]
    if len(objs) == 1:
        templates = [f"a simple drawing of {with_article(o.shape)}",
                     f"there is {with_article(o.colour)} {o.shape} {DIALOGUE_POSITION[o.position]}"]
    else:
        others = len(objs) - 1
        templates = [f"a drawing with {NUMBER_WORDS[len(objs)]} shapes on {with_article(scene.background)} "
                     f"background",
                     f"{with_article(o.colour)} {o.shape} next to {NUMBER_WORDS[others]} other "
                     f"shape{'s' if others > 1 else ''}"]
    return pick_one(rng, templates)


def visdial_rounds(scene: Scene, rng: np.random.Generator, n_rounds: int = 10
                   ) -> list[tuple[str, str]]:
    """``n_rounds`` (question, answer) pairs about ``scene``, in VisDial style (no '?')."""
    objs = scene.objects
    n = len(objs)
    # Always ask the count, each object's colour and its place: enough to identify the image.
    required: list[tuple[str, str]] = [(
        pick_one(rng, ["how many objects are there", "how many shapes can you see"]),
        "just one" if n == 1 else NUMBER_WORDS[n])]
    for o in objs:
        required.append((f"what color is the {o.shape}",
                         pick_one(rng, [f"it is {o.colour}", o.colour, f"it's {o.colour}"])))
        required.append((f"where is the {o.shape}", DIALOGUE_POSITION[o.position]))
    optional: list[tuple[str, str]] = []
    for o in objs:
        optional.append((f"is the {o.shape} big",
                         "yes, it is big" if o.size == "large" else "no, it is small"))
        optional.append((f"what shape is the {o.colour} one", with_article(o.shape)))
        other = pick_one(rng, [p for p in POSITIONS if p != o.position])
        asked = pick_one(rng, [o.position, other])
        optional.append((f"is the {o.shape} {DIALOGUE_POSITION[asked]}",
                         "yes" if asked == o.position else f"no, {DIALOGUE_POSITION[o.position]}"))
    present = {o.shape for o in objs}
    for shape in SHAPES:
        optional.append((f"is there {with_article(shape)}",
                         "yes, there is one" if shape in present else "no"))
    optional += [
        ("what color is the background",
         pick_one(rng, [scene.background, f"it is {scene.background}"])),
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
DISTRACTOR_ANSWERS: list[str] = (
    ["yes", "no", "maybe", "not sure", "i think so", "i don't think so", "one", "two", "three",
     "four", "five", "many", "none", "i can't tell", "yes, it is", "no, it isn't"]
    + [f"it is {c}" for c in COLOURS] + list(COLOURS) + [f"it's {c}" for c in COLOURS]
    + [f"it is {b}" for b in BACKGROUNDS] + list(BACKGROUNDS)
    + [with_article(s) for s in SHAPES] + [f"it is {with_article(s)}" for s in SHAPES]
    + list(DIALOGUE_POSITION.values()) + [f"no, {p}" for p in DIALOGUE_POSITION.values()]
    + ["yes, it is big", "no, it is small", "yes, there is one", "no, it is a drawing",
       "no text", "just one", "it is a photo", "a little", "very big", "quite small",
       "i don't know", "hard to say", "it is dark", "it is bright", "yes, very", "not at all"]
    + [f"i think it is {c}" for c in COLOURS] + [f"probably {with_article(s)}" for s in SHAPES]
    + [f"yes, {p}" for p in DIALOGUE_POSITION.values()] + [f"there are {w}" for w in
                                                            ("two", "three", "four", "many")]
)
