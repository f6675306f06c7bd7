"""Synthetic generator: determinism, held-out pairs, the three real formats field by field."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from unimur.data.mmdialog import load_mmdialog, media_path
from unimur.data.synthetic import generator as synthetic
from unimur.data.visdial import build_visdial_query, load_visdial, load_visdial_dense

SMALL = dict(n_train=50, n_val=20, n_visdial=12, n_mmdialog=12, image_size=32, n_negatives=20)
SEED = 3


def tree_hash(root: Path) -> str:
    """One digest over every file's relative path and bytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return synthetic.generate(tmp_path_factory.mktemp("synth"), SEED, **SMALL)


@pytest.fixture(scope="module")
def meta(data) -> dict:
    return json.loads(data["meta"].read_text())


def pair_phrases(meta: dict) -> list[str]:
    return [f"{c} {s}" for c, s in meta["heldout_pairs"]]


def object_pairs(item: dict) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in item["objects"]}


# --------------------------------------------------------------------------------------------
# Determinism and held-out pairs
# --------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    again = synthetic.generate(tmp_path / "again", SEED, **SMALL)
    other = synthetic.generate(tmp_path / "other", SEED + 1, **SMALL)
    assert tree_hash(data["root"]) == tree_hash(again["root"])
    assert tree_hash(data["root"]) != tree_hash(other["root"])


def test_heldout_pairs_are_seeded_matching():
    pairs = synthetic.choose_heldout_pairs(SEED, 6)
    assert pairs == synthetic.choose_heldout_pairs(SEED, 6)
    assert pairs != synthetic.choose_heldout_pairs(SEED + 1, 6)
    # A matching: every colour and shape still occurs in training with other partners.
    assert len({c for c, _ in pairs}) == len({s for _, s in pairs}) == 6


def test_heldout_absent_from_train_present_in_eval(meta):
    heldout = {tuple(p) for p in meta["heldout_pairs"]}
    phrases = pair_phrases(meta)
    assert len(heldout) == synthetic.DEFAULT_SIZES["n_heldout"]
    train = meta["splits"]["train"]
    assert train and all(not object_pairs(item) & heldout for item in train)
    assert not [c for item in train for c in [item["caption"]] if any(p in c for p in phrases)]
    # Every colour and shape word is still seen in training.
    words = " ".join(item["caption"] for item in train)
    assert all(c in words for c in synthetic.COLOURS) and all(s in words for s in synthetic.SHAPES)

    val = meta["splits"]["val"]
    assert any(item["heldout"] for item in val)
    assert any(p in item["caption"] for item in val for p in phrases)
    assert any(item["heldout"] and object_pairs(item) & heldout
               for item in meta["splits"]["visdial"])
    dialogues = meta["splits"]["mmdialog"]["dialogues"]
    assert any(d["heldout"] and tuple(d["target_pair"]) in heldout for d in dialogues)


def test_training_captions_never_use_dialogue_wording(data, meta):
    """The VisDial queries' wording is unseen in training: no question, no Q:/A: form, no
    dialogue position phrase, no question or answer string of the VisDial file."""
    train = [item["caption"] for item in meta["splits"]["train"]]
    described = [c for c in train if ". " in c]
    assert described and len(described) < len(train)  # both caption styles occur
    raw = json.loads(data["visdial_json"].read_text())["data"]
    answers = {a for a in raw["answers"] if " " in a}  # multi-word answers (single words are colours)
    for caption in train:
        assert "?" not in caption and "Q:" not in caption and "A:" not in caption
        assert not any(p in caption for p in synthetic.DIALOGUE_POSITION.values())
        assert not any(q in caption for q in raw["questions"])
        assert not any(a == sentence for a in answers for sentence in caption.split(". "))


def test_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_negatives"):
        synthetic.generate(tmp_path, 0, n_negatives=synthetic.max_negatives() + 1)
    with pytest.raises(TypeError, match="unknown"):
        synthetic.generate(tmp_path, 0, n_trian=5)


# --------------------------------------------------------------------------------------------
# CC3M
# --------------------------------------------------------------------------------------------


def test_cc3m_tsv_format(data, meta):
    for split, n in (("train", SMALL["n_train"]), ("val", SMALL["n_val"])):
        lines = data[f"{split}_tsv"].read_text(encoding="utf-8").splitlines()
        assert lines[0] == "caption\timage"
        rows = list(csv.reader(lines[1:], delimiter="\t"))
        assert len(rows) == n and all(len(r) == 2 for r in rows)
        for (caption, image), item in zip(rows, meta["splits"][split], strict=True):
            assert caption == item["caption"] and image == item["image"]
            assert "/" not in image  # relative to the image dir
        with Image.open(data["image_dir"] / rows[0][1]) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (SMALL["image_size"], SMALL["image_size"])


# --------------------------------------------------------------------------------------------
# VisDial
# --------------------------------------------------------------------------------------------


