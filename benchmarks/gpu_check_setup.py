"""Inputs of `benchmarks/gpu_check.sh`, made locally, no hub: a folder holding a random-init
causal LM of real shape (config, safetensors weights and GPT-2 BPE tokenizer files, as a hub
snapshot of OPT holds them), random-init open_clip weights in a file, and a synthetic
CC3M-format set (TSVs + JPEGs).

    python benchmarks/gpu_check_setup.py --out /tmp/unimur-gpu-check              # OPT-6.7B + ViT-L/14
    python benchmarks/gpu_check_setup.py --out /tmp/smoke --llm tiny-opt --clip ViT-B-32-quickgelu --rows 64

Weights are random: speed and memory do not depend on their values. Everything is written once
and reused by later runs (delete the folder to rebuild).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

logger = logging.getLogger("gpu_check_setup")


def write_llm(folder: Path, shape: str, dtype: torch.dtype, device: torch.device) -> None:
    from transformers import AutoModelForCausalLM

    from unimur.model.backbones.hub import llm_config, tiny_opt_config
    from unimur.model.tokenizer import build_tokenizer

    if (folder / "config.json").is_file():
        return
    config = tiny_opt_config() if shape == "tiny-opt" else llm_config(shape)
    with torch.device(device):  # random init on the GPU: seconds for 6.7B parameters
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = folder.with_name(folder.name + ".tmp")
    llm.save_pretrained(tmp)
    build_tokenizer("tiny-opt")[0].save_pretrained(tmp)  # GPT-2 BPE: OPT's vocabulary
    tmp.rename(folder)  # a folder that exists is complete


def write_clip(path: Path, arch: str) -> None:
    import open_clip

    if path.is_file():
        return
    clip = open_clip.create_model(arch, pretrained=None)
    torch.save(clip.state_dict(), path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)


def write_data(folder: Path, rows: int, val_rows: int) -> None:
    from unimur.data.synthetic.generator import generate

    if (folder / "done").is_file():
        return
    generate(folder, seed=0, n_train=rows, n_val=val_rows, n_visdial=2, n_mmdialog=2, image_size=96, n_negatives=4)
    (folder / "done").touch()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--llm", default="facebook/opt-6.7b", help="an OPT id of backbones.OPT_SHAPES, or tiny-opt")
    ap.add_argument("--clip", default="ViT-L-14-quickgelu", help="open_clip architecture (OpenAI ViT-L/14's)")
    ap.add_argument("--rows", type=int, default=3000, help="training rows (steps beyond one pass wrap around)")
    ap.add_argument("--val-rows", type=int, default=120)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from unimur.model.backbones.base import DTYPES

    for what, make in (("LLM folder", lambda: write_llm(out / "llm", args.llm, DTYPES[args.dtype], device)),
                       ("CLIP weights", lambda: write_clip(out / "clip.pt", args.clip)),
                       ("synthetic set", lambda: write_data(out / "syn", args.rows, args.val_rows))):
        started = time.perf_counter()
        make()
        logger.info("%s ready (%.0f s)", what, time.perf_counter() - started)


if __name__ == "__main__":
    main()
