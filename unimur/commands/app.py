"""A web demo of a trained model (Gradio): type dialogue turns, attach images, see what it retrieves.

    pip install -r requirements-app.txt        # gradio (or: pip install "unimur[app]")
    python -m unimur.commands.app --model-dir unimur_model --images pool.safetensors --texts texts.txt
    # then open http://127.0.0.1:7860 ; --host 0.0.0.0 --port 8080 to serve other machines

Each message a person sends is one turn of the dialogue (text, an attached image, or both); after
each turn the page shows the top-k images (thumbnails with cosine scores) and text responses for
the whole dialogue so far, and the chat shows the top text (with the top image, under the image
rule) as the reply. The reply is not added to the dialogue: the person types every turn. Model,
pool and rule flags are those of ``python -m unimur.commands.retrieve``; ``--dialogue FILE`` (its format)
opens the page with that dialogue already answered.

Client API (``gradio_client``): ``/send`` (message, image file, k) is the chat step;
``/retrieve`` (dialogue, k) answers a whole dialogue in MMDialog's turn format (JSON text; images
as image-pool ids) with the same JSON as ``python -m unimur.commands.retrieve --json``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

from unimur.commands.retrieve import add_dialogue_file_args, add_model_args, run_cli, session_from_args  # noqa: E402

if TYPE_CHECKING:
    from unimur.inference.session import Session

logger = logging.getLogger("unimur.commands.app")

TITLE = "UniMuR: one embedding retrieves an image and a text reply"
MAX_K = 10


class ChatState:
    """One browser session's dialogue: turns of ("text", str) / ("image", ref) segments."""

    def __init__(self) -> None:
        self.turns: list[list[tuple[str, str]]] = []


def respond(session: Session, turns: list, k: int) -> dict[str, Any]:
    """``session.answer`` for ``turns``; image refs are pool ids or files the server holds."""
    from unimur.inference.dialogue import render, to_turn_pieces

    answer = session.answer(to_turn_pieces(turns, session.images), k=int(k))
    answer["dialogue"] = render(turns)
    return answer


def answer_json(session: Session, dialogue: str, k: int) -> dict[str, Any]:
    """The ``/retrieve`` endpoint: a dialogue as JSON text (MMDialog turn format, or a list of
    turn strings). Images must be image-pool ids: a client cannot make the server read a file."""
    from unimur.inference.dialogue import parse_dialogue_json

    turns = parse_dialogue_json(dialogue)
    if any(kind == "image" for turn in turns for kind, _ in turn):
        rows = set(session.images.ids if session.images is not None else [])
        stems = {Path(i).stem for i in rows}
        unknown = [v for turn in turns for kind, v in turn if kind == "image" and v not in rows | stems]
        if unknown:
            raise ValueError(f"images in /retrieve must be ids of the image pool; unknown: {unknown[:3]}")
    return respond(session, turns, k)


def _thumbnail(session: Session, item: dict[str, Any]):
    """The pool image as a small PIL image, or a grey tile naming it when its file is not found."""
    from PIL import Image, ImageDraw

    from unimur.utils.images import UnusableImage, load_rgb_image

    if item["file"]:
        try:
            img = load_rgb_image(item["file"])  # upright and on white, as it was embedded
            img.thumbnail((256, 256))
            return img
        except UnusableImage as e:
            logger.warning("cannot show %s: %s", item["file"], e)
    tile = Image.new("RGB", (256, 256), (200, 200, 200))
    ImageDraw.Draw(tile).text((8, 120), str(item["id"])[:40], fill=(0, 0, 0))
    return tile


