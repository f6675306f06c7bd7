"""MMDialog reader on hand-written fixtures: queries, both containers, every skip kind, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unimur.data.mmdialog import MMDialogQuery, load_mmdialog, media_path

K1, K2, K3, K4 = "-1000012098956892692", "2000012098956892692", "-3000012098956892692", "4"
MISSING = "-9999999999999999999"


def T(text: str) -> dict:
    return {"__TEXT__": text}


def M(key: str) -> dict:
    return {"__MEDIA__": key}


def dialogue(cid: int, *turns: list[dict], neg_texts=("no", "maybe"), neg_keys=(K3, K4)) -> dict:
    return {"conversation_id": cid, "conversation": [{"turn": list(t)} for t in turns],
            "negative_candidate_media_keys": list(neg_keys),
            "negative_candidate_texts": list(neg_texts)}


GOOD = dialogue(1, [T("hi :wave:")], [T("look"), M(K1)], [T("can you show me a red circle")],
                [T("here is a red circle"), M(K2)])


def write(root: Path, dialogues: list, container: str = "array", split: str = "test",
          keys=(K1, K2, K3, K4)) -> Path:
    """Write ``conversations.json`` as one JSON array or as JSON Lines, plus image files."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    if container == "array":
        text = json.dumps(dialogues, indent=1)
    else:
        text = "\n".join(d if isinstance(d, str) else json.dumps(d) for d in dialogues) + "\n"
    (folder / "conversations.json").write_text(text)
    for key in keys:
        media_path(root, split, key).write_bytes(b"\xff\xd8\xff")  # only existence is checked
    return root


def test_last_turn_query(tmp_path):
    queries, skipped = load_mmdialog(write(tmp_path, [GOOD]))
    assert not skipped
    assert queries == [MMDialogQuery(
        conversation_id=1, turn_index=3,
        context=[("text", "hi :wave:"), ("text", "look"), ("image", K1),
                 ("text", "can you show me a red circle")],
        gt_texts=["here is a red circle"], gt_media_keys=[K2],
        negative_texts=["no", "maybe"], negative_media_keys=[K3, K4], context_turns=[0, 1, 1, 2])]
    assert queries[0].turns() == [[("text", "hi :wave:")], [("text", "look"), ("image", K1)],
                                  [("text", "can you show me a red circle")]]
    assert media_path(tmp_path, "test", K1) == tmp_path / "test" / f"{K1}.jpg"


def test_every_turn_queries(tmp_path):
    queries, _ = load_mmdialog(write(tmp_path, [GOOD]), target="every")
    assert [q.turn_index for q in queries] == [1, 2, 3]
    assert queries[0].context == [("text", "hi :wave:")]
    assert queries[0].gt_texts == ["look"] and queries[0].gt_media_keys == [K1]
    assert queries[-1] == load_mmdialog(tmp_path)[0][0]
    with pytest.raises(ValueError, match="target"):
        load_mmdialog(tmp_path, target="first")


def test_both_containers_give_identical_queries(tmp_path):
    others = [dialogue(2, [M(K1)], [T("nice :smile:")]), dialogue(3, [T("a")], [M(K2)])]
    array = load_mmdialog(write(tmp_path / "a", [GOOD, *others], "array"), target="every")
    lines = load_mmdialog(write(tmp_path / "l", [GOOD, *others], "jsonl"), target="every")
    assert array == lines and len(array[0]) == 5


def test_synthetic_file_both_containers(tmp_path):
    from unimur.data.synthetic import generator as synthetic

    paths = synthetic.generate(tmp_path / "s", 5, n_train=0, n_val=0, n_visdial=0, n_mmdialog=6,
                               image_size=16, n_negatives=10)
    array = load_mmdialog(paths["mmdialog_dir"])
    raw = json.loads(paths["mmdialog_json"].read_text())
    paths["mmdialog_json"].write_text("".join(json.dumps(d) + "\n" for d in raw))
    assert load_mmdialog(paths["mmdialog_dir"]) == array


def test_every_skip_kind_is_counted(tmp_path):
    dialogues = [
        GOOD,
        dialogue(2, [T("only one turn")]),                                   # too_few_turns
        dialogue(3, [T("hi")], [T("   ")]),                                  # empty text, target
        dialogue(4, [T("look"), M(MISSING)], [T("nice")]),                   # context image gone
        dialogue(5, [T("show me")], [T("here"), M(MISSING)]),                # target image gone
        dialogue(6, [M(MISSING)], [T("what is it")]),                        # context becomes empty
        dialogue(7, [T("hi"), {"__AUDIO__": "x"}], [T("ok")]),               # unknown element
        dialogue(8, [T("hi")], [T("ok")], neg_texts=("", "fine"), neg_keys=(K3, MISSING)),
        {"conversation_id": 9, "conversation": "not a list"},                # malformed dialogue
        {"conversation_id": "x", "conversation": [{"turn": [T("a")]}, {"turn": [T("b")]}]},
    ]
    queries, skipped = load_mmdialog(write(tmp_path, dialogues))
    assert [q.conversation_id for q in queries] == [1, 4, 7, 8]
    assert queries[1].context == [("text", "look")]                          # image dropped
    assert queries[3].negative_texts == ["fine"] and queries[3].negative_media_keys == [K3]
    assert skipped == {"too_few_turns": 1, "empty_text_element": 1, "empty_target_turn": 1,
                       "missing_context_image": 2, "missing_target_image": 1, "empty_context": 1,
                       "unknown_element": 1, "empty_negative_text": 1,
                       "missing_negative_image": 1, "malformed_dialogue": 2}


