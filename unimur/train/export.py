"""Prune a training checkpoint to a model folder holding only the trainable weights.

    prune("exp_log/unimur_exp/ckpt_best.pth.tar", "unimur_model/")   # python unimur/prune_model_ckpt.py

The checkpoint's parameters are checked against the architecture its own config describes
(built on the meta device: no backbone weights are loaded), so a checkpoint whose weights
and config disagree is refused instead of producing a model that fails later. Frozen-backbone
entries in a full state dict are dropped. The result: config.json, model.safetensors,
tokenizer/ and manifest.json (see `unimur/model/pretrained.py`), a few MB at paper scale.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from unimur.config import Config, ModelConfig
from unimur.errors import explain_backbone_errors
from unimur.model.model import UniMuR
from unimur.model.pretrained import check_model_output, save_pretrained
from unimur.model.tokenizer import build_tokenizer
from unimur.train.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)

FROZEN_PREFIXES = ("llm.", "encoders.", "module.llm.", "module.encoders.")


def trainable_weights(state: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """The trainable parameters of a state dict, verified against the config's architecture."""
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(FROZEN_PREFIXES)}
    expected = {k: tuple(v.shape) for k, v in UniMuR.skeleton(config).trainable_state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {expected[k]}"
              for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: weights do not match the checkpoint's config "
                         f"(method={config.method}, llm={config.llm}, "
                         f"visual_model={config.visual_model}): missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {shapes}")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{source}: non-finite values in {bad}")
    return state


# The backbones are named by the checkpoint's config (the architecture and the tokenizer are read).
BACKBONE_FIXES = {"llm": "the checkpoint's config names it (model.llm): make it available in the "
                         "local cache, where the run was trained",
                  "visual": "the checkpoint's config names it (model.visual_model): make it "
                            "available in the local cache, where the run was trained"}


def prune(ckpt_path: str | Path, output: str | Path) -> Path:
    check_model_output(output)  # before anything is loaded: a run folder's config.json is not ours
    ckpt = load_checkpoint(ckpt_path)  # a FROMAGe or non-tensor file is refused here, in one line
    config = Config.from_dict(ckpt["config"])
    with explain_backbone_errors(config.model.llm, config.model.visual_model, BACKBONE_FIXES):
        state = trainable_weights(ckpt["model"], config.model, str(ckpt_path))
        tokenizer, ret_id = build_tokenizer(config.model.llm)
    out = save_pretrained(config.model, state, tokenizer, ret_id, output)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    logger.info("wrote %s: %d tensors, %s parameters, %.2f MB on disk", out, len(state),
                f"{sum(v.numel() for v in state.values()):,}", size / 2**20)
    return out
