"""`main.py --dry-run`: the memory a run will need, per GPU and per node, before it starts.

The model is built on the meta device from its config (`UniMuR.skeleton`: the OPT family and
open_clip's ViT configs need no hub), so the plan for OPT-6.7B + ViT-L/14 costs a second and
no memory. Figures:

* frozen LLM and CLIP weights in their storage dtypes (every rank holds both);
* trainable parameters, their gradients and AdamW's two moments, all fp32 (16 bytes each);
* activations of the step, estimated: the captioning pass back-propagates through every LLM
  layer for every caption token (per layer ``34*s*b*h + 5*a*s^2*b`` bytes at 16 bits, Korthikanti
  et al. 2022, doubled for fp32); the retrieval pass keeps its caption's key/value cache and
  back-propagates through one position; logits and their gradient in fp32 at the caption tokens;
* CLIP is on the GPU only while the feature cache is built (then moved off: training reads the
  cache); with --no-feature-cache it stays there;
* host RAM per node: on GPUs each rank loads the LLM's weights straight onto its device
  (`backbones.load_llm`: the weight files are memory-mapped, so the node's page cache holds about
  one copy, shared by its ranks); CLIP is read on the CPU by every rank before its move.

An estimate, not a measurement: allocator fragmentation and CUDA context (~0.5 GB) come on top.
"""
from __future__ import annotations

from pathlib import Path

from unimur.config import Config
from unimur.model.model import UniMuR

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 2**30


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


