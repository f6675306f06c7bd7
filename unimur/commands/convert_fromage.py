"""Convert a released FROMAGe model (`pretrained_ckpt.pth.tar` + `model_args.json`) into this
project's pruned model folder, so FROMAGe and UniMuR are evaluated by the same scripts.

    python unimur/commands/convert_fromage.py --fromage-dir fromage_model/ --output fromage_unimur/
    python evals/eval_visdial.py --model-dir fromage_unimur/ --visdial-dir VisualDialog

FROMAGe's parts map one to one onto `method=fromage` here:
    model.visual_embeddings   -> cap_mapping      (W_cap, from CLIP's pooled pre-projection feature)
    model.visual_fc           -> image_proj       (W_v, 256-d retrieval space)
    model.text_hidden_fcs.0.0 -> unified_mapping  (W_u, first of --text-emb-layers, at [RET])
    model.text_hidden_fcs.i.0 -> extra_unified_mappings.(i-1)  (further layers, summed)
    ret_input_embeddings / row [RET] of model.input_embeddings -> ret_embedding
    model.logit_scale         -> logit_scale
FROMAGe's CLIP is Hugging Face's CLIPVisionModel; its `pooler_output` (post-layernorm CLS) is
open_clip's pre-projection pooled feature of the same OpenAI weights.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
import sys
from pathlib import Path

import torch

from unimur.config import ModelConfig
from unimur.errors import run_cli
from unimur.model.pretrained import check_model_output, save_pretrained
from unimur.model.tokenizer import build_tokenizer
from unimur.train.export import trainable_weights

logger = logging.getLogger("unimur.commands.convert_fromage")

KEY_MAP = {
    "model.visual_embeddings.weight": "cap_mapping.weight",
    "model.visual_embeddings.bias": "cap_mapping.bias",
    "model.visual_fc.weight": "image_proj.weight",
    "model.visual_fc.bias": "image_proj.bias",
    "model.text_hidden_fcs.0.0.weight": "unified_mapping.weight",
    "model.text_hidden_fcs.0.0.bias": "unified_mapping.bias",
    "model.logit_scale": "logit_scale",
}


def fromage_config(args: dict) -> ModelConfig:
    layers = tuple(args.get("text_emb_layers", [-1]))
    if args.get("shared_emb_dim") is None:
        raise ValueError("shared_emb_dim=None (no W_u/W_v) has no equivalent here")
    return ModelConfig(method="fromage", llm=args.get("opt_version", "facebook/opt-6.7b"),
                       visual_model=args.get("visual_encoder", "openai/clip-vit-large-patch14"),
                       n_visual_tokens=int(args.get("n_visual_tokens", 1)), visual_feature="pooled",
                       target_proj="linear", shared_emb_dim=int(args["shared_emb_dim"]),
                       text_emb_layers=layers)


def convert_state(state: dict[str, torch.Tensor], ret_idx: int) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in KEY_MAP if k not in state]
    if missing:
        raise ValueError(f"not a FROMAGe checkpoint: missing {missing}")
    if "ret_input_embeddings.weight" not in state and "model.input_embeddings.weight" in state \
            and not 0 <= ret_idx < state["model.input_embeddings.weight"].shape[0]:
        raise ValueError(f"retrieval_token_idx {ret_idx} is outside the checkpoint's embedding table "
                         f"({state['model.input_embeddings.weight'].shape[0]} rows)")
    out = {new: state[old].float() for old, new in KEY_MAP.items()}
    # FROMAGe's text_hidden_fcs.i (i >= 1: further --text-emb-layers) -> extra_unified_mappings.(i-1)
    i = 1
    while f"model.text_hidden_fcs.{i}.0.weight" in state:
        for part in ("weight", "bias"):
            out[f"extra_unified_mappings.{i - 1}.{part}"] = state[f"model.text_hidden_fcs.{i}.0.{part}"].float()
        i += 1
    if "ret_input_embeddings.weight" in state:  # written by FROMAGe's prune_model_ckpt.py
        out["ret_embedding"] = state["ret_input_embeddings.weight"].reshape(-1).float()
    elif "model.input_embeddings.weight" in state:
        out["ret_embedding"] = state["model.input_embeddings.weight"][ret_idx].float()
    else:
        raise ValueError("no [RET] embedding (ret_input_embeddings.weight or model.input_embeddings.weight)")
    return out


def convert(fromage_dir: str | Path, output: str | Path, ckpt_name: str = "pretrained_ckpt.pth.tar") -> Path:
    fromage_dir = Path(fromage_dir)
    check_model_output(output)  # before anything is loaded (e.g. --output the FROMAGe folder itself)
    args = _read_model_args(fromage_dir / "model_args.json")
    config = fromage_config(args)
    if "retrieval_token_idx" not in args:
        raise ValueError(f"{fromage_dir / 'model_args.json'}: no retrieval_token_idx (FROMAGe writes it)")
    ckpt = _load_state(fromage_dir / ckpt_name)
    try:
        state = convert_state(ckpt, int(args["retrieval_token_idx"]))
    except ValueError as e:  # name the file: the message alone does not say which one
        raise ValueError(f"{fromage_dir / ckpt_name}: {e}") from None
    state = trainable_weights(state, config, str(fromage_dir / ckpt_name))
    tokenizer, ret_id = build_tokenizer(config.llm)
    out = save_pretrained(config, state, tokenizer, ret_id, output)
    logger.info("converted FROMAGe model %s -> %s", fromage_dir, out)
    return out


def _read_model_args(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --fromage-dir must hold FROMAGe's model_args.json "
                                f"and pretrained_ckpt.pth.tar")
    try:
        args = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path}: not a JSON file ({type(e).__name__})") from e
    if not isinstance(args, dict):
        raise ValueError(f"{path}: expected a JSON object of FROMAGe's model arguments")
    return args


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, read as tensors only: a file holding pickled objects is
    refused (unpickling runs code from the file), with what to do, never with torch's advice to
    load it with weights_only=False."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --fromage-dir must hold FROMAGe's pretrained_ckpt.pth.tar "
                                f"(or name the file with --ckpt-name)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"{path} holds pickled Python objects{f' ({found.group(1)})' if found else ''}, not only "
                         f"tensors; they are never loaded here (unpickling runs code from the file). Where you "
                         f"trust the file, re-save only its state_dict as tensors: "
                         f"torch.save({{'state_dict': ckpt['state_dict']}}, ...)") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {first})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a FROMAGe checkpoint (expected a state_dict of tensors)")
    return state


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fromage-dir", required=True, help="folder with pretrained_ckpt.pth.tar and model_args.json")
    ap.add_argument("--ckpt-name", default="pretrained_ckpt.pth.tar")
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return convert(args.fromage_dir, args.output, args.ckpt_name)


if __name__ == "__main__":
    sys.exit(run_cli(main))  # expected failures: one `error: ...` line
