"""FROMAGe's inference: likelihood ranking against a brute-force per-candidate pass without a
cache, and the [RET]-generation rule against a model whose [RET] logit is forced."""
import pytest
import torch
import torch.nn.functional as F

from unimur.generative import candidate_log_likelihoods, generates_ret

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
def test_ret_rule_follows_the_argmax_next_token(tiny_model, bias, expected, monkeypatch):
    model = tiny_model.eval()
    plain = model.lm_logits

    def forced(hidden):
        logits = plain(hidden)
        logits[..., model.ret_id] += bias
        return logits

    monkeypatch.setattr(model, "lm_logits", forced)
    assert generates_ret(model, CONTEXTS).tolist() == [expected, expected]


def test_ret_rule_matches_greedy_decoding(tiny_model):
    model = tiny_model.eval()
    with torch.no_grad():
        for within in (0, 3):
            got = generates_ret(model, CONTEXTS, within=within)
            for i, ctx in enumerate(CONTEXTS):  # greedy decoding one context at a time, no cache
                seq = model._context_embeddings(ctx, None, with_ret=False)[None]
                hit = False
                for _ in range(within + 1):
                    h = model.run_llm(seq, torch.ones(1, seq.shape[1], dtype=torch.long))
                    nxt = model.lm_logits(h[0, -1]).argmax()
                    hit |= bool(nxt == model.ret_id)
                    seq = torch.cat([seq, model.embed_tokens(nxt.view(1, 1))], dim=1)
                assert bool(got[i]) == hit
