"""Trainable parameters and optimizer-state bytes at paper scale, from configs alone.

Builds the real classes (OPTForCausalLM with OPT-6.7B's shapes, open_clip ViT-L-14, UniMuR)
on the meta device: no weights are downloaded or allocated.

    python benchmarks/param_budget.py [--llm-config opt-6.7b] [--n-visual-tokens 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# Published OPT-6.7B architecture (facebook/opt-6.7b config.json).
OPT_6_7B = dict(vocab_size=50272, hidden_size=4096, num_hidden_layers=32, ffn_dim=16384,
                num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=4096)


def build_meta(model_cfg_kwargs: dict):
    import open_clip
    from open_clip.transform import image_transform
    from transformers import OPTConfig, OPTForCausalLM

    from unimur.backbones import OpenCLIPEncoders, freeze
    from unimur.config import ModelConfig
    from unimur.model import UniMuR

    with torch.device("meta"):
        llm = freeze(OPTForCausalLM(OPTConfig(**OPT_6_7B)))
        clip = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
    enc = OpenCLIPEncoders(clip, image_transform(224, is_train=False), None, "meta:ViT-L-14")
    cfg = ModelConfig(llm="facebook/opt-6.7b", visual_model="openai/clip-vit-large-patch14", **model_cfg_kwargs)
    with torch.device("meta"):
        model = UniMuR(cfg, llm, enc, tokenizer=_FakeTok(), ret_id=50265)
    return model, llm


class _FakeTok:
    """Only what UniMuR's constructor asks of a tokenizer (OPT prepends </s>=2)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([2] if add_special_tokens else []) + [64]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-visual-tokens", type=int, default=1)
    args = ap.parse_args(argv)
    fp32 = 4
    rows = []
    for name, kw in [("UniMuR target_proj=none", {}),
                     ("UniMuR target_proj=linear", {"target_proj": "linear"}),
                     ("FROMAGe objective (method=fromage)", {"method": "fromage", "target_proj": "linear"})]:
        model, llm = build_meta({"n_visual_tokens": args.n_visual_tokens, **kw})
        n = sum(p.numel() for _, p in model.trainable_named_parameters())
        rows.append((name, n))
    vocab_emb = llm.get_input_embeddings().weight.numel()
    frozen = sum(p.numel() for p in llm.parameters())
    print(f"command: python benchmarks/param_budget.py --n-visual-tokens {args.n_visual_tokens}")
    print(f"frozen OPT-6.7B parameters: {frozen / 1e9:.3f} B; input embedding matrix {vocab_emb / 1e6:.1f} M")
    print(f"{'configuration':45s} {'trainable':>14s} {'weights MB':>11s} {'AdamW state MB':>15s}")
    for name, n in rows:
        print(f"{name:45s} {n:>14,d} {n * fp32 / 2**20:>11.1f} {2 * n * fp32 / 2**20:>15.1f}")
    # FROMAGe trains the whole (tied) embedding matrix and masks all but [RET]'s gradient.
    n_fromage = rows[2][1] - llm.config.hidden_size + vocab_emb
    print(f"{'FROMAGe codebase (full embedding trainable)':45s} {n_fromage:>14,d} "
          f"{n_fromage * fp32 / 2**20:>11.1f} {2 * n_fromage * fp32 / 2**20:>15.1f}")


if __name__ == "__main__":
    main()