def build_app(session: Session, k: int = 3, initial_turns: list | None = None):
    """The Gradio Blocks of the page (not launched). ``initial_turns``: a dialogue the page opens
    with, already answered (``--dialogue``)."""
    import gradio as gr

    send = _send_turn(session)
    first, shown = _first_view(session, k, initial_turns)

    with gr.Blocks(title="UniMuR", analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\n{_describe(session)}")
        state = gr.State(first)
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(value=shown[0], label="dialogue (each message is one turn)", height=460)
                with gr.Row():
                    message = gr.Textbox(placeholder="type a turn, e.g. 'do you have a red star?'",
                                         show_label=False, scale=4, lines=2)
                    # image_mode=None: Gradio hands over the uploaded file itself, not its decoded
                    # copy (EXIF-turned, alpha dropped); the project's loader reads it, as the
                    # command line does, so the same photo gets the same embedding
                    image = gr.Image(type="filepath", image_mode=None, label="attach an image", height=140,
                                     scale=1, sources=["upload", "clipboard"])
                with gr.Row():
                    k_slider = gr.Slider(1, MAX_K, value=k, step=1, label="top-k")
                    send_btn = gr.Button("Send turn", variant="primary")
                    clear_btn = gr.Button("New dialogue")
            with gr.Column(scale=2):
                status = gr.Markdown(shown[3])
                gallery = gr.Gallery(value=shown[1], label="retrieved images (cosine)", columns=3,
                                     height=300, object_fit="contain")
                texts = gr.Dataframe(value=shown[2] or None, headers=["rank", "score", "text response"],
                                     label="retrieved texts", interactive=False, wrap=True)
        outputs = [chat, gallery, texts, status, state, message, image]
        send_btn.click(send, [message, image, k_slider, state], outputs, api_name="send")
        message.submit(send, [message, image, k_slider, state], outputs, api_visibility="private")
        clear_btn.click(lambda: ([], [], [], "", ChatState(), "", None), None, outputs, api_visibility="private")

        def retrieve(dialogue: str, k: int = 3) -> dict:
            """Answer a dialogue (MMDialog turn-format JSON, or a JSON list of turn strings;
            images as pool ids) with the JSON of `python -m unimur.commands.retrieve --json`."""
            with _shown_errors():
                return answer_json(session, dialogue, k)

        gr.api(retrieve, api_name="retrieve")
    return app


def _send_turn(session: Session):
    """The chat step: one turn (text, image or both) added to the dialogue, which is answered."""
    import gradio as gr

    def send(message: str, image: str | None, k_value: float, state: ChatState | None):
        state = state or ChatState()
        message = (message or "").strip()
        if not message and not image:
            raise gr.Error("type a turn or attach an image")
        turn = ([("text", message)] if message else []) + ([("image", image)] if image else [])
        with _shown_errors():
            answer = respond(session, state.turns + [turn], int(k_value))
        state.turns.append(turn)
        return (_chat(state, session, answer), _gallery(session, answer), _texts(answer),
                _status(answer), state, "", None)

    return send


def _first_view(session: Session, k: int, initial_turns: list | None) -> tuple[ChatState, tuple]:
    """The page's first content: empty, or the --dialogue answered (computed once, here)."""
    first = ChatState()
    if not initial_turns:
        return first, ([], [], [], "")
    first.turns = [list(t) for t in initial_turns]
    answer = respond(session, first.turns, k)
    return first, (_chat(first, session, answer), _gallery(session, answer), _texts(answer), _status(answer))


@contextlib.contextmanager
def _shown_errors():
    """Bad input reaches the page (and the API client) as its one-line message."""
    import gradio as gr

    try:
        yield
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise gr.Error(" ".join(str(e).split())) from e


def _describe(session: Session) -> str:
    n_img = len(session.images) if session.images is not None else 0
    n_txt = len(session.retriever.texts or session.likelihood_texts or [])
    rule = session.image_rule
    if session.image_threshold is not None:
        rule += f" > {session.image_threshold}"
    return (f"model `{session.model_dir}` · image pool: {n_img} images · text pool: {n_txt} responses · "
            f"image rule: {rule} · text ranking: {session.text_ranking}. Each message you send is one "
            f"turn; the retrieved reply is shown, not added to the dialogue.")


def _chat(state: ChatState, session: Session, answer: dict[str, Any]) -> list[dict[str, Any]]:
    import gradio as gr

    messages: list[dict[str, Any]] = []
    for turn in state.turns:
        for kind, value in turn:
            if kind == "text":
                messages.append({"role": "user", "content": value})
            else:
                shown = value if Path(value).is_file() else _thumbnail(
                    session, {"id": value, "file": _pool_file(session, value)})
                messages.append({"role": "user", "content": gr.Image(value=shown, height=160)})
    reply = answer["texts"][0] if answer["texts"] else None
    if reply is not None:
        messages.append({"role": "assistant", "content": f"{reply['text']}  _(cosine {reply['score']:.3f})_"})
    if answer["images"] and answer["image_output"]:
        top = answer["images"][0]
        messages.append({"role": "assistant",
                         "content": gr.Image(value=_thumbnail(session, top), height=160,
                                             label=f"{top['id']} (cosine {top['score']:.3f})")})
    return messages


def _pool_file(session: Session, ref: str) -> str | None:
    """The file of a pool image named by id or by file stem (a dialogue file's media key)."""
    from unimur.inference.pools import image_file

    ids = session.images.ids if session.images is not None else []
    match = next((i for i in ids if i == ref), None) or next((i for i in ids if Path(i).stem == ref), None)
    found = image_file(match, session.images, session.image_root) if match else None
    return str(found) if found else None


def _gallery(session: Session, answer: dict[str, Any]) -> list:
    return [(_thumbnail(session, x), f"#{x['rank']}  {x['score']:.3f}  {Path(str(x['id'])).name}")
            for x in answer["images"]]


def _texts(answer: dict[str, Any]) -> list[list]:
    return [[x["rank"], f"{x['score']:.3f}", x["text"]] for x in answer["texts"]]


def _status(answer: dict[str, Any]) -> str:
    if not answer["images"]:
        return ""
    if answer["image_output"]:
        return f"image output: yes (top image cosine {answer['images'][0]['score']:.3f})"
    return (f"image output: **no** (top image cosine {answer['images'][0]['score']:.3f} is not above "
            f"{answer['settings']['image_threshold']}); candidates shown")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m unimur.commands.app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; default: %(default)s (this machine only). 0.0.0.0 serves "
                        "every network interface: anyone who reaches it can use the model")
    p.add_argument("--port", type=int, default=7860, help="default: %(default)s")
    p.add_argument("-k", type=int, default=3, help="initial top-k (1-%d); default: %%(default)s" % MAX_K)
    add_dialogue_file_args(p)  # a dialogue the page opens with, answered
    return p.parse_args(argv)


