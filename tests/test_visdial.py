"""VisDial 1.0 reader on small hand-written fixtures: queries, every skip kind, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unimur.data.visdial import (
    VisDialDialog,
    build_visdial_query,
    load_visdial,
    load_visdial_dense,
    visdial_image_path,
)

QUESTIONS = ["what color is the circle", "is it on the left", "how many objects are there"]
ANSWERS = ["it is red", "yes", "two"]


def rnd(q: int, a: int, gt: int = 0) -> dict:
    """One round; the options only need to contain the answer at gt_index."""
    options = [a] + [x for x in range(len(ANSWERS)) if x != a]
    return {"question": q, "answer": a, "answer_options": options, "gt_index": gt}


def write_visdial(root: Path, dialogs: list[dict], images: list[int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = {"split": "val2018", "version": "1.0",
            "data": {"questions": QUESTIONS, "answers": ANSWERS, "dialogs": dialogs}}
    (root / "visdial_1.0_val.json").write_text(json.dumps(data))
    for image_id in images:
        path = visdial_image_path(root, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8\xff")  # the reader only checks that the file exists
    return root


GOOD = {"image_id": 7, "caption": "a red circle", "dialog": [rnd(0, 0), rnd(1, 1), rnd(2, 2)]}


def test_loads_dialogue_and_image_path(tmp_path):
    write_visdial(tmp_path, [GOOD], images=[7])
    dialogs, skipped = load_visdial(tmp_path)
    assert not skipped
    (d,) = dialogs
    assert d.image_id == 7 and d.caption == "a red circle"
    image_dir = tmp_path / "VisualDialog_val2018"
    assert d.image_path == image_dir / "VisualDialog_val2018_000000000007.jpg"
    assert d.rounds == [("what color is the circle", "it is red"), ("is it on the left", "yes"),
                        ("how many objects are there", "two")]


def test_query_forms():
    d = VisDialDialog(1, Path("x.jpg"), "a red circle",
                      [("what color is it", "red"), ("is it big", "yes")])
    assert build_visdial_query(d) == "Q: what color is it? A: red. Q: is it big? A: yes."
    assert build_visdial_query(d, "caption+rounds") == (
        "a red circle. Q: what color is it? A: red. Q: is it big? A: yes.")
    assert build_visdial_query(d, "rounds", rounds=1) == "Q: what color is it? A: red."
    assert build_visdial_query(d, "caption+rounds", rounds=0) == "a red circle."
    with pytest.raises(ValueError, match="context"):
        build_visdial_query(d, "dialog")
    with pytest.raises(ValueError, match="empty"):
        build_visdial_query(d, "rounds", rounds=0)


def test_every_skip_kind_is_counted(tmp_path):
    dialogs = [
        GOOD,
        {"image_id": 8, "caption": "c", "dialog": [rnd(0, 0)]},                 # no image file
        {"image_id": 9, "caption": "c", "dialog": [rnd(0, 0), rnd(5, 0)]},      # question index
        {"image_id": 10, "caption": "c", "dialog": [rnd(0, 3), rnd(0, -1)]},    # answer indices
        {"image_id": "11", "caption": "c", "dialog": [rnd(0, 0)]},              # image_id not int
        {"image_id": 12, "caption": "c", "dialog": "oops"},                     # dialog not a list
        {"image_id": 13, "caption": "c", "dialog": [rnd(0, 0), {"question": 1}]},  # test-style
    ]
    write_visdial(tmp_path, dialogs, images=[7, 9, 10, 11, 12, 13])
    kept, skipped = load_visdial(tmp_path)
    assert [d.image_id for d in kept] == [7, 13]
    assert kept[1].rounds == [("what color is the circle", "it is red")]
    assert skipped == {"missing_image": 1, "bad_round_index": 3, "dialog_with_bad_round": 2,
                       "malformed_dialog": 2, "round_without_answer": 1}


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="visdial_1.0_val.json"):
        load_visdial(tmp_path)


def test_truncated_json_names_path(tmp_path):
    write_visdial(tmp_path, [GOOD], images=[7])
    path = tmp_path / "visdial_1.0_val.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match=r"visdial_1\.0_val\.json.*truncated"):
        load_visdial(tmp_path)


def test_not_visdial_and_nothing_usable(tmp_path):
    (tmp_path / "visdial_1.0_val.json").write_text(json.dumps({"data": {"questions": []}}))
    with pytest.raises(ValueError, match="not a VisDial"):
        load_visdial(tmp_path)
    write_visdial(tmp_path, [GOOD], images=[])
    with pytest.raises(ValueError, match="no usable dialogue"):
        load_visdial(tmp_path)


def test_dense_annotations(tmp_path):
    path = tmp_path / "dense.json"
    path.write_text(json.dumps([{"image_id": 7, "round_id": 3, "gt_relevance": [0.5] * 100},
                                {"image_id": 8, "round_id": 1, "relevance": [1] * 100}]))
    dense = load_visdial_dense(path)
    assert [(x.image_id, x.round_id) for x in dense] == [(7, 3), (8, 1)]
    assert dense[0].relevance == [0.5] * 100 and dense[1].relevance == [1.0] * 100
    path.write_text(json.dumps([{"image_id": 7, "round_id": 3}]))
    with pytest.raises(ValueError, match="dense.json"):
        load_visdial_dense(path)
