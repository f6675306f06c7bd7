"""Paper-scale check on one GPU, no hub: OPT-6.7B-shaped random-init LLM in bf16 + open_clip
ViT-L-14 (OpenAI's QuickGELU architecture), UniMuR's training step at the seed's per-GPU batch
(120 over 4 GPUs = 30), against its floor, then evaluation throughput batched vs one at a time.

    bash benchmarks/gpu_check.sh                  # the whole check (see that script)
    python benchmarks/gpu_check.py --device cpu --llm tiny-opt --visual-model tiny-clip  # smoke run

Figures (ratios within one run; the GPU is shared): step time vs floor (the frozen LLM's forward
and backward-to-inputs on the same caption tokens, plus the retrieval pass's forward), tokens/s,
peak GPU memory, and model FLOPs utilisation against the GPU's bf16 dense peak. Weights are
random: speed and memory do not depend on their values.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_train_step import timeit as timed  # noqa: E402  (benchmarks/ is on sys.path)

from unimur.config import LossConfig, ModelConfig  # noqa: E402
from unimur.model.backbones.base import DTYPES, freeze  # noqa: E402
from unimur.model.backbones.hub import llm_config  # noqa: E402
from unimur.model.backbones.registry import load_encoders, load_llm  # noqa: E402
from unimur.model.model import UniMuR  # noqa: E402
from unimur.model.tokenizer import build_tokenizer, tokenize_captions  # noqa: E402
from unimur.train.loss import UniMuRLoss  # noqa: E402

WORDS = "a large red circle on the left of a small blue square above a green star near the top".split()


def build(llm: str, visual: str, dtype: str, device: torch.device) -> UniMuR:
    """Random-init backbones of real shape, built on the device (no host copy, no hub)."""
    cfg = ModelConfig(llm=llm, visual_model=visual, llm_dtype=dtype)
    with torch.device(device):
        if llm == "tiny-opt":
            lm = load_llm(llm, dtype)
        else:
            from transformers import AutoModelForCausalLM

            lm = freeze(AutoModelForCausalLM.from_config(llm_config(llm), dtype=DTYPES[dtype]))
        enc = load_encoders(visual, weights=False)
    tok, ret_id = build_tokenizer("tiny-opt")  # GPT-2 BPE: OPT's vocabulary, no hub needed
    return UniMuR(cfg, lm, enc, tok, ret_id).to(device).train()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="facebook/opt-6.7b", help="an OPT id (shape from backbones.OPT_SHAPES) or tiny-opt")
    ap.add_argument("--visual-model", default="openai/clip-vit-large-patch14")
    ap.add_argument("--batch-size", type=int, default=30, help="per GPU (the seed's 120 over 4 GPUs)")
    ap.add_argument("--max-len", type=int, default=24)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM: 989)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-queries", type=int, default=64)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(args.llm, args.visual_model, args.dtype, dev)
    t_build = time.perf_counter() - t0
    b, k, L = args.batch_size, model.config.n_visual_tokens, args.max_len
    caps = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) for i in range(b)]
    tok = {n: t.to(dev) for n, t in tokenize_captions(model.tokenizer, caps, L, model.ret_id).items()}
    with torch.no_grad():
        pixels = torch.randn(b, 3, 224 if args.visual_model != "tiny-clip" else 32,
                             224 if args.visual_model != "tiny-clip" else 32, device=dev)
        feats, text = model.encode_images(pixels), model.encode_texts(caps)
    loss_fn = UniMuRLoss(LossConfig())
    opt = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-4)
    autocast = torch.autocast(dev.type, dtype=DTYPES[args.dtype]) if args.dtype != "fp32" else torch.autocast(dev.type, enabled=False)

    def step():
        with autocast:
            loss = loss_fn(model(feats, text, **tok))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.renorm_ret_embedding()

    llm, dtype = model.llm, model.llm.get_input_embeddings().weight.dtype
    h_in = llm.get_input_embeddings().embedding_dim
    cap_mask = torch.cat([torch.ones(b, k, dtype=torch.long, device=dev), tok["caption_mask"]], 1)
    labels = tok["caption_ids"].masked_fill(tok["caption_mask"] == 0, -100)

    def floor():
        x = torch.randn(b, cap_mask.shape[1], h_in, device=dev, dtype=dtype, requires_grad=True)
        h = llm.base_model(inputs_embeds=x, attention_mask=cap_mask).last_hidden_state[:, k - 1:-1]
        sel = labels != -100
        F.cross_entropy(llm.get_output_embeddings()(h[sel]).float(), labels[sel]).backward()
        with torch.no_grad():
            llm.base_model(inputs_embeds=torch.randn(b, tok["ret_ids"].shape[1], h_in, device=dev, dtype=dtype),
                           attention_mask=tok["ret_mask"])

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_floor, t_step = timed(floor, args.repeats), timed(step, args.repeats)
    # model FLOPs: frozen weights need no weight gradients, so a backward to the inputs costs
    # about one forward (2 N per token); the retrieval pass is a forward plus [RET]'s backward
    n = sum(p.numel() for n_, p in llm.named_parameters() if "embed" not in n_)
    cap_tokens, ret_tokens = int(cap_mask.sum()), int(tok["ret_mask"].sum())
    flops = 4 * n * cap_tokens + 2 * n * ret_tokens + 2 * n * b
    print(f"command: python benchmarks/gpu_check.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; llm {args.llm} "
          f"({n / 1e9:.2f} B non-embedding params, {args.dtype}), {args.visual_model}; batch {b}, "
          f"max_len {L}; built in {t_build:.0f} s")
    print(f"floor (LLM caption fwd + bwd-to-inputs, retrieval fwd): {t_floor * 1e3:8.1f} ms")
    print(f"full training step (cached CLIP features):             {t_step * 1e3:8.1f} ms  "
          f"ratio to floor {t_step / t_floor:.3f}")
    print(f"tokens/s (caption + retrieval passes): {(cap_tokens + ret_tokens) / t_step:,.0f}; "
          f"samples/s {b / t_step:.1f}")
    print(f"model FLOPs utilisation: {flops / t_step / (args.peak_tflops * 1e12) * 100:.1f}% of "
          f"{args.peak_tflops:g} TFLOP/s ({flops / 1e12:.2f} TFLOP per step)")
    if dev.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    # evaluation: unified embeddings of 10-round dialogue contexts, batched vs one at a time
    model.eval()
    rounds = " ".join(f"Q: is the {w} there? A: yes, it is {w}." for w in WORDS[:10])
    contexts = [[f"{i} {rounds}"] for i in range(args.eval_queries)]
    with torch.no_grad(), autocast:
        t_batched = timed(lambda: model.encode_context(contexts), 3, warmup=1)
        t_single = timed(lambda: [model.encode_context([c]) for c in contexts[:16]], 3, warmup=1) * len(contexts) / 16
    print(f"evaluation, {len(contexts)} dialogue queries: batched {len(contexts) / t_batched:.1f} queries/s, "
          f"one at a time {len(contexts) / t_single:.1f} queries/s (x{t_single / t_batched:.1f})")


if __name__ == "__main__":
    main()
