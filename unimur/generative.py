"""FROMAGe's inference, as FROMAGe answers from a candidate pool (SPEC section 4, "Baselines run
their own way"):

* text responses are ranked by the frozen LLM's log-likelihood given the context
  (`candidate_log_likelihoods`): a generative model without a text embedding space;
* an image is shown only when the model generates `[RET]` after the context
  (`generates_ret`): greedy decoding, the next token or within the first N generated ones.

Both read the context the way `UniMuR.encode_context` does (BOS, text tokens, k mapped
embeddings per image), without the final `[RET]`. The context's key/value cache is computed
once and reused for its whole candidate pool.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import Piece, UniMuR, _cache_kwarg, _output_cache, pad_embeddings


def _context_pass(model: UniMuR, context: Sequence[Piece], max_len: int | None):
    """(last-position log-probs (V,), cache, T) of one context."""
    seq = model._context_embeddings(context, max_len, with_ret=False)[None]      # (1, T, H_in)
    t = seq.shape[1]
    out = model.llm.base_model(inputs_embeds=seq.to(model._llm_dtype),
                               attention_mask=torch.ones(1, t, dtype=torch.long, device=model.device),
                               position_ids=torch.arange(t, device=model.device)[None], use_cache=True)
    first = F.log_softmax(model.lm_logits(out.last_hidden_state[0, -1]).float(), dim=-1)
    return first, _output_cache(out), t


@torch.no_grad()
def candidate_log_likelihoods(model: UniMuR, context: Sequence[Piece], candidates: Sequence[str],
                              batch_size: int = 64, max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """log p(candidate | context) under the frozen LLM, per candidate: (sum, mean per token),
    each (C,). A candidate with no tokens scores -inf on both."""
    first, cache, t = _context_pass(model, context, max_len)
    body = model.llm.base_model
    tokens = [model.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
    sums = torch.full((len(candidates),), float("-inf"))
    means = sums.clone()
    pad = model.tokenizer.pad_token_id
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        b, width = len(chunk), max(1, max(len(x) for x in chunk))
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, x in enumerate(chunk):
            ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x, dtype=torch.long), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        past = copy.deepcopy(cache)  # the candidate pass appends to it
        past.batch_repeat_interleave(b)
        hidden = body(inputs_embeds=model.embed_tokens(ids).to(model._llm_dtype),
                      attention_mask=torch.cat([mask.new_ones(b, t), mask], dim=1),
                      position_ids=(t + torch.arange(width, device=model.device)).expand(b, -1),
                      use_cache=True, **{_cache_kwarg(body): past}).last_hidden_state  # (b, W, H)
        # token 0 is predicted by the context's last position, token j by candidate position j-1;
        # the vocabulary-wide logits only where a candidate token follows (not over padding)
        lp = torch.zeros(b, width, device=model.device)
        lp[:, 0] = first[ids[:, 0]]
        follows = mask[:, 1:].bool()                                                 # (b, W-1)
        rest = F.log_softmax(model.lm_logits(hidden[:, :-1][follows]).float(), dim=-1)  # (n, V)
        lp[:, 1:][follows] = rest.gather(-1, ids[:, 1:][follows][:, None])[:, 0]
        lp = lp * mask
        n = mask.sum(1)
        s = lp.sum(1).cpu()
        has = (n > 0).cpu()
        sums[start : start + b] = torch.where(has, s, sums[start : start + b])
        means[start : start + b] = torch.where(has, s / n.clamp(min=1).cpu(), means[start : start + b])
    return sums, means


@torch.no_grad()
def generates_ret(model: UniMuR, contexts: Sequence[Sequence[Piece]], within: int = 0,
                  max_len: int | None = None) -> Tensor:
    """(B,) bool: greedy decoding after each context produces `[RET]` as its next token, or
    within the first `within` further tokens (FROMAGe shows an image only then)."""
    # left padding: every context's next token is at the same column
    inputs, mask = pad_embeddings([model._context_embeddings(c, max_len, with_ret=False) for c in contexts],
                                  "left")
    b = inputs.shape[0]
    body = model.llm.base_model
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    out = body(inputs_embeds=inputs.to(model._llm_dtype), attention_mask=mask, position_ids=position,
               use_cache=True)
    found = torch.zeros(b, dtype=torch.bool, device=model.device)
    for step in range(within + 1):
        nxt = model.lm_logits(out.last_hidden_state[:, -1]).argmax(-1)             # (B,)
        found |= nxt == model.ret_id
        if step == within or bool(found.all()):
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        position = position[:, -1:] + 1
        out = body(inputs_embeds=model.embed_tokens(nxt[:, None]).to(model._llm_dtype), attention_mask=mask,
                   position_ids=position, use_cache=True, **{_cache_kwarg(body): _output_cache(out)})
    return found.cpu()
