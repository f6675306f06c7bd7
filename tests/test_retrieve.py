"""`python -m unimur.commands.retrieve`: a dialogue in, the top-k images and texts out, checked against a
brute-force reference computed with the model's own encoders (tiny-opt + tiny-clip)."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unimur.commands import retrieve
from unimur.inference.image_embeddings import load_image_embeddings, save_fromage_pickle
from unimur.utils.images import load_rgb_image

REPO = Path(__file__).resolve().parents[1]


def reference(model, turns, images, texts, k, raw=False):
    """Top-k (id, cosine) of the pool images and texts for one dialogue (its turns' pieces, laid
    out as FROMAGe prompts a dialogue, the commands' default; ``raw``: ``turns`` is already the
    list of pieces, as `Retriever.retrieve` takes it), by full sort."""
    from unimur.inference.prompting import layout

    pieces = turns if raw else layout(turns, "dialogue")
    with torch.no_grad():
        u = model.encode_context([pieces]).float()[0]
        s_img = images.embeds.float() @ u
        s_txt = model.text_targets(model.encode_texts(texts)).float() @ u
    top_i = torch.argsort(-s_img, stable=True)[:k].tolist()
    top_t = torch.argsort(-s_txt, stable=True)[:k].tolist()
    return ([(images.ids[i], float(s_img[i])) for i in top_i], [(texts[i], float(s_txt[i])) for i in top_t])


def pool_args(pool, *extra):
    return ["--model-dir", str(pool.model_dir), "--images", str(pool.images), "--texts", str(pool.texts_file),
            "--device", "cpu", *extra]


def error_line(err: str) -> str:
    """The command's failure as printed: one `error: ...` line, the last on stderr (log lines
    may precede it), and no traceback."""
    assert "Traceback" not in err and err.endswith("\n"), err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def run_json(capsys, argv):
    retrieve.main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def check(answer, ref_images, ref_texts):
    assert [x["id"] for x in answer["images"]] == [i for i, _ in ref_images]
    assert [x["text"] for x in answer["texts"]] == [t for t, _ in ref_texts]
    for got, (_, want) in zip(answer["images"] + answer["texts"], ref_images + ref_texts):
        assert got["score"] == pytest.approx(want, abs=1e-4)


def test_query_turns_with_an_image_file_match_the_reference(tiny_pool, capsys):
    image = tiny_pool.image_dir / "red_circle.png"
    answer = run_json(capsys, pool_args(tiny_pool, "--query", "look at my circle", "--query-image", str(image),
                                        "--query", "do you have another one?", "-k", "3"))
    turns = [["look at my circle"], [load_rgb_image(image)], ["do you have another one?"]]
    images = load_image_embeddings(tiny_pool.images)
    check(answer, *reference(tiny_pool.model, turns, images, tiny_pool.texts, 3))
    assert answer["dialogue"] == ["look at my circle", "[image: red_circle.png]", "do you have another one?"]
    assert answer["image_output"] is True and answer["settings"]["image_rule"] == "always"
    assert answer["images"][0]["file"] == str(tiny_pool.image_dir / answer["images"][0]["id"])


def test_dialogue_file_pool_ids_use_the_stored_features(tiny_pool, tmp_path, capsys):
    """MMDialog turn format; an image that is a pool id goes in as its stored W_cap input (as in
    the evaluation); --turns -1 leaves the last (target) turn out."""
    dialogue = {"conversation_id": 7, "conversation": [
        {"turn": [{"__TEXT__": "hi there"}]},
        {"turn": [{"__TEXT__": "look at this"}, {"__MEDIA__": "blue_square"}]},  # id by file stem
        {"turn": [{"__TEXT__": "the reply to retrieve"}]}]}
    path = tmp_path / "conversations.json"
    path.write_text("\n".join(json.dumps(d) for d in [{**dialogue, "conversation_id": 1}, dialogue]))  # JSONL
    answer = run_json(capsys, pool_args(tiny_pool, "--dialogue", str(path), "--conversation-id", "7",
                                        "--turns", "-1", "-k", "4"))
    images = load_image_embeddings(tiny_pool.images)
    feature = images.cap_features[images.ids.index("blue_square.png")]
    ref = reference(tiny_pool.model, [["hi there"], ["look at this", feature]], images, tiny_pool.texts, 4)
    check(answer, *ref)
    assert answer["dialogue"] == ["hi there", "look at this [image: blue_square]"]


def test_table_output(tiny_pool, capsys):
    retrieve.main(pool_args(tiny_pool, "--query", "a green square", "-k", "2"))
    out = capsys.readouterr().out
    answer = run_json(capsys, pool_args(tiny_pool, "--query", "a green square", "-k", "2"))
    assert "top-2 images" in out and "top-2 texts" in out and "image rule: always" in out
    rows = [r for r in (line.split() for line in out.splitlines()) if len(r) > 2 and r[0].isdigit() and "." in r[1]]
    assert [r[2] for r in rows[:2]] == [x["id"] for x in answer["images"]]
    assert [" ".join(r[2:]) for r in rows[2:]] == [x["text"] for x in answer["texts"]]


def test_threshold_rule(tiny_pool, capsys):
    top = run_json(capsys, pool_args(tiny_pool, "--query", "a red square"))["images"][0]["score"]
    above = run_json(capsys, pool_args(tiny_pool, "--query", "a red square", "--image-threshold", str(top + 0.01)))
    below = run_json(capsys, pool_args(tiny_pool, "--query", "a red square", "--image-rule", "threshold",
                                       "--image-threshold", str(top - 0.01)))
    assert above["image_output"] is False and below["image_output"] is True
    assert above["settings"]["image_rule"] == "threshold"
    assert [x["id"] for x in above["images"]] == [x["id"] for x in below["images"]]  # candidates still listed


def test_model_folder_embedding_file_is_used_and_named(tiny_pool, tmp_path, capsys, caplog):
    """The seed README's layout: cc3m_embeddings.pkl in unimur_model/ is the image pool, read only
    with --allow-pickle."""
    import shutil

    model_dir = tmp_path / "unimur_model"
    shutil.copytree(tiny_pool.model_dir, model_dir)
    save_fromage_pickle(load_image_embeddings(tiny_pool.images), model_dir / "cc3m_embeddings.pkl")
    argv = ["--model-dir", str(model_dir), "--query", "a blue circle", "--device", "cpu"]
    assert retrieve.run_cli(argv) == 1
    assert "--allow-pickle" in error_line(capsys.readouterr().err)
    with caplog.at_level(logging.INFO, logger="unimur.inference.session"):
        answer = run_json(capsys, [*argv, "--allow-pickle"])
    assert "cc3m_embeddings.pkl (the embedding file in --model-dir" in caplog.text
    ref = reference(tiny_pool.model, [["a blue circle"]], load_image_embeddings(tiny_pool.images), [], 3)[0]
    assert [(x["id"], pytest.approx(x["score"], abs=1e-4)) for x in answer["images"]] == \
        [(i, pytest.approx(s, abs=1e-4)) for i, s in ref]
    assert answer["texts"] == []


def test_image_dir_pool_is_embedded_once_then_cached(tiny_pool, tmp_path, capsys, monkeypatch):
    from unimur.inference import embedder

    calls = []
    real = embedder.ModelEmbedder.embed_images
    monkeypatch.setattr(embedder.ModelEmbedder, "embed_images",
                        lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    argv = ["--model-dir", str(tiny_pool.model_dir), "--image-dir", str(tiny_pool.image_dir),
            "--cache-dir", str(tmp_path / "cache"), "--query", "a green circle", "--device", "cpu"]
    first = run_json(capsys, argv)
    second = run_json(capsys, argv)
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert first["images"] == second["images"]
    from_file = run_json(capsys, pool_args(tiny_pool, "--query", "a green circle"))
    pairs = lambda answer: [(x["id"], x["score"]) for x in answer["images"]]  # noqa: E731
    assert pairs(first) == pairs(from_file)


@pytest.mark.parametrize("argv, message", [
    (["--model-dir", "{root}/nowhere", "--query", "x"], "not a pruned UniMuR model folder"),
    (["--model-dir", "{model}", "--texts", "{root}/missing.txt", "--query", "x"], "text pool not found"),
    (["--model-dir", "{model}", "--images", "{root}/missing.safetensors", "--query", "x"], "not found"),
    (["--model-dir", "{model}", "--texts", "{texts}", "--dialogue", "{root}/bad.json"], "turn format"),
    (["--model-dir", "{model}", "--images", "{images}", "--query-image", "no_such_id"],
     "not an id of the image pool"),
    (["--model-dir", "{model}", "--texts", "{texts}", "--image-rule", "threshold", "--query", "x"],
     "needs --image-threshold"),
    (["--model-dir", "{model}", "--query", "x"], "no pool to retrieve from"),
    (["--model-dir", "{model}", "--texts", "{texts}", "--query", "x", "-k", "0"], "-k must be >= 1"),
])
def test_bad_input_is_one_error_line(tiny_pool, tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text('{"conversation": [{"turn": "not a list"}]}')
    fill = {"root": tmp_path, "model": tiny_pool.model_dir, "texts": tiny_pool.texts_file,
            "images": tiny_pool.images}
    assert retrieve.run_cli([a.format(**fill) for a in argv] + ["--device", "cpu"]) == 1
    assert message in error_line(capsys.readouterr().err)


def test_command_in_a_fresh_process_gives_what_the_function_gives(tiny_pool, tmp_path):
    """`python -m unimur.commands.retrieve` from another folder gives what `main` gives."""
    argv = pool_args(tiny_pool, "--query", "a red circle", "-k", "2", "--json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-m", "unimur.commands.retrieve", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout)
    ref = reference(tiny_pool.model, [["a red circle"]], load_image_embeddings(tiny_pool.images), tiny_pool.texts, 2)
    check(answer, *ref)


def test_text_pool_files(tmp_path):
    from unimur.inference.pools import read_texts

    (tmp_path / "a.txt").write_text("  hello there \n\nhello there\nhow about a red star\n")
    assert read_texts(tmp_path / "a.txt") == ["hello there", "how about a red star"]
    (tmp_path / "b.jsonl").write_text('"look, a blue circle"\n{"text": "here is a red star", "id": 3}\n\n')
    assert read_texts(tmp_path / "b.jsonl") == ["look, a blue circle", "here is a red star"]
    (tmp_path / "c.jsonl").write_text('"ok"\n{"txt": "no text key"}\n')
    with pytest.raises(ValueError, match="c.jsonl:2"):
        read_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_texts(tmp_path / "d.txt")


def test_model_folder_embedding_file_rules(tmp_path):
    from unimur.inference.pools import find_model_embeddings

    (tmp_path / "model.safetensors").write_bytes(b"")  # the weights, never a pool
    assert find_model_embeddings(tmp_path) is None
    (tmp_path / "cc3m_embeddings.pkl").write_bytes(b"")
    assert find_model_embeddings(tmp_path).name == "cc3m_embeddings.pkl"
    (tmp_path / "cc3m_embeddings.safetensors").write_bytes(b"")  # its conversion wins
    assert find_model_embeddings(tmp_path).name == "cc3m_embeddings.safetensors"
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="several embedding files"):
        find_model_embeddings(tmp_path)


def test_fromage_rules_likelihood_texts_and_ret_token(tiny_pool, capsys, monkeypatch):
    """--text-ranking likelihood and --image-rule ret-token, as in the evaluation: the texts in
    order of summed log p(" " + text | "Q: <dialogue>\nA:"); an image output exactly when a
    generated [RET] comes before any newline, ranked by that [RET]'s embedding."""
    from unimur.inference.generative import candidate_log_likelihoods, generate_responses

    answer = run_json(capsys, pool_args(tiny_pool, "--query", "look at my circle", "-k", "3",
                                        "--text-ranking", "likelihood", "--image-rule", "ret-token"))
    prompt = ["Q: look at my circle", "\nA:"]
    sums, _ = candidate_log_likelihoods(tiny_pool.model, prompt, [" " + t for t in tiny_pool.texts])
    order = torch.argsort(-sums, stable=True)[:3].tolist()
    assert [x["text"] for x in answer["texts"]] == [tiny_pool.texts[i] for i in order]
    assert answer["texts"][0]["score"] == pytest.approx(float(sums[order[0]]), abs=1e-4)
    assert answer["settings"]["text_ranking"] == "likelihood" and answer["image_output"] is False
    assert answer["generated_text"] == generate_responses(tiny_pool.model, [prompt]).texts[0]
    from unimur.model.model import UniMuR

    plain = UniMuR.lm_logits

    def ret_always(self, hidden):
        logits = plain(self, hidden)
        logits[..., self.ret_id] += 1e4
        return logits

    monkeypatch.setattr(UniMuR, "lm_logits", ret_always)
    forced = run_json(capsys, pool_args(tiny_pool, "--query", "look at my circle", "--image-rule", "ret-token"))
    assert forced["image_output"] is True
    # [RET] as the first generated token: its state is encode_context's read-out of the prompt
    ref = reference(tiny_pool.model, [["look at my circle"]], load_image_embeddings(tiny_pool.images), [], 3)[0]
    assert [x["id"] for x in forced["images"]] == [i for i, _ in ref]
    assert forced["images"][0]["score"] == pytest.approx(ref[0][1], abs=1e-4)


