"""Training-step cost versus its floor, and the feature cache versus recomputing CLIP.

The unavoidable cost of a UniMuR step is the frozen LLM's work on the step's token batches:
the captioning pass (k visual positions + caption, CE on caption tokens through the LM head),
forward and backward to its inputs since W_cap feeds the first position; and the retrieval
pass (caption + [RET], hidden state at [RET]), a forward only, since its one trainable input
is the last position. `floor` times exactly that with the plain Hugging Face model on random
input embeddings. `retrieval pass` compares our retrieval pass (caption once without autograd,
then [RET] on its key/value cache) with the plain one that back-propagates through every
position. `step` is a full training step with cached CLIP features (forward, loss,
backward, AdamW, [RET] renorm). `step_recompute` also re-encodes the images and captions
with the frozen encoders every step (FROMAGe's way). All figures are ratios within one run.

    python benchmarks/bench_train_step.py                         # tiny-opt + tiny-clip
    python benchmarks/bench_train_step.py --llm smollm2-135m --visual-model efficientnet-lite0 \
        --text-model all-minilm-l6-v2 --target-proj linear
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from unimur.config import LossConfig, ModelConfig  # noqa: E402
from unimur.model.model import UniMuR  # noqa: E402
from unimur.model.tokenizer import tokenize_captions  # noqa: E402
from unimur.train.loss import UniMuRLoss  # noqa: E402

WORDS = "a large red circle on the left of a small blue square above a green star near the top".split()


def captions(n: int, n_words: int) -> list[str]:
    """Long enough captions that every one is truncated to exactly max_len tokens."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(n_words)) for i in range(n)]


