"""Frozen passes shared by several models built on the same frozen backbones.

``benchmarks/compare_methods.py`` evaluates 15 models (methods, ablations, seeds) that differ only
in their small trainable layers: the frozen image encoder and the frozen LLM see the same inputs
in every one of them. A :class:`FrozenPassMemo` handed to each model's ``ModelEmbedder`` keeps
what those frozen parts computed, so each model pays only for its own layers:

* **image features**: the frozen encoder's outputs of one ``embed_images`` call (same encoder,
  same preprocessing, same files), per batch, before the model's own W_v / W_cap;
* **context prefixes**: the frozen LLM's key/value cache of a batch of contexts *without* the
  final [RET]. Under causal attention no position before [RET] sees [RET], so a model's unified
  embedding then needs one more position: [RET] over the cached context (`unified_from_prefix`).
  A context's embeddings depend on the model only through W_cap (its images), so text-only
  contexts (every VisDial dialogue) share one prefix pass across all models.

Keys hold every input of a pass (backbone identity, dtype, preprocessing, paths; the exact bytes
of the context embeddings), so a hit returns what the pass would compute again. Prefixes are
stored first come, first kept, up to a byte budget (no eviction: the contexts every model shares
are met first, and a full memo only stops saving time, never changes a result).

The [RET]-over-prefix pass computes the same function as one pass over context + [RET]
(`UniMuR.encode_context`), with other kernel shapes: equal to float rounding (tests check 1e-5),
and every model of a comparison goes through it, hit or miss, so they are compared alike.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from unimur.model.model import Piece, UniMuR, cache_kwarg, output_cache, pad_embeddings


@dataclass
class FrozenPassMemo:
    """What the frozen backbones computed, for models that share them (see the module doc)."""

    prefix_budget_bytes: int = 3 << 30
    images: dict[tuple, Any] = field(default_factory=dict)
    prefixes: dict[str, tuple[Any, Tensor]] = field(default_factory=dict)
    prefix_bytes: int = 0
    stats: Counter = field(default_factory=Counter)  # hits and misses, for the benchmark's log

    def keep_prefix(self, key: str, cache, mask: Tensor) -> bool:
        """Store a prefix unless the budget is spent; whether it was stored."""
        size = _cache_bytes(cache)
        if self.prefix_bytes + size > self.prefix_budget_bytes:
            self.stats["prefix_not_kept"] += 1
            return False
        self.prefixes[key] = (cache, mask)
        self.prefix_bytes += size
        return True


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


def llm_identity(model: UniMuR) -> str:
    """The frozen LLM (name and dtype) and the tokenizer size ([RET] appended): equal for
    models whose context passes are interchangeable."""
    return f"{model.config.llm}|{model.config.llm_dtype}|{len(model.tokenizer)}"


def _digest(identity: str, seqs: Sequence[Tensor]) -> str:
    h = hashlib.sha256(identity.encode())
    for s in seqs:
        x = s.detach().contiguous().cpu()
        h.update(f"{tuple(x.shape)}{x.dtype}".encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def unified_from_prefix(model: UniMuR, contexts: Sequence[Sequence[Piece]], memo: FrozenPassMemo
                        ) -> Tensor:
    """(B, E) unified embeddings of ``contexts``: the frozen LLM's pass over each context (from
    ``memo`` when another model already ran it), then the [RET] position over its cache."""
    limit = model.max_positions - 1 if model.max_positions else None  # room for [RET]
    seqs = [model._context_embeddings(c, limit, with_ret=False) for c in contexts]
    if any(s.shape[0] == 0 for s in seqs):  # nothing to cache (no BOS, empty context)
        return model.encode_context(contexts, max_len=model.max_positions)
    body = model.llm.base_model
    key = _digest(llm_identity(model), seqs)
    entry = memo.prefixes.get(key)
    memo.stats["prefix_hit" if entry is not None else "prefix_miss"] += 1
    if entry is None:
        inputs, mask = pad_embeddings(seqs, "right")  # the padded keys are masked for [RET]
        out = body(inputs_embeds=inputs.to(model._llm_dtype), attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        cache = output_cache(out)
        stored = memo.keep_prefix(key, cache, mask)
    else:
        (cache, mask), stored = entry, True
    past = copy.deepcopy(cache) if stored else cache  # the [RET] pass appends to it
    b = mask.shape[0]
    ret = model.ret_embedding.to(model._llm_dtype)[None, None].expand(b, 1, -1)
    all_layers = model._all_layers
    out = body(inputs_embeds=ret, attention_mask=torch.cat([mask, mask.new_ones(b, 1)], dim=1),
               position_ids=mask.sum(1, keepdim=True), use_cache=True, output_hidden_states=all_layers,
               **{cache_kwarg(body): past})
    one = mask.new_ones(b, 1)
    return model.unified_from_hidden(out.last_hidden_state, one, out.hidden_states if all_layers else None)