def test_visdial_format_field_by_field(data):
    raw = json.loads(data["visdial_json"].read_text())
    assert set(raw) == {"split", "version", "data"}
    assert raw["split"] == "val2018" and raw["version"] == "1.0"
    questions, answers, dialogs = (raw["data"][k] for k in ("questions", "answers", "dialogs"))
    assert set(raw["data"]) == {"questions", "answers", "dialogs"}
    assert all(isinstance(q, str) and q and not q.endswith("?") for q in questions)
    assert all(isinstance(a, str) and a for a in answers)
    assert len(dialogs) == SMALL["n_visdial"]
    for d in dialogs:
        assert set(d) == {"image_id", "caption", "dialog"}
        assert isinstance(d["image_id"], int) and isinstance(d["caption"], str)
        assert len(d["dialog"]) == 10
        for r in d["dialog"]:
            assert set(r) == {"question", "answer", "answer_options", "gt_index"}
            opts = r["answer_options"]
            assert len(opts) == 100 and len(set(opts)) == 100
            assert all(isinstance(o, int) and 0 <= o < len(answers) for o in opts)
            assert 0 <= r["question"] < len(questions)
            assert opts[r["gt_index"]] == r["answer"]
        name = f"VisualDialog_val2018_{d['image_id']:012d}.jpg"
        assert (data["visdial_image_dir"] / name).is_file()
    names = [p.name for p in data["visdial_image_dir"].iterdir()]
    assert all(re.fullmatch(r"VisualDialog_val2018_\d{12}\.jpg", n) for n in names)

    dense = load_visdial_dense(data["visdial_dense_json"])
    assert [x.image_id for x in dense] == [d["image_id"] for d in dialogs]
    assert all(len(x.relevance) == 100 and 1 <= x.round_id <= 10 for x in dense)


def test_visdial_loads_with_reader(data):
    dialogs, skipped = load_visdial(data["visdial_dir"])
    assert not skipped and len(dialogs) == SMALL["n_visdial"]
    query = build_visdial_query(dialogs[0])
    assert query.count("Q: ") == 10 and query.count("? A: ") == 10 and "??" not in query


# --------------------------------------------------------------------------------------------
# MMDialog
# --------------------------------------------------------------------------------------------

MEDIA_KEY = re.compile(r"-?\d{18,19}")


def check_mmdialog_file(path: Path, n_negatives: int) -> list[dict]:
    dialogues = json.loads(path.read_text())
    assert isinstance(dialogues, list)
    for d in dialogues:
        assert set(d) == {"conversation_id", "conversation", "negative_candidate_media_keys",
                          "negative_candidate_texts"}
        assert isinstance(d["conversation_id"], int)
        assert len(d["conversation"]) >= 2
        for turn in d["conversation"]:
            assert set(turn) == {"turn"} and turn["turn"]
            for element in turn["turn"]:
                assert len(element) == 1
                (kind, value), = element.items()
                assert kind in ("__TEXT__", "__MEDIA__") and isinstance(value, str)
                if kind == "__MEDIA__":
                    assert MEDIA_KEY.fullmatch(value) and (path.parent / f"{value}.jpg").is_file()
        keys, texts = d["negative_candidate_media_keys"], d["negative_candidate_texts"]
        assert len(keys) == len(set(keys)) == n_negatives
        assert len(texts) == len(set(texts)) == n_negatives
        assert all(isinstance(k, str) and MEDIA_KEY.fullmatch(k) for k in keys)
        assert all((path.parent / f"{k}.jpg").is_file() for k in keys)
    return dialogues


def test_mmdialog_format_field_by_field(data, meta):
    dialogues = check_mmdialog_file(data["mmdialog_json"], SMALL["n_negatives"])
    assert len(dialogues) == SMALL["n_mmdialog"]
    text = data["mmdialog_json"].read_text()
    assert re.search(r":[a-z_]+:", text)  # emoji tokens
    # Negatives never show or name the target pair: no false negatives in the pool.
    media = meta["splits"]["mmdialog"]["media"]
    for d, m in zip(dialogues, meta["splits"]["mmdialog"]["dialogues"], strict=True):
        pair = tuple(m["target_pair"])
        assert all(pair not in object_pairs(media[k]) for k in d["negative_candidate_media_keys"])
        texts = {e["__TEXT__"] for t in d["conversation"] for e in t["turn"] if "__TEXT__" in e}
        assert not texts & set(d["negative_candidate_texts"])
        for e in d["conversation"][-1]["turn"]:
            if "__MEDIA__" in e:
                assert pair in object_pairs(media[e["__MEDIA__"]])


def test_mmdialog_default_negatives(tmp_path):
    assert synthetic.DEFAULT_SIZES["n_negatives"] == 999
    paths = synthetic.generate(tmp_path, 0, n_train=0, n_val=0, n_visdial=0, n_mmdialog=2,
                               image_size=16)
    check_mmdialog_file(paths["mmdialog_json"], 999)


def test_mmdialog_loads_with_reader(data):
    queries, skipped = load_mmdialog(data["mmdialog_dir"])
    assert not skipped and len(queries) == SMALL["n_mmdialog"]
    for q in queries:
        assert q.gt_texts or q.gt_media_keys
        assert len(q.negative_texts) == len(q.negative_media_keys) == SMALL["n_negatives"]
        assert all(media_path(data["mmdialog_dir"], "test", k).is_file() for k in q.gt_media_keys)
    assert any(kind == "image" for q in queries for kind, _ in q.context)


def test_cli_writes_dataset(tmp_path, capsys):
    from unimur.commands import synthetic as synthetic_command

    synthetic_command.main(["--out", str(tmp_path), "--seed", "1", "--n-train", "4", "--n-val", "2",
                            "--n-visdial", "2", "--n-mmdialog", "2", "--image-size", "16",
                            "--n-negatives", "5"])
    assert json.loads(capsys.readouterr().out.split("\ndone")[0])["root"] == str(tmp_path)
    assert (tmp_path / "dataset" / "cc3m_train.tsv").is_file()