def test_text_pool_and_dialogue_lines_split_on_newline_only(tmp_path):
    """U+2028 / U+0085 inside a response are text, not line breaks (the evaluation reads them so)."""
    from unimur.inference.dialogue import parse_dialogue_json
    from unimur.inference.pools import read_texts

    (tmp_path / "a.txt").write_text("one\u2028response\nnext\u0085one\r\nlast\n", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == ["one\u2028response", "next\u0085one", "last"]
    (tmp_path / "b.jsonl").write_text('"x\u2028y"\n{"text": "z"}\n', encoding="utf-8")
    assert read_texts(tmp_path / "b.jsonl") == ["x\u2028y", "z"]
    lines = '{"conversation_id": 1, "conversation": [{"turn": [{"__TEXT__": "a\u2028b"}]}]}\n{"x": 1}\n'
    assert parse_dialogue_json(lines, 1) == [[("text", "a\u2028b")]]


def test_deeply_nested_dialogue_json_is_one_error_line(tiny_pool, tmp_path, capsys):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "deep.jsonl").write_text('{"a": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n{")
    for name in ("deep.json", "deep.jsonl"):
        argv = ["--model-dir", str(tiny_pool.model_dir), "--texts", str(tiny_pool.texts_file),
                "--dialogue", str(tmp_path / name), "--device", "cpu"]
        assert retrieve.run_cli(argv) == 1
        assert "nested too deeply" in error_line(capsys.readouterr().err)


def test_embedding_file_whose_tensor_width_does_not_fit_the_model_is_one_error_line(tiny_pool, tmp_path, capsys):
    from dataclasses import replace

    from unimur.inference.image_embeddings import save_image_embeddings
    from unimur.inference.retriever import Retriever

    emb = load_image_embeddings(tiny_pool.images)
    wide = replace(emb, cap_features=torch.cat([emb.cap_features, emb.cap_features], dim=1))
    save_image_embeddings(wide, tmp_path / "wide.safetensors")
    argv = ["--model-dir", str(tiny_pool.model_dir), "--images", str(tmp_path / "wide.safetensors"),
            "--query-image", tiny_pool.ids[0], "--device", "cpu"]
    assert retrieve.run_cli(argv) == 1
    assert "cap_features has shape" in error_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="cap_features has shape"):
        Retriever.from_model(tiny_pool.model, wide, [])


