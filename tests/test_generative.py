"""FROMAGe's inference: likelihood ranking against a brute-force per-candidate pass without a
cache, and the [RET]-generation rule against a model whose [RET] logit is forced."""
import pytest
import torch
import torch.nn.functional as F

from unimur.inference.generative import candidate_log_likelihoods, generate_responses

CONTEXTS = [["Q: what color is the star? A: it's brown."],
            ["a picture of", torch.randn(64, generator=torch.Generator().manual_seed(0)), "two shapes"]]  # tiny-clip: 64-d W_cap input
CANDIDATES = ["a brown star", "two blue circles on a white background", "", "ok"]


def brute_force(model, context, text):
    """log p(text | context) from one full pass over context + text, no cache."""
    ctx = model._context_embeddings(context, None, with_ret=False)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    seq = torch.cat([ctx, model.embed_tokens(torch.tensor([ids]))[0]])[None]
    hidden = model.run_llm(seq, torch.ones(1, seq.shape[1], dtype=torch.long))[0]
    logp = F.log_softmax(model.lm_logits(hidden[len(ctx) - 1 : -1]).float(), dim=-1)
    return float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum()), len(ids)


@pytest.mark.parametrize("context", CONTEXTS)
def test_likelihood_equals_brute_force_without_cache(tiny_model, context):
    model = tiny_model.eval()
    with torch.no_grad():
        sums, means = candidate_log_likelihoods(model, context, CANDIDATES, batch_size=3)
        for i, text in enumerate(CANDIDATES):
            if not text:
                assert sums[i] == means[i] == float("-inf")
                continue
            ref, n = brute_force(model, context, text)
            assert sums[i].item() == pytest.approx(ref, rel=1e-4, abs=1e-4), text
            assert means[i].item() == pytest.approx(ref / n, rel=1e-4, abs=1e-4), text


@pytest.mark.parametrize("bias,expected", [(1e4, True), (-1e4, False)])
def test_ret_rule_follows_the_greedy_tokens(tiny_model, bias, expected, monkeypatch):
    model = tiny_model.eval()
    plain = model.lm_logits

    def forced(hidden):
        logits = plain(hidden)
        logits[..., model.ret_id] += bias
        return logits

    monkeypatch.setattr(model, "lm_logits", forced)
    got = generate_responses(model, CONTEXTS, max_tokens=4)
    assert got.ret.tolist() == [expected, expected]
    assert (got.u.norm(dim=-1) > 0.99).tolist() == [expected, expected]  # u only after a [RET]


def _reference(model, context, max_tokens, newline):
    """FROMAGe's rule one context at a time, without a cache: greedy tokens, the cut at the first
    newline (none when it is the very first token), and u read by a full pass over the context
    and the kept tokens up to the first [RET] (encode_context's read-out at that [RET])."""
    seq = model._context_embeddings(context, None, with_ret=False)[None]
    tokens = []
    for _ in range(max_tokens):
        h = model.run_llm(seq, torch.ones(1, seq.shape[1], dtype=torch.long))
        nxt = int(model.lm_logits(h[0, -1]).argmax())
        tokens.append(nxt)
        seq = torch.cat([seq, model.embed_tokens(torch.tensor([[nxt]]))], dim=1)
    if newline in tokens[1:] and tokens[0] != newline:
        tokens = tokens[: tokens.index(newline, 1)]
    if model.ret_id not in tokens:
        return False, None, tokens
    keep = tokens.index(model.ret_id) + 1
    full = torch.cat([model._context_embeddings(context, None, with_ret=False),
                      model.embed_tokens(torch.tensor([tokens[:keep]]))[0]])[None]
    mask = torch.ones(1, full.shape[1], dtype=torch.long)
    return True, model.unified_from_hidden(model.run_llm(full, mask), mask)[0], tokens[:keep]


# (step forced to a newline, step forced to [RET], expected: [RET] kept, tokens kept)
CASES = [(2, None, False, 2),   # cut at the newline: no [RET]
         (None, 1, True, 2),    # [RET] as the second token: u read there, decoding stops
         (0, 3, True, 4),       # a newline as the very first token cuts nothing (FROMAGe's loop)
         (1, 3, False, 1)]      # the newline comes first: the later [RET] is cut away


@pytest.mark.parametrize("newline_step,ret_step,ret,n_kept", CASES)
def test_generation_matches_greedy_decoding_without_cache(tiny_model, monkeypatch, newline_step, ret_step,
                                                          ret, n_kept):
    model = tiny_model.eval()
    plain = model.lm_logits
    newline = model.tokenizer("\n", add_special_tokens=False)["input_ids"][0]

    def forced(hidden):  # the decoding step is the number of calls so far
        logits = plain(hidden)
        logits[..., newline] -= 1e4
        logits[..., model.ret_id] -= 1e4
        if forced.calls == newline_step:
            logits[..., newline] += 2e4
        if forced.calls == ret_step:
            logits[..., model.ret_id] += 2e4
        forced.calls += 1
        return logits

    monkeypatch.setattr(model, "lm_logits", forced)
    with torch.no_grad():
        for ctx in CONTEXTS:
            forced.calls = 0
            want_ret, want_u, tokens = _reference(model, ctx, 6, newline)
            forced.calls = 0
            got = generate_responses(model, [ctx], max_tokens=6)
            assert (want_ret, len(tokens)) == (ret, n_kept)
            assert bool(got.ret[0]) == ret
            assert got.texts[0] == model.tokenizer.decode(tokens, skip_special_tokens=False)
            if ret:
                assert torch.allclose(got.u[0], want_u.float(), atol=1e-5)
            else:
                assert not got.u[0].any()


def test_generation_in_a_batch_equals_one_at_a_time(tiny_model):
    """Left padding and the per-row stop leave each context's result as it is alone."""
    model = tiny_model.eval()
    with torch.no_grad():
        batch = generate_responses(model, CONTEXTS, max_tokens=5)
        for i, ctx in enumerate(CONTEXTS):
            one = generate_responses(model, [ctx], max_tokens=5)
            assert batch.texts[i] == one.texts[0] and bool(batch.ret[i]) == bool(one.ret[0])
