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

    python -m unimur.commands.synthetic --out data/synth --seed 0
    python -m unimur.commands.synthetic --out /tmp/tiny --seed 1 --n-train 50 --n-val 10 \\
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

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unimur.data.synthetic.scenes import (  # noqa: F401  (re-exported: the sets' vocabulary and scenes)
    BACKGROUNDS,
    COLOURS,
    DIALOGUE_POSITION,
    DISTRACTOR_ANSWERS,
    POSITIONS,
    SHAPES,
    SIZES,
    Pair,
    Scene,
    all_pairs,
    caption_for,
    choose_heldout_pairs,
    described_caption,
    dialogue_caption_for,
    draw_scene,
    eval_scene,
    pick_one,
    sample_scene,
    save_jpeg,
    stream_rng,
    visdial_rounds,
    with_article,
)

logger = logging.getLogger(__name__)

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
    rng = stream_rng(seed, f"cc3m_{split}")
    rows, meta = ["caption\timage"], []
    for i in range(n):
        if split == "train":
            scene, is_heldout = sample_scene(rng, seen), False
        else:
            scene, is_heldout = eval_scene(rng, seen, heldout, heldout_frac)
        name = f"{split}_{i:06d}.jpg"
        caption = caption_for(scene, rng)
        save_jpeg(draw_scene(scene, image_size, rng), out / "images" / name)
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
    rng = stream_rng(seed, "visdial")
    root = out / "VisualDialog"
    image_ids = sorted(int(x) + 100_000 for x in rng.choice(900_000, size=n, replace=False))
    questions: dict[str, int] = {}
    answers: dict[str, int] = {}

    def index(table: dict[str, int], text: str) -> int:
        return table.setdefault(text, len(table))

    raw, meta = [], []
    for image_id in image_ids:
        scene, is_heldout = eval_scene(rng, seen, heldout, heldout_frac)
        save_jpeg(draw_scene(scene, image_size, rng),
                   root / "VisualDialog_val2018" / visdial_image_name(image_id))
        rounds = visdial_rounds(scene, rng)
        raw.append((image_id, dialogue_caption_for(scene, rng),
                    [(index(questions, q), index(answers, a)) for q, a in rounds]))
        meta.append({"image_id": image_id, "heldout": is_heldout, **scene.to_meta()})
    for text in DISTRACTOR_ANSWERS:
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
                texts.append(template.format(np=with_article(f"{size}{colour} {shape}")))
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
    return [[{"__TEXT__": pick_one(rng, ["hi there :wave:", "hello! how are you",
                                       "good morning :sunny:", "hey, can you help me"])}],
            [{"__TEXT__": pick_one(rng, ["hi! i am fine, thanks :smile:", "hello, nice to meet you",
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
    np_ = with_article(f"{colour} {shape}")
    turns = _opening_turns(rng)
    scenario = pick_one(rng, ["request", "describe", "another"])
    if scenario == "request":
        turns.append([{"__TEXT__": pick_one(rng, [f"can you show me {np_}",
                                                f"do you have a picture of {np_}",
                                                f"i would like to see {np_} please",
                                                f"send me {np_} :pray:"])}])
    elif scenario == "describe":
        turns.append([{"__MEDIA__": new_image(pair)},
                      {"__TEXT__": pick_one(rng, [f"what color is the {shape} in this picture",
                                                f"which color does my {shape} have"])}])
    else:
        turns.append([{"__TEXT__": f"look at my {colour} {shape} :heart_eyes:"},
                      {"__MEDIA__": new_image(pair)}])
        turns.append([{"__TEXT__": pick_one(rng, ["wow, it looks great", "nice one :thumbsup:"])}])
        turns.append([{"__TEXT__": pick_one(rng, ["do you have another one like it",
                                                "can you send me a similar picture"])}])
    if scenario == "describe":
        target = [{"__TEXT__": pick_one(rng, list(_ANSWER_RESPONSES)).format(shape=shape,
                                                                          colour=colour)}]
    else:
        target = [{"__MEDIA__": new_image(pair)}]
        if rng.random() < 0.7:  # most responses pair the image with a sentence
            target.insert(0, {"__TEXT__": pick_one(rng, list(_NP_RESPONSES)).format(np=np_)})
    turns.append(target)
    return turns, scenario


def _write_mmdialog(out: Path, n: int, seed: int, image_size: int, n_negatives: int,
                    seen: Sequence[Pair], heldout: Sequence[Pair], heldout_frac: float
                    ) -> dict[str, Any]:
    """MMDialog test: dialogues plus ``n_negatives`` negative texts and images per dialogue,
    drawn from one shared pool (no pool at all when ``n`` is 0)."""
    # One generator for the whole split: the draws below (pool, then dialogue by dialogue) must
    # keep this order, or the same seed would no longer give the same files.
    rng = stream_rng(seed, "mmdialog")
    root = out / "MMDialog" / "test"
    taken: set[str] = set()
    media_meta: dict[str, Any] = {}

    def add_image(scene: Scene) -> str:
        key = _media_keys(rng, 1, taken)[0]
        save_jpeg(draw_scene(scene, image_size, rng), root / f"{key}.jpg")
        media_meta[key] = scene.to_meta()
        return key

    def new_image(forced: Pair) -> str:
        return add_image(sample_scene(rng, seen, forced=forced))

    pool_size = n_negatives + max(10, n_negatives // 4) if n else 0
    pool_keys = _negative_image_pool(rng, pool_size, n_negatives, add_image)
    pool_pairs = [{(o["colour"], o["shape"]) for o in media_meta[k]["objects"]} for k in pool_keys]
    texts, text_pairs = _text_pool()

    conversation_base = int(rng.integers(100_000, 900_000))
    dialogues, meta = [], []
    for i in range(n):
        is_heldout = bool(heldout) and bool(rng.random() < heldout_frac)
        pair = pick_one(rng, heldout) if is_heldout else pick_one(rng, seen)
        turns, scenario = _make_dialogue(rng, pair, new_image)
        neg_images, neg_texts = _dialogue_negatives(rng, pair, turns, pool_keys, pool_pairs, texts,
                                                    text_pairs, n_negatives)
        conversation_id = conversation_base + i
        dialogues.append({"conversation_id": conversation_id,
                          "conversation": [{"turn": t} for t in turns],
                          "negative_candidate_media_keys": neg_images,
                          "negative_candidate_texts": neg_texts})
        meta.append({"conversation_id": conversation_id, "scenario": scenario,
                     "target_pair": list(pair), "heldout": is_heldout})
    _write_conversations(root, dialogues)
    return {"dialogues": meta, "negative_pool_media_keys": pool_keys, "media": media_meta}


def _negative_image_pool(rng: np.random.Generator, pool_size: int, n_negatives: int,
                         add_image: Callable[[Scene], str]) -> list[str]:
    """Media keys of the shared negative image pool, ``pool_size`` images drawn over all pairs."""
    # Each pair may appear in at most `slack` pool images, so that for any target pair at least
    # n_negatives pool images do not show it (no false negatives).
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
    return pool_keys


def _dialogue_negatives(rng: np.random.Generator, pair: Pair, turns: list[list[dict[str, str]]],
                        pool_keys: list[str], pool_pairs: list[set[Pair]], texts: list[str],
                        text_pairs: list[Pair | None], n_negatives: int) -> tuple[list[str], list[str]]:
    """A dialogue's ``n_negatives`` negative images and texts, drawn (images first) from the
    shared pools without those that show or name its target ``pair``."""
    # Excluding every text of the dialogue (not only the last turn's) keeps the pool free of
    # false negatives for the "every turn" target option too.
    own_texts = {e["__TEXT__"] for turn in turns for e in turn if "__TEXT__" in e}
    ok_images = [k for k, ps in zip(pool_keys, pool_pairs, strict=True) if pair not in ps]
    ok_texts = [t for t, p in zip(texts, text_pairs, strict=True)
                if p != pair and t not in own_texts]
    neg_images = [ok_images[int(j)] for j in rng.choice(len(ok_images), n_negatives, replace=False)]
    neg_texts = [ok_texts[int(j)] for j in rng.choice(len(ok_texts), n_negatives, replace=False)]
    return neg_images, neg_texts


def _write_conversations(root: Path, dialogues: list[dict[str, Any]]) -> None:
    """``root/conversations.json``: the dialogues as one JSON array."""
    # One dialogue per line inside the array: still one JSON array, but readable and diffable.
    root.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(json.dumps(d, ensure_ascii=True) for d in dialogues)
    (root / "conversations.json").write_text(f"[\n{body}\n]\n" if body else "[]\n",
                                             encoding="utf-8")


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