def test_nonfinite_embedding_rows_are_refused_or_left_out_and_counted(tiny_pool, tmp_path, capsys, caplog):
    from unimur.inference.image_embeddings import save_image_embeddings

    emb = load_image_embeddings(tiny_pool.images)
    emb.embeds[1] = float("nan")
    emb.cap_features[2, 0] = float("inf")
    save_image_embeddings(emb, tmp_path / "nan.safetensors")
    argv = ["--model-dir", str(tiny_pool.model_dir), "--images", str(tmp_path / "nan.safetensors"),
            "--query", "a red circle", "-k", "6", "--device", "cpu"]
    assert retrieve.run_cli(argv) == 1
    assert "2 of 6 rows hold NaN or inf" in error_line(capsys.readouterr().err)
    with caplog.at_level(logging.WARNING):
        answer = run_json(capsys, [*argv, "--skip-nonfinite-embeddings"])
    assert "2 of 6 rows hold NaN or inf" in caplog.text and "left out" in caplog.text
    kept = [i for n, i in enumerate(tiny_pool.ids) if n not in (1, 2)]
    assert sorted(x["id"] for x in answer["images"]) == sorted(kept)
    assert all(x["score"] == x["score"] for x in answer["images"])  # no NaN score


def test_a_dialogue_longer_than_the_llm_positions_loses_its_oldest_turns(tiny_pool, tmp_path, capsys):
    """tiny-opt has 256 positions: the answer says how many turns were left out, and equals the
    answer to the turns that were kept."""
    turns = [{"turn": [{"__TEXT__": f"turn {i}: " + "a red circle next to a blue square " * 8}]} for i in range(30)]
    turns.append({"turn": [{"__TEXT__": "show me a green square"}]})
    path = tmp_path / "long.json"
    path.write_text(json.dumps({"conversation": turns}))
    answer = run_json(capsys, pool_args(tiny_pool, "--dialogue", str(path), "-k", "3"))
    dropped = answer["context_cut"]["turns_dropped"]
    assert answer["context_cut"]["cut"] and 0 < dropped < 30
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps({"conversation": turns[dropped:]}))
    again = run_json(capsys, pool_args(tiny_pool, "--dialogue", str(kept), "-k", "3"))
    assert again["context_cut"] == {"cut": False, "turns_dropped": 0}
    assert again["images"] == answer["images"] and again["texts"] == answer["texts"]
    retrieve.main(pool_args(tiny_pool, "--dialogue", str(path), "-k", "1"))
    assert f"its oldest {dropped} turn(s) were left out" in capsys.readouterr().out
