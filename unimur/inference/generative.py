"""FROMAGe's inference, as FROMAGe answers from a candidate pool (SPEC section 4, "Baselines run
their own way"):

* text responses are ranked by the frozen LLM's log-likelihood given the context
  (`candidate_log_likelihoods`): a generative model without a text embedding space;
* an image is shown only when the model generates `[RET]` after the context
  (`generate_responses`): greedy decoding of up to 32 tokens cut at the first newline, the
  image retrieved with the hidden state of the generated `[RET]`.

Both read the context the way `UniMuR.encode_context` does (BOS, text tokens, k mapped
embeddings per image), without the final `[RET]`. The context's key/value cache is computed
once and reused for its whole candidate pool.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from unimur.model.model import Piece, UniMuR, cache_kwarg, output_cache, pad_embeddings


def _context_pass(model: UniMuR, context: Sequence[Piece], max_len: int | None):
    """(last-position log-probs (V,), cache, T) of one context."""
    seq = model._context_embeddings(context, max_len, with_ret=False)[None]      # (1, T, H_in)
    t = seq.shape[1]
    out = model.llm.base_model(inputs_embeds=seq.to(model._llm_dtype),
                               attention_mask=torch.ones(1, t, dtype=torch.long, device=model.device),
                               position_ids=torch.arange(t, device=model.device)[None], use_cache=True)
    first = F.log_softmax(model.lm_logits(out.last_hidden_state[0, -1]).float(), dim=-1)
    return first, output_cache(out), t


@torch.no_grad()
def candidate_log_likelihoods(model: UniMuR, context: Sequence[Piece], candidates: Sequence[str],
                              batch_size: int = 64, max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """log p(candidate | context) under the frozen LLM, per candidate: (sum, mean per token),
    each (C,). A candidate with no tokens scores -inf on both. FROMAGe ranks by the sum
    (``evals/eval_visdial_generation.py`` line 278). Candidates are scored as given: the
    caller lays them out after the prompt (`unimur.inference.prompting.candidate_text`). A context
    longer than ``max_len`` (default: the LLM's positions minus the longest candidate) keeps
    its most recent positions."""
    tokens = [model.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
    if max_len is None and model.max_positions is not None:  # the longest candidate must fit after it
        max_len = max(1, model.max_positions - max((len(x) for x in tokens), default=0))
    first, cache, t = _context_pass(model, context, max_len)
    body = model.llm.base_model
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
                      use_cache=True, **{cache_kwarg(body): past}).last_hidden_state  # (b, W, H)
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


@dataclass
class Generations:
    """What greedy decoding after each of B contexts produced (FROMAGe's image rule).

    ret: (B,) bool, a ``[RET]`` among the kept tokens; u: (B, E) unified embeddings read at the
    generated ``[RET]`` (zeros where there is none); texts: the decoded kept tokens."""

    ret: Tensor
    u: Tensor
    texts: list[str]

    @staticmethod
    def cat(parts: Sequence["Generations"], emb_dim: int) -> "Generations":
        if not parts:
            return Generations(torch.zeros(0, dtype=torch.bool), torch.zeros(0, emb_dim), [])
        return Generations(torch.cat([p.ret for p in parts]), torch.cat([p.u for p in parts]),
                           [t for p in parts for t in p.texts])


@torch.no_grad()
def generate_responses(model: UniMuR, contexts: Sequence[Sequence[Piece]], max_tokens: int = 32,
                       max_len: int | None = None) -> Generations:
    """Greedy decoding of up to ``max_tokens`` tokens after each context, as FROMAGe's
    ``generate_for_images_and_texts`` (``fromage/models.py`` lines 525-546) does it:

    * the tokens are cut at the first newline, except that a newline as the very first token
      cuts nothing (its loop leaves ``trunc_idx`` at 0 then; kept, as it favours the baseline);
    * the response shows an image when a ``[RET]`` is among the kept tokens, and the image is
      retrieved with the hidden state at that generated ``[RET]`` (the position where it is
      fed back), mapped by W_u: ``u`` here. Decoding of a row stops there (only the first
      ``[RET]`` is used, ``max_num_rets=1``), so ``texts`` ends at it.

    Contexts longer than ``max_len`` keep their most recent positions (default: the LLM's
    positions minus the generated tokens).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_len is None and model.max_positions is not None:
        max_len = max(1, model.max_positions - max_tokens - 1)
    out, mask, position = _prefill(model, contexts, max_len)
    b, dev = mask.shape[0], model.device
    newline = model.tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    kept: list[list[int]] = [[] for _ in range(b)]
    u = torch.zeros(b, model.emb_dim)
    ret = torch.zeros(b, dtype=torch.bool, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    newline_first = torch.zeros(b, dtype=torch.bool, device=dev)
    pending = torch.zeros(b, dtype=torch.bool, device=dev)  # [RET] fed last: read its state now
    for step in range(max_tokens + 1):
        hidden = out.last_hidden_state[:, -1:]                                       # (B, 1, H)
        if bool(pending.any()):
            _read_ret_states(model, out, mask, pending, u)
            done |= pending
            pending = torch.zeros_like(pending)
        if step == max_tokens or bool(done.all()):
            break
        nxt = model.lm_logits(hidden[:, 0]).argmax(-1)                               # (B,)
        is_newline = nxt == newline
        if step == 0:
            newline_first = is_newline
        cut = is_newline & ~newline_first & ~done
        live = ~done & ~cut
        for i in live.nonzero()[:, 0].tolist():
            kept[i].append(int(nxt[i]))
        pending = live & (nxt == model.ret_id)
        ret |= pending
        done |= cut
        out, mask, position = _feed_tokens(model, out, nxt, mask, position)
    texts = [model.tokenizer.decode(ids, skip_special_tokens=False) for ids in kept]
    return Generations(ret.cpu(), u, texts)


def _prefill(model: UniMuR, contexts: Sequence[Sequence[Piece]], max_len: int | None):
    """The contexts' forward pass with its key/value cache: (output, attention mask (B, T),
    position ids (B, T))."""
    # left padding: every context's next token is at the same column
    inputs, mask = pad_embeddings([model._context_embeddings(c, max_len, with_ret=False) for c in contexts],
                                  "left")
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.llm.base_model(inputs_embeds=inputs.to(model._llm_dtype), attention_mask=mask,
                               position_ids=position, use_cache=True, output_hidden_states=model._all_layers)
    return out, mask, position


def _read_ret_states(model: UniMuR, out, mask: Tensor, pending: Tensor, u: Tensor) -> None:
    """Write into ``u`` the unified embeddings read at the last position of the ``pending`` rows
    (where a generated [RET] was just fed back), mapped by W_u."""
    b = mask.shape[0]
    hidden = out.last_hidden_state[:, -1:]                                           # (B, 1, H)
    layers = [h[:, -1:] for h in out.hidden_states] if model._all_layers else None
    u_step = model.unified_from_hidden(hidden, mask.new_ones(b, 1), layers).float().cpu()
    u[pending.cpu()] = u_step[pending.cpu()]


def _feed_tokens(model: UniMuR, out, nxt: Tensor, mask: Tensor, position: Tensor):
    """Feed the chosen tokens ``nxt`` (B,) back, one step on the cache: (output, mask, position ids)."""
    body = model.llm.base_model
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    position = position[:, -1:] + 1
    out = body(inputs_embeds=model.embed_tokens(nxt[:, None]).to(model._llm_dtype), attention_mask=mask,
               position_ids=position, use_cache=True, output_hidden_states=model._all_layers,
               **{cache_kwarg(body): output_cache(out)})
    return out, mask, position
