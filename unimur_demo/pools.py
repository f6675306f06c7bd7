"""The demo's retrieval pools, so a newcomer goes from the demo straight to their own dialogue.

Written under ``<out>/pools/`` from the demo's synthetic MMDialog test set:

    images.safetensors   every MMDialog test image, embedded by the trained model
                         (``unimur/extract_vis_emb.py``'s ``extract``; ids ``<media_key>.jpg``)
    texts.txt            every distinct MMDialog text (turns and negatives), one per line
    dialogue.json        a held-out (colour, shape) dialogue without its last turn (the reply to
                         retrieve), in MMDialog's turn format; its images are pool ids

and the two commands that use them (``python -m unimur.commands.retrieve``, ``python -m unimur.commands.app``).
"""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

from unimur.data.mmdialog import parse_turn
from unimur.inference.dialogue import dump_dialogue

logger = logging.getLogger(__name__)


def write_pools(model_dir: Path, data: dict[str, Path], meta: dict[str, Any], out: Path,
                device: str = "cpu") -> dict[str, Any]:
    """Write the three files; returns their paths and the chosen dialogue's target."""
    from unimur.inference.extract import extract
    from unimur.inference.pools import list_image_dir

    out.mkdir(parents=True, exist_ok=True)
    image_dir = data["mmdialog_json"].parent
    ids, paths = list_image_dir(image_dir)
    images = extract(model_dir, ids, paths, out / "images.safetensors", workers=0, device=device,
                     image_root=image_dir)

    dialogues = json.loads(data["mmdialog_json"].read_text())
    texts: dict[str, None] = {}
    for d in dialogues:
        for turn in d["conversation"]:
            texts.update(dict.fromkeys(v for k, v in parse_turn(turn) or [] if k == "text"))
        texts.update(dict.fromkeys(t.strip() for t in d.get("negative_candidate_texts", []) if t.strip()))
    (out / "texts.txt").write_text("\n".join(texts) + "\n")

    chosen, info = _heldout_dialogue(dialogues, meta)
    turns = [parse_turn(t) for t in chosen["conversation"]]
    (out / "dialogue.json").write_text(dump_dialogue(turns[:-1]))
    logger.info("pools: %d images, %d texts; dialogue %s (held-out pair %s)", len(ids), len(texts),
                chosen["conversation_id"], " ".join(info.get("target_pair", [])))
    return {"images": images, "texts": out / "texts.txt", "dialogue": out / "dialogue.json",
            "conversation_id": chosen["conversation_id"], "target_pair": info.get("target_pair"),
            "target_turn": turns[-1]}


def _heldout_dialogue(dialogues: list[dict], meta: dict[str, Any]) -> tuple[dict, dict]:
    """The first held-out dialogue whose reply has a text and an image and whose context shows an
    image (a turn with an image inside); failing that, the closest to it."""
    info = {d["conversation_id"]: d for d in meta["splits"]["mmdialog"]["dialogues"]}

    def kinds(turns) -> set[str]:
        return {k for t in turns for k, _ in parse_turn(t) or []}

    def preference(d: dict) -> tuple[bool, bool, bool]:
        return (bool(info.get(d["conversation_id"], {}).get("heldout")),
                kinds(d["conversation"][-1:]) == {"text", "image"}, "image" in kinds(d["conversation"][:-1]))

    best = max(dialogues, key=preference)  # max keeps the first of equals
    return best, info.get(best["conversation_id"], {})


def try_commands(model_dir: Path, pools: dict[str, Any]) -> str:
    """The retrieve and app commands pointed at the demo's model and pools, ready to paste."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    common = f"--model-dir {q(model_dir)} --images {q(pools['images'])} --texts {q(pools['texts'])}"
    target = " ".join(v if k == "text" else "[image]" for k, v in pools["target_turn"])
    pair = " ".join(pools["target_pair"] or [])
    return "\n".join([
        f"Try the trained model on a dialogue: {q(pools['dialogue'])} is a held-out ({pair}) dialogue "
        f"without its reply ({target!r}):",
        f"  HF_HUB_OFFLINE=1 python -m unimur.commands.retrieve {common} --dialogue {q(pools['dialogue'])} -k 3",
        "or your own turns (--query TEXT / --query-image FILE, repeated):",
        f"  HF_HUB_OFFLINE=1 python -m unimur.commands.retrieve {common} --query 'do you have a red star?'",
        "The web demo, opening on that dialogue (pip install -r requirements-app.txt; then open "
        "http://127.0.0.1:7860):",
        f"  HF_HUB_OFFLINE=1 python -m unimur.commands.app {common} --dialogue {q(pools['dialogue'])}",
    ])
