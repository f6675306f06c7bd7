"""A pruned UniMuR model folder (`unimur_model/`): the trainable weights only.

    unimur_model/
      config.json          ModelConfig (names the frozen LLM and CLIP to rebuild)
      model.safetensors    trainable parameters (W_cap, [RET], W_u, W_v/W_t, logit scale)
      tokenizer/           the LLM tokenizer with [RET] (its id is checked on load)
      manifest.json        format version, [RET] id, parameter names/shapes, sha256 of the weights

`read_pretrained` checks a folder and reads it; `UniMuR.from_pretrained` rebuilds the frozen
backbones from the stored identifiers and loads the trainable weights strictly; a tampered or mismatched folder fails with a message naming
what differs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unimur.config import ModelConfig, from_dict
from unimur.model.tokenizer import build_tokenizer
from unimur.utils.files import file_sha256

logger = logging.getLogger(__name__)

FORMAT = "unimur-pruned-v1"
WEIGHTS, CONFIG, MANIFEST, TOKENIZER = "model.safetensors", "config.json", "manifest.json", "tokenizer"


# Files that say a folder belongs to another artifact: a training run (unimur.train.run_folder), a
# released FROMAGe model (unimur.commands.convert_fromage's input).
RUN_MARKERS = ("run.lock", "ckpt*.pth.tar", "metrics.jsonl", "train.log", "command.txt")
FROMAGE_MARKERS = ("model_args.json", "pretrained_ckpt.pth.tar")


def check_model_output(out_dir: str | Path) -> None:
    """Refuse to write a pruned model where it would replace another artifact's files: a run
    folder's config.json, a FROMAGe folder, or a config.json / model.safetensors that is not a
    pruned model's. An earlier pruned model in ``out_dir`` is replaced, as before."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output {out_dir} is a file: give a folder for the model")
    if not out_dir.is_dir():
        return
    for kind, markers in (("a training run folder", RUN_MARKERS), ("a FROMAGe model folder", FROMAGE_MARKERS)):
        found = next((m for pattern in markers for m in sorted(out_dir.glob(pattern))), None)
        if found is not None:
            raise ValueError(f"--output {out_dir} is {kind} (it holds {found.name}): the model's config.json "
                             f"would replace the one there; write the model to a folder of its own")
    parts = [n for n in (CONFIG, WEIGHTS, MANIFEST, TOKENIZER) if (out_dir / n).exists()]
    if parts and not is_model_folder(out_dir):
        raise ValueError(f"--output {out_dir} holds {parts[0]} but is not a pruned UniMuR model folder "
                         f"(no {MANIFEST} of format {FORMAT}): refused, so as not to replace it")


def is_model_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a pruned model's manifest (of this format)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def artifact_owning(path: str | Path) -> str | None:
    """What owns the file ``path`` (a part of a pruned model folder, a run folder's own file),
    or None: a command writing its own output there would destroy that artifact."""
    path = Path(os.path.abspath(path))
    for folder in path.parents:
        if folder.name == TOKENIZER and is_model_folder(folder.parent):
            return f"the tokenizer of the model folder {folder.parent}"
    if path.name in (CONFIG, WEIGHTS, MANIFEST) and is_model_folder(path.parent):
        return f"the model folder {path.parent} ({path.name})"
    run_files = [m for pattern in RUN_MARKERS for m in path.parent.glob(pattern)]
    if run_files and (path.name == CONFIG or any(path.match(pattern) for pattern in RUN_MARKERS)):
        return f"the run folder {path.parent} ({path.name})"
    return None


def save_pretrained(config: ModelConfig, state: dict[str, torch.Tensor], tokenizer, ret_id: int,
                    out_dir: str | Path) -> Path:
    """Write the folder next to `out_dir`, then swap it into place (never half-written).
    Refuses an `out_dir` that belongs to another artifact (:func:`check_model_output`)."""
    out_dir = Path(out_dir)
    check_model_output(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in sorted(state.items())}
        save_file(tensors, tmp / WEIGHTS, metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(vars(config), indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp / TOKENIZER)
        manifest = {
            "format": FORMAT, "ret_token_id": ret_id, "weights_sha256": file_sha256(tmp / WEIGHTS),
            "parameters": {k: list(v.shape) for k, v in tensors.items()},
            "trainable_total": int(sum(v.numel() for v in tensors.values())),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace the files of a pruned model in `out_dir`, keeping other files (e.g. cc3m_embeddings.pkl)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, CONFIG, MANIFEST):
        os.replace(tmp / name, out_dir / name)
    if (out_dir / TOKENIZER).exists():
        shutil.rmtree(out_dir / TOKENIZER)
    os.replace(tmp / TOKENIZER, out_dir / TOKENIZER)


def read_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a pruned UniMuR model folder (no {CONFIG})")
    return from_dict(ModelConfig, json.loads(path.read_text()), path=f"[{path}]")


@dataclass
class PretrainedFolder:
    """A checked pruned model folder: what `UniMuR.from_pretrained` builds the model from."""

    config: ModelConfig
    tokenizer: Any
    ret_id: int
    state: dict[str, torch.Tensor]     # the trainable weights
    weights_path: Path


def read_pretrained(model_dir: str | Path) -> PretrainedFolder:
    """Read and check a pruned model folder: every file present, the format known, the weights'
    sha256 as the manifest records, the tokenizer's [RET] id the trained one. The frozen backbones
    are not loaded here (`UniMuR.from_pretrained` does that from ``config``)."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    manifest_path, weights_path = model_dir / MANIFEST, model_dir / WEIGHTS
    for p in (manifest_path, weights_path, model_dir / TOKENIZER):
        if not p.exists():
            raise FileNotFoundError(f"{model_dir}: missing {p.name}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{model_dir}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    digest = file_sha256(weights_path)
    if digest != manifest["weights_sha256"]:
        raise ValueError(f"{weights_path}: sha256 {digest[:12]}... does not match the manifest "
                         f"({manifest['weights_sha256'][:12]}...): the weights were modified or truncated")
    tokenizer, ret_id = build_tokenizer(str(model_dir / TOKENIZER))
    if ret_id != manifest["ret_token_id"]:
        raise ValueError(f"{model_dir}: tokenizer gives [RET] id {ret_id}, the model was trained with "
                         f"{manifest['ret_token_id']}")
    return PretrainedFolder(config, tokenizer, ret_id, load_file(str(weights_path)), weights_path)
