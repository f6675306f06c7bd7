"""The web demo (`python -m unimur.commands.app`): started on a loopback port and queried through Gradio's
client API, its answers checked against a brute-force reference. Skipped without gradio
(pip install -r requirements-app.txt)."""
import json
import socket

import pytest

from unimur.commands import app as app_module


def test_missing_gradio_is_one_error_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert app_module.run_cli(["--model-dir", "x"], entry=app_module.main) == 1
    from test_retrieve import error_line

    assert error_line(capsys.readouterr().err).startswith("error: the web demo needs gradio")


def test_binds_loopback_by_default():
    assert app_module.parse_args([]).host == "127.0.0.1"
    assert app_module.parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"


# ------------------------------------------------------------------------- the running app


def _client(url):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client, gradio_client.Client(url, verbose=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(request):
    pytest.importorskip("gradio", reason="the web demo needs gradio (requirements-app.txt)")
    from unimur.commands.retrieve import session_from_args

    tiny_pool = request.getfixturevalue("tiny_pool")  # built only when gradio is there

    args = app_module.parse_args(["--model-dir", str(tiny_pool.model_dir), "--images", str(tiny_pool.images),
                                  "--texts", str(tiny_pool.texts_file), "--device", "cpu"])
    session = session_from_args(args)
    port = _free_port()
    blocks = app_module.build_app(session, k=3)
    app_module.launch(blocks, args.host, port, block=False)
    try:
        yield session, blocks, f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


def test_server_listens_on_loopback_only(served):
    _, blocks, _ = served
    assert blocks.server_name == "127.0.0.1"


def test_retrieve_endpoint_matches_the_reference(served, tiny_pool):
    from test_retrieve import reference

    from unimur.inference.image_embeddings import load_image_embeddings

    _, _, url = served
    _, client = _client(url)
    dialogue = {"conversation": [{"turn": [{"__TEXT__": "look at this"}, {"__MEDIA__": "green_square.png"}]},
                                 {"turn": [{"__TEXT__": "do you have a red one?"}]}]}
    answer = client.predict(json.dumps(dialogue), 4, api_name="/retrieve")
    images = load_image_embeddings(tiny_pool.images)
    feature = images.cap_features[images.ids.index("green_square.png")]
    ref_img, ref_txt = reference(tiny_pool.model, [["look at this", feature], ["do you have a red one?"]], images,
                                 tiny_pool.texts, 4)
    assert [x["id"] for x in answer["images"]] == [i for i, _ in ref_img]
    assert [x["text"] for x in answer["texts"]] == [t for t, _ in ref_txt]
    assert answer["texts"][0]["score"] == pytest.approx(ref_txt[0][1], abs=1e-4)
    with pytest.raises(Exception, match="ids of the image pool"):  # a client cannot make the server read a file
        client.predict(json.dumps({"conversation": [{"turn": [{"__MEDIA__": "/etc/passwd"}]}]}), 3,
                       api_name="/retrieve")
    with pytest.raises(Exception, match="turn format"):
        client.predict(json.dumps(["look", {"__MEDIA__": "x"}]), 3, api_name="/retrieve")


def test_chat_turns_accumulate_and_show_the_reference_answer(served, tiny_pool):
    from test_retrieve import reference

    from unimur.inference.image_embeddings import load_image_embeddings
    from unimur.utils.images import load_rgb_image

    _, _, url = served
    gradio_client, client = _client(url)
    image = tiny_pool.image_dir / "blue_circle.png"
    client.predict("look at my circle", gradio_client.handle_file(str(image)), 3, api_name="/send")
    chat, gallery, texts, status, message, attached = client.predict("another colour?", None, 2, api_name="/send")

    images = load_image_embeddings(tiny_pool.images)
    ref_img, ref_txt = reference(tiny_pool.model, [["look at my circle", load_rgb_image(image)], ["another colour?"]],
                                 images, tiny_pool.texts, 2)
    assert [g["caption"].split()[-1] for g in gallery] == [i for i, _ in ref_img]
    assert [float(g["caption"].split()[1]) for g in gallery] == pytest.approx([s for _, s in ref_img], abs=2e-3)
    assert [row[2] for row in texts["data"]] == [t for t, _ in ref_txt]
    user = [m for m in chat if m["role"] == "user"]
    assert len(user) == 3  # two turns: text + image, then text
    reply = [m for m in chat if m["role"] == "assistant"]
    assert ref_txt[0][0] in json.dumps(reply)
    assert status.startswith("image output: yes") and message == "" and attached is None


def test_page_opens_with_the_given_dialogue_answered(served, tiny_pool):
    """--dialogue: the page's first content is that dialogue and the reference answer."""
    import gradio as gr
    from test_retrieve import reference

    from unimur.inference.image_embeddings import load_image_embeddings

    session = served[0]
    turns = [[("text", "look at this"), ("image", "green_square")], [("text", "one more?")]]
    blocks = app_module.build_app(session, 2, turns)
    chat = next(b for b in blocks.blocks.values() if isinstance(b, gr.Chatbot))
    frame = next(b for b in blocks.blocks.values() if isinstance(b, gr.Dataframe))
    images = load_image_embeddings(tiny_pool.images)
    feature = images.cap_features[images.ids.index("green_square.png")]
    _, ref_txt = reference(tiny_pool.model, [["look at this", feature], ["one more?"]], images, tiny_pool.texts, 2)
    assert [row[2] for row in frame.value["data"]] == [t for t, _ in ref_txt]
    assert ref_txt[0][0] in json.dumps(chat.value, default=str)


def test_uploaded_photo_gets_the_command_lines_embedding(served, tiny_pool, tmp_path, capsys):
    """EXIF orientation and alpha: the app reads the uploaded file with the project's loader,
    so its answer equals `unimur.commands.retrieve --query-image` on the same file."""
    from PIL import Image
    from test_data import _sideways_jpeg
    from test_retrieve import run_json

    _sideways_jpeg(tmp_path / "phone.jpg")
    rgba = Image.new("RGBA", (48, 48), (0, 0, 0, 0))  # transparent pixels storing black ...
    rgba.paste((0, 0, 255, 255), (12, 12, 36, 36))   # ... around an opaque blue square
    rgba.save(tmp_path / "cutout.png")
    _, _, url = served
    for name in ("phone.jpg", "cutout.png"):
        gradio_client, client = _client(url)  # a new page: a new dialogue
        _, gallery, texts, *_ = client.predict("look", gradio_client.handle_file(str(tmp_path / name)), 3,
                                               api_name="/send")
        # the app's turn holds the text and the image: the same one turn for the command line
        turn = {"conversation": [{"turn": [{"__TEXT__": "look"}, {"__MEDIA__": str(tmp_path / name)}]}]}
        (tmp_path / "turn.json").write_text(json.dumps(turn))
        cli = run_json(capsys, ["--model-dir", str(tiny_pool.model_dir), "--images", str(tiny_pool.images),
                                "--texts", str(tiny_pool.texts_file), "--dialogue", str(tmp_path / "turn.json"),
                                "-k", "3", "--json", "--device", "cpu"])
        assert [g["caption"].split()[-1] for g in gallery] == [x["id"] for x in cli["images"]], name
        assert [float(g["caption"].split()[1]) for g in gallery] == pytest.approx(
            [x["score"] for x in cli["images"]], abs=2e-3), name
        assert [row[2] for row in texts["data"]] == [x["text"] for x in cli["texts"]], name
