"""A pruned UniMuR model folder (`unimur_model/`): the trainable weights only.

    unimur_model/
      config.json          ModelConfig (names the frozen LLM and CLIP to rebuild)
      model.safetensors    trainable parameters (W_cap, [RET], W_u, W_v/W_t, logit scale)
      tokenizer/           the LLM tokenizer with [RET] (its id is checked on load)
      manifest.json        format version, [RET] id, parameter names/shapes, sha256 of the weights

`load_pretrained` rebuilds the frozen backbones from the stored identifiers and loads the
trainable weights strictly; a tampered or mismatched folder fails with a message naming
what differs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbones import load_encoders, load_llm
from .checkpoint import file_sha256
from .config import ModelConfig, from_dict
from .model import UniMuR
from .tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

FORMAT = "unimur-pruned-v1"
WEIGHTS, CONFIG, MANIFEST, TOKENIZER = "model.safetensors", "config.json", "manifest.json", "tokenizer"


def save_pretrained(config: ModelConfig, state: dict[str, torch.Tensor], tokenizer, ret_id: int,
                    out_dir: str | Path) -> Path:
    """Write the folder next to `out_dir`, then swap it into place (never half-written)."""
    out_dir = Path(out_dir)
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


def load_pretrained(model_dir: str | Path, device: str | torch.device = "cpu") -> UniMuR:
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
    llm = load_llm(config.llm, config.llm_dtype)
    encoders = load_encoders(config.visual_model, config.text_model, config.encoder_dtype)
    model = UniMuR(config, llm, encoders, tokenizer, ret_id)
    model.load_trainable_state_dict(load_file(str(weights_path)), source=str(weights_path))
    logger.info("loaded %s (%s, %s + %s)", model_dir, config.method, config.llm, config.visual_model)
    return model.to(device).eval()