def test_malformed_json_line_is_counted(tmp_path):
    lines = [GOOD, '{"conversation_id": 2, "conversation": [', dialogue(3, [T("a")], [T("b")])]
    queries, skipped = load_mmdialog(write(tmp_path, lines, "jsonl"))
    assert [q.conversation_id for q in queries] == [1, 3]
    assert skipped == {"malformed_json_line": 1}


def test_truncated_array_names_file(tmp_path):
    write(tmp_path, [GOOD, GOOD])
    path = tmp_path / "test" / "conversations.json"
    path.write_text(path.read_text()[:-30])
    with pytest.raises(ValueError, match=r"conversations\.json.*truncated"):
        load_mmdialog(tmp_path)


def test_missing_file_and_nothing_usable(tmp_path):
    with pytest.raises(FileNotFoundError, match="conversations.json"):
        load_mmdialog(tmp_path)
    write(tmp_path, [dialogue(2, [T("only one turn")])])
    with pytest.raises(ValueError, match="no usable query"):
        load_mmdialog(tmp_path)
    write(tmp_path, ["{broken", "[also broken"], "jsonl")
    with pytest.raises(ValueError, match="no line parses"):
        load_mmdialog(tmp_path)


def test_check_images_off_keeps_missing_keys(tmp_path):
    write(tmp_path, [dialogue(5, [T("show me")], [T("here"), M(MISSING)])])
    queries, skipped = load_mmdialog(tmp_path, check_images=False)
    assert queries[0].gt_media_keys == [MISSING] and not skipped


@pytest.mark.parametrize("window", [1, 7, 1 << 20])
def test_json_array_streams_element_by_element(tmp_path, monkeypatch, window):
    """The array reader decodes through a small window and agrees with json.load, elements cut
    at any point (numbers too); damage anywhere is a clear error naming the file."""
    from unimur.data import mmdialog

    monkeypatch.setattr(mmdialog, "_ARRAY_READ_CHARS", window)
    path = tmp_path / "a.json"
    values = [GOOD, 12345, "x, ]", [], {"k": [1, 2.5e3, None, True]}, 7]
    for text in (json.dumps(values), json.dumps(values, indent=2) + "\n\n", "[]", " [ ] "):
        path.write_text(text)
        assert list(mmdialog.read_dialogues(path)) == json.loads(text)
    for damaged in ('[{"a": 1}, {"b": ', '[{"a": 1},]', '[{"a": 1} {"b": 2}]', '[1, 2] 3', '[1, 2'):
        path.write_text(damaged)
        with pytest.raises(ValueError, match=r"a\.json: truncated or malformed JSON array"):
            list(mmdialog.read_dialogues(path))


def test_stream_holds_one_dialogue_at_a_time(tmp_path):
    """MMDialogStream yields each query before the next dialogue is parsed: the reader never
    materialises the split (checked by counting the dialogues read when each query arrives)."""
    from unimur.data.mmdialog import MMDialogStream

    dialogues = [dialogue(i, [T("hi")], [T(f"answer {i}"), M(K1)]) for i in range(5)]
    for container in ("array", "jsonl"):
        stream = MMDialogStream(write(tmp_path / container, dialogues, container))
        seen = [(q.conversation_id, stream.n_dialogues) for q in stream]
        assert seen == [(i, i + 1) for i in range(5)]
        assert stream.first_query().conversation_id == 0 and stream.n_dialogues == 1


def test_deeply_nested_json_is_counted_or_named_never_a_recursion_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    write(tmp_path, [GOOD, deep], "jsonl")
    queries, skipped = load_mmdialog(tmp_path)
    assert [q.conversation_id for q in queries] == [1] and skipped == {"malformed_json_line": 1}
    (tmp_path / "test" / "conversations.json").write_text(f"[{json.dumps(GOOD)}, {deep}]")
    with pytest.raises(ValueError, match=r"conversations\.json.*nested too deeply"):
        load_mmdialog(tmp_path)


def test_line_separator_inside_a_json_lines_text_stays_in_its_line(tmp_path):
    odd = dialogue(2, [T("a\u2028b")], [T("c\u2029d")])
    write(tmp_path, [GOOD, json.dumps(odd, ensure_ascii=False)], "jsonl")
    queries, skipped = load_mmdialog(tmp_path)
    assert not skipped and queries[1].context == [("text", "a\u2028b")] and queries[1].gt_texts == ["c\u2029d"]