def require_gradio() -> None:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ValueError("the web demo needs gradio: pip install -r requirements-app.txt "
                         "(or pip install 'unimur[app]')")


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve ``app``; ``block=False`` returns once the server is up (tests)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s:%d: other machines can reach this demo", host, port)
    return app.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                      prevent_thread_lock=not block, quiet=not block, footer_links=[],
                      theme=_theme(), allowed_paths=[])


def _theme():
    import gradio as gr

    # system fonts: the default theme fetches web fonts, which an offline machine cannot
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not 1 <= args.k <= MAX_K:
        raise ValueError(f"-k must be between 1 and {MAX_K}, got {args.k}")
    require_gradio()
    turns = None
    if args.dialogue:
        from unimur.inference.dialogue import read_dialogue, select_turns

        turns = select_turns(read_dialogue(args.dialogue, args.conversation_id), args.n_turns)
        base = Path(args.dialogue).parent  # image files of the dialogue: relative to it
        turns = [[(k, v if k == "text" or not (base / v).is_file() else str(base / v)) for k, v in t]
                 for t in turns]
    session = session_from_args(args)
    logger.info("serving on http://%s:%d", args.host, args.port)
    launch(build_app(session, args.k, turns), args.host, args.port)


def cli() -> int:
    """The ``unimur-app`` console script."""
    return run_cli(entry=main)


if __name__ == "__main__":
    sys.exit(cli())