def memory_plan(cfg: Config, ranks_per_node: int, nodes: int = 1) -> dict[str, float]:
    """Bytes per GPU and per node for `cfg` (see the module docstring); the batch is global."""
    model = UniMuR.skeleton(cfg.model)
    llm_cfg = model.llm.config
    world = ranks_per_node * nodes
    b = max(1, cfg.train.batch_size // world)                    # per-GPU batch
    s = cfg.model.n_visual_tokens + cfg.data.max_len             # caption pass length
    h, layers = llm_cfg.hidden_size, llm_cfg.num_hidden_layers
    heads = llm_cfg.num_attention_heads
    scale = BYTES[cfg.train.precision] / 2                       # the formula is for 16-bit
    caption = 0.0
    if cfg.train.loss.l_cap:
        caption = layers * (34 * s * b * h + 5 * heads * s * s * b) * scale
    retrieval_kv = 2 * layers * b * cfg.data.max_len * h * BYTES[cfg.model.llm_dtype]
    retrieval_ret = layers * (34 * 1 * b * h + 5 * heads * cfg.data.max_len * b) * scale
    vocab = model.vocab_size
    logits = 2 * b * cfg.data.max_len * vocab * 4                # logits + their gradient, fp32
    trainable = sum(p.numel() for _, p in model.trainable_named_parameters())
    plan = {
        "per_gpu_batch": b,
        "frozen_llm": _n(model.llm) * BYTES[cfg.model.llm_dtype],
        "frozen_clip": _n(model.encoders) * BYTES[cfg.model.encoder_dtype],
        "trainable_params": trainable,
        "trainable_and_adamw": trainable * 16,
        "activations_caption_pass": caption,
        "activations_retrieval_pass": retrieval_kv + retrieval_ret,
        "logits": logits,
    }
    # with the feature cache CLIP leaves the GPU once the cache is built (trainer.Trainer)
    plan["frozen_clip_while_training"] = 0 if cfg.data.feature_cache else plan["frozen_clip"]
    plan["per_gpu_total"] = sum(plan[k] for k in ("frozen_llm", "frozen_clip_while_training", "trainable_and_adamw",
                                                   "activations_caption_pass", "activations_retrieval_pass",
                                                   "logits"))
    plan["per_gpu_cache_build"] = plan["frozen_llm"] + plan["frozen_clip"] + plan["trainable_and_adamw"]
    # LLM weights mmapped and streamed to each GPU (one page-cache copy per node); CLIP per rank
    plan["host_ram_per_node_peak"] = plan["frozen_llm"] + ranks_per_node * plan["frozen_clip"]
    return plan


def format_plan(plan: dict[str, float], cfg: Config, ranks_per_node: int, nodes: int,
                gpu_gib: float | None) -> str:
    rows = [
        ("frozen LLM weights", plan["frozen_llm"], f"{cfg.model.llm} in {cfg.model.llm_dtype}"),
        ("frozen CLIP weights", plan["frozen_clip_while_training"],
         f"{cfg.model.visual_model} in {cfg.model.encoder_dtype}"
         + (f": {plan['frozen_clip'] / GIB:.2f} GiB while the feature cache is built, then off the GPU"
            if cfg.data.feature_cache else "")),
        ("trainable + grads + AdamW", plan["trainable_and_adamw"],
         f"{plan['trainable_params']:,} parameters x 16 bytes (fp32)"),
        ("activations, captioning pass", plan["activations_caption_pass"],
         f"batch {plan['per_gpu_batch']} x {cfg.model.n_visual_tokens + cfg.data.max_len} tokens, every layer"
         if plan["activations_caption_pass"] else "off (--l-cap 0)"),
        ("activations, retrieval pass", plan["activations_retrieval_pass"], "caption KV cache + [RET]'s backward"),
        ("logits and their gradient", plan["logits"], "fp32 at the caption tokens"),
    ]
    lines = [f"memory plan (estimate): {nodes} node(s) x {ranks_per_node} GPU(s), global batch "
             f"{cfg.train.batch_size} -> {plan['per_gpu_batch']} per GPU, precision {cfg.train.precision}"]
    lines += [f"  {name:32s} {value / GIB:8.2f} GiB   {note}" for name, value, note in rows]
    lines.append(f"  {'per GPU, total':32s} {plan['per_gpu_total'] / GIB:8.2f} GiB"
                 + (f"   of {gpu_gib:.1f} GiB: {'fits' if plan['per_gpu_total'] / GIB < 0.9 * gpu_gib else 'does NOT fit'}"
                    f" (10% kept for the allocator and CUDA context)" if gpu_gib else ""))
    if cfg.data.feature_cache:
        lines.append(f"  {'per GPU, building the cache':32s} {plan['per_gpu_cache_build'] / GIB:8.2f} GiB   "
                     f"LLM + CLIP + trainable, before the first step (encoding batches come on top)")
    lines.append(f"  {'host RAM per node, peak':32s} {plan['host_ram_per_node_peak'] / GIB:8.2f} GiB   "
                 f"LLM weight files mapped once per node, streamed to each GPU; CLIP read by each of "
                 f"{ranks_per_node} rank(s)")
    return "\n".join(lines)


def format_run(cfg: Config, gpu, ranks_per_node: int, nodes: int, backend: str, timeout_min: float) -> str:
    """What the command will actually run: devices, precisions, where CLIP is, collectives."""
    t, m, d = cfg.train, cfg.model, cfg.data
    where = f"{gpu.name}, {gpu.arch}, {gpu.total_gib:.1f} GiB" if gpu else "no GPU found here: CPU, or GPUs of unknown type"
    autocast = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling", "fp32": "fp32, no autocast"}
    cache_dtype = d.cache_dtype or ("bf16" if t.precision == "bf16" else "fp16")
    lines = [f"run plan: {nodes} node(s) x {ranks_per_node} process(es) ({where}); {backend} collectives, "
             f"timeout {timeout_min:g} min",
             f"  precision {t.precision}: {autocast[t.precision]}; frozen LLM stored in {m.llm_dtype}, CLIP in "
             f"{m.encoder_dtype}; trainable layers, gradients and AdamW in fp32; TF32 matmuls on",
             "  CLIP features: " + (f"cached as {cache_dtype} in {Path(d.cache_dir or Path(d.dataset_dir) / '.feature_cache')}, "
                                    f"encoded once under {t.precision} autocast, then CLIP leaves the GPU"
                                    if d.feature_cache else "recomputed every step (--no-feature-cache)"),
             f"  frozen LLM forward: {'torch.compile' if t.compile else 'eager (--compile to compile it)'}"]
    return "\n".join(lines)
