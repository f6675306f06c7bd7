"""Trainable parameters and optimizer-state bytes at paper scale, from configs alone.

Builds the real classes (OPTForCausalLM with OPT-6.7B's shapes, open_clip ViT-L-14 with
OpenAI's QuickGELU, UniMuR) on the meta device via `UniMuR.skeleton`: no weights are downloaded or allocated.

    python benchmarks/param_budget.py [--opt-version facebook/opt-6.7b] [--n-visual-tokens 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unimur.config import ModelConfig  # noqa: E402
from unimur.model.model import UniMuR  # noqa: E402


def build_meta(model_cfg_kwargs: dict, llm: str, visual_model: str):
    """UniMuR.skeleton: the real classes on the meta device (OPT shapes from
    `backbones.OPT_SHAPES`, open_clip's own ViT config), exactly what pruning checks against."""
    model = UniMuR.skeleton(ModelConfig(llm=llm, visual_model=visual_model, **model_cfg_kwargs))
    return model, model.llm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-visual-tokens", type=int, default=1)
    ap.add_argument("--opt-version", default="facebook/opt-6.7b", help="LLM id (OPT ids need no hub)")
    ap.add_argument("--visual-model", default="openai/clip-vit-large-patch14")
    args = ap.parse_args(argv)
    fp32 = 4
    rows = []
    for name, kw in [("UniMuR target_proj=none", {}),
                     ("UniMuR target_proj=linear", {"target_proj": "linear"}),
                     ("FROMAGe objective (method=fromage)", {"method": "fromage", "target_proj": "linear"})]:
        model, llm = build_meta({"n_visual_tokens": args.n_visual_tokens, **kw}, args.opt_version,
                                args.visual_model)
        n = sum(p.numel() for _, p in model.trainable_named_parameters())
        rows.append((name, n))
    vocab_emb = llm.get_input_embeddings().weight.numel()
    frozen = sum(p.numel() for p in llm.parameters())
    print(f"command: python benchmarks/param_budget.py --n-visual-tokens {args.n_visual_tokens} "
          f"--opt-version {args.opt_version} --visual-model {args.visual_model}")
    print(f"frozen {args.opt_version} parameters: {frozen / 1e9:.3f} B; input embedding matrix {vocab_emb / 1e6:.1f} M")
    print(f"{'configuration':45s} {'trainable':>14s} {'weights MB':>11s} {'AdamW state MB':>15s}")
    for name, n in rows:
        print(f"{name:45s} {n:>14,d} {n * fp32 / 2**20:>11.1f} {2 * n * fp32 / 2**20:>15.1f}")
    # FROMAGe trains the whole (tied) embedding matrix and masks all but [RET]'s gradient.
    n_fromage = rows[2][1] - llm.config.hidden_size + vocab_emb
    print(f"{'FROMAGe codebase (full embedding trainable)':45s} {n_fromage:>14,d} "
          f"{n_fromage * fp32 / 2**20:>11.1f} {2 * n_fromage * fp32 / 2**20:>15.1f}")


if __name__ == "__main__":
    main()