def timeit(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timeit_alternating(fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median time of each function, calling them in turn (f, g, f, g, ...): on a shared machine
    the load drifts, and timing one after the other in blocks would put the drift into the ratio."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="tiny-opt")
    ap.add_argument("--visual-model", default="tiny-clip")
    ap.add_argument("--text-model", default=None)
    ap.add_argument("--target-proj", default="none")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--llm-dtype", default="fp32")
    ap.add_argument("--l-cap", type=float, default=1.0,
                    help="caption loss weight; 0 skips the captioning pass (the demo's setting)")
    ap.add_argument("--step-only", action="store_true",
                    help="time only the floor and the cached-feature step (the ratio), nothing else")
    ap.add_argument("--compile", action="store_true",
                    help="also time the step and floor with the LLM's blocks compiled (main.py --compile)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)

    cfg = ModelConfig(llm=args.llm, visual_model=args.visual_model, text_model=args.text_model,
                      target_proj=args.target_proj, llm_dtype=args.llm_dtype)
    model = UniMuR.build(cfg).to(dev).train()
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    b, k = args.batch_size, cfg.n_visual_tokens
    caps = captions(b, 40)
    # ids and masks stay on the host, as the trainer keeps them (the model moves them itself)
    tok = tokenize_captions(model.tokenizer, caps, args.max_len, model.ret_id)
    assert int(tok["ret_mask"].sum(1).min()) == args.max_len, "captions shorter than max_len"
    size = getattr(model.encoders.preprocess.transforms[1], "size", (224, 224))
    images = [Image.new("RGB", (256, 256), (i * 13 % 255, 90, 200)) for i in range(b)]
    pixels = torch.stack([model.encoders.preprocess(im) for im in images]).to(dev)
    feats, text = model.encode_images(pixels), model.encode_texts(caps)
    loss_fn = UniMuRLoss(LossConfig(l_cap=args.l_cap))
    with_caption = args.l_cap > 0
    params = [p for _, p in model.trainable_named_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(recompute: bool = False):
        f, t = (model.encode_images(pixels), model.encode_texts(caps)) if recompute else (feats, text)
        loss = loss_fn(model(f, t, **tok, with_caption=with_caption))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.renorm_ret_embedding()

    llm = model.llm
    h_in = llm.get_input_embeddings().embedding_dim
    cap_mask = torch.cat([torch.ones(b, k, dtype=torch.long), tok["caption_mask"]], 1).to(dev)
    labels = tok["caption_ids"].masked_fill(tok["caption_mask"] == 0, -100).to(dev)
    ret_mask = tok["ret_mask"].to(dev)
    dtype = llm.get_input_embeddings().weight.dtype

    def floor():
        if with_caption:
            x_cap = torch.randn(b, cap_mask.shape[1], h_in, device=dev, dtype=dtype, requires_grad=True)
            h = llm.base_model(inputs_embeds=x_cap, attention_mask=cap_mask).last_hidden_state[:, k - 1:-1]
            sel = labels != -100
            F.cross_entropy(llm.get_output_embeddings()(h[sel]).float(), labels[sel]).backward()
        with torch.no_grad():
            x_ret = torch.randn(b, tok["ret_ids"].shape[1], h_in, device=dev, dtype=dtype)
            llm.base_model(inputs_embeds=x_ret, attention_mask=ret_mask)

    def retrieval_pass(split: bool):
        ids, mask = tok["ret_ids"], tok["ret_mask"]
        if split:
            u = model.unified_from_tokens(ids, mask)
        else:  # the plain pass: autograd through every position
            ids, mask = ids.to(dev), mask.to(dev)
            u = model.unified_from_hidden(model.run_llm(model.embed_tokens(ids), mask), mask)
        u.pow(2).sum().backward()
        model.zero_grad(set_to_none=True)

    t_floor, t_step = timeit_alternating([floor, step], args.repeats)
    print(f"command: python benchmarks/bench_train_step.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"floor {t_floor * 1e3:.1f} ms, full step (cached CLIP features) {t_step * 1e3:.1f} ms: "
          f"step/floor {t_step / t_floor:.3f} (medians of {args.repeats}, called in turn)")
    if args.step_only:
        return
    t_recompute = timeit(lambda: step(recompute=True), args.repeats)
    t_ret_split = timeit(lambda: retrieval_pass(True), args.repeats)
    t_ret_full = timeit(lambda: retrieval_pass(False), args.repeats)
    if args.compile:
        from unimur.model.backbones.hub import compile_llm

        compile_llm(llm)
        t0 = time.perf_counter()
        floor(), step()  # the first calls compile
        t_compile = time.perf_counter() - t0
        t_floor_c, t_step_c = timeit(floor, args.repeats), timeit(step, args.repeats)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_train = sum(p.numel() for p in params)
    emb = llm.get_input_embeddings().weight
    print(f"config: llm={args.llm} visual={args.visual_model} text={args.text_model} target_proj={args.target_proj} "
          f"batch={b} max_len={args.max_len} device={dev} threads={torch.get_num_threads()} "
          f"image={tuple(pixels.shape[1:])} preprocess_size={size}")
    print(f"floor (caption pass fwd+bwd{'' if with_caption else ': skipped, l_cap=0'}; retrieval pass fwd): "
          f"{t_floor * 1e3:8.1f} ms")
    print(f"full step, cached CLIP features:                    {t_step * 1e3:8.1f} ms  ratio to floor {t_step / t_floor:.3f}")
    print(f"full step, CLIP recomputed every step:              {t_recompute * 1e3:8.1f} ms  ratio to cached {t_recompute / t_step:.3f}")
    print(f"samples/s (cached): {b / t_step:.1f}")
    if args.compile:
        print(f"--compile (LLM blocks; first calls {t_compile:.0f} s): floor {t_floor_c * 1e3:.1f} ms, step "
              f"{t_step_c * 1e3:.1f} ms, ratio to compiled floor {t_step_c / t_floor_c:.3f}; "
              f"step eager / compiled x{t_step / t_step_c:.2f}")
    print(f"retrieval pass fwd+bwd, [RET] on cached prefix:     {t_ret_split * 1e3:8.1f} ms; "
          f"autograd through every position {t_ret_full * 1e3:8.1f} ms (x{t_ret_full / t_ret_split:.2f})")
    print(f"trainable params {n_train:,} ({n_train * 4 / 2**20:.2f} MB fp32, AdamW state {2 * n_train * 4 / 2**20:.2f} MB); "
          f"FROMAGe-style trainable embedding matrix {emb.numel():,} "
          f"({emb.numel() * 4 / 2**20:.1f} MB fp32, AdamW state {2 * emb.numel() * 4 / 2**20:.1f} MB): "
          f"x{(emb.numel() + n_train) / n_train:.1f} parameters")
    if dev.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    else:
        print(f"peak RSS: {rss_peak / 1024:.0f} MiB (after model load {rss_model / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
