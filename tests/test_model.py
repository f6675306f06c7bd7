import pytest
import torch
import torch.nn.functional as F

from unimur.config import LossConfig, ModelConfig
from unimur.model.model import UniMuR, last_position, left_align
from unimur.model.tokenizer import tokenize_captions
from unimur.train.loss import UniMuRLoss

CAPTIONS = ["a red circle", "a large blue square on the left of a green star", "two yellow stars"]

EXPECTED_TRAINABLE = {
    "ret_embedding", "logit_scale", "cap_mapping.weight", "cap_mapping.bias",
    "unified_mapping.weight", "unified_mapping.bias",
}


def _batch(model, captions=CAPTIONS, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(captions), 3, 32, 32, generator=g)
    tok = tokenize_captions(model.tokenizer, captions, 24, model.ret_id)
    return model.encode_images(pixels), model.encode_texts(captions), tok


def test_one_step_changes_only_trainable_parameters(tiny_model):
    model = tiny_model.train()
    assert {n for n, _ in model.trainable_named_parameters()} == EXPECTED_TRAINABLE
    assert not model.llm.training and not model.encoders.training  # frozen stay in eval
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-2)
    feats, text, tok = _batch(model)
    terms = UniMuRLoss(LossConfig(l_lm=1.0))(model(feats, text, **tok, with_lm=True))
    terms["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == EXPECTED_TRAINABLE
    frozen = model.frozen_parameter_names()
    assert frozen and all(n.startswith(("llm.", "encoders.")) for n in frozen)
    assert all(model.get_parameter(n).grad is None for n in frozen)


def test_linear_target_projections_are_trainable(tiny_backbones):
    llm, enc, tok, ret_id = tiny_backbones
    model = UniMuR(ModelConfig(llm="tiny-opt", visual_model="tiny-clip", target_proj="linear",
                               shared_emb_dim=16), llm, enc, tok, ret_id)
    names = {n for n, _ in model.trainable_named_parameters()}
    assert {"image_proj.weight", "text_proj.weight"} <= names
    feats, text, tok_ = _batch(model)
    out = model(feats, text, **tok_)
    assert out.u.shape == out.v.shape == out.t.shape == (3, 16)


def test_caption_loss_counts_caption_tokens_only(tiny_model):
    """Reference: each caption alone through the plain HF forward, CE over its own tokens."""
    model = tiny_model.eval()
    feats, _, tok = _batch(model)
    cap_in = model.cap_input(feats)
    nll, n_tok = model.caption_nll(cap_in, tok["caption_ids"], tok["caption_mask"])
    ref, ref_n = 0.0, 0
    for i in range(len(CAPTIONS)):
        ids = tok["caption_ids"][i, : int(tok["caption_mask"][i].sum())]
        emb = torch.cat([model.map_images(cap_in[i : i + 1])[0], model.embed_tokens(ids[None])[0]])
        logits = model.llm(inputs_embeds=emb[None]).logits[0]  # plain HF forward, no padding
        k = model.config.n_visual_tokens
        ref += F.cross_entropy(logits[k - 1 : -1], ids, reduction="sum").item()
        ref_n += len(ids)
    assert int(n_tok) == ref_n
    assert abs(nll.item() - ref) < 1e-3 * max(1.0, ref)
    # padding content is irrelevant
    ids = tok["caption_ids"].masked_fill(tok["caption_mask"] == 0, 7)
    nll2, _ = model.caption_nll(cap_in, ids, tok["caption_mask"])
    assert torch.allclose(nll, nll2, atol=1e-4)


def test_ret_hidden_state_is_read_at_ret_position(tiny_model):
    model = tiny_model.eval()
    tok = tokenize_captions(model.tokenizer, CAPTIONS, 24, model.ret_id)
    ids, mask = tok["ret_ids"], tok["ret_mask"]
    with torch.no_grad():
        u_right = model.unified_from_tokens(ids, mask)
        # same sequences, left padded
        left_ids, left_mask = torch.full_like(ids, model.tokenizer.pad_token_id), torch.zeros_like(mask)
        for i in range(len(ids)):
            n = int(mask[i].sum())
            left_ids[i, -n:], left_mask[i, -n:] = ids[i, :n], 1
        u_left = model.unified_from_tokens(left_ids, left_mask)
        # reference: HF forward on each unpadded sequence, hidden state of its last token ([RET])
        ref = []
        for i in range(len(ids)):
            n = int(mask[i].sum())
            assert ids[i, n - 1] == model.ret_id
            out = model.llm(inputs_embeds=model.embed_tokens(ids[i : i + 1, :n]), output_hidden_states=True)
            ref.append(F.normalize(model.unified_mapping(out.hidden_states[-1][0, -1]), dim=-1))
    assert torch.allclose(u_right, u_left, atol=1e-5)
    assert torch.allclose(u_right, torch.stack(ref), atol=1e-5)
    assert last_position(left_mask).tolist() == [ids.shape[1] - 1] * len(ids)


def test_batched_context_encoding_equals_one_at_a_time(tiny_model):
    model = tiny_model.eval()
    feats, _, _ = _batch(model)
    img = model.cap_input(feats)
    contexts = [
        ["Q: what colour is it? A: red."],
        ["look at this", img[0], "and this one:", img[1], "which has more stars?"],
        [img[2]],
        ["a much longer dialogue context " * 4, img[1]],
    ]
    batched = model.encode_context(contexts)
    left = model.encode_context(contexts, padding_side="left")
    alone = torch.cat([model.encode_context([c]) for c in contexts])
    assert batched.shape == (4, model.emb_dim)
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)
    # a caption context equals the training path's unified embedding for "caption [RET]"
    tok = tokenize_captions(model.tokenizer, CAPTIONS[:1], 24, model.ret_id)
    with torch.no_grad():
        u_train = model.unified_from_tokens(tok["ret_ids"], tok["ret_mask"])
    assert torch.allclose(model.encode_context([[CAPTIONS[0]]]), u_train, atol=1e-5)


def test_ret_logit_is_tied_to_ret_embedding(tiny_model):
    h = torch.randn(5, tiny_model.llm.config.hidden_size)
    logits = tiny_model.lm_logits(h)
    assert torch.allclose(logits[:, tiny_model.ret_id], h @ tiny_model.ret_embedding, atol=1e-5)


def test_ret_embedding_initialised_from_mean_at_mean_norm(tiny_model):
    table = tiny_model.llm.get_input_embeddings().weight
    ret = tiny_model.ret_embedding.detach()
    assert torch.allclose(F.normalize(ret, dim=0), F.normalize(table.mean(0), dim=0), atol=1e-5)
    assert abs(ret.norm().item() - table.norm(dim=-1).mean().item()) < 1e-4


def _tiny_llama(tiny_backbones):
    """A Llama-family LLM (SmolLM2's architecture: RoPE, grouped KV heads) on the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, enc, tok, ret_id = tiny_backbones
    torch.manual_seed(1)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50272, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=256,
                                       pad_token_id=50256, bos_token_id=50256, eos_token_id=50256))
    llm.eval().requires_grad_(False)
    torch.manual_seed(0)
    return UniMuR(ModelConfig(llm="tiny-opt", visual_model="tiny-clip"), llm, enc, tok, ret_id)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_ret_pass_on_cached_prefix_equals_full_pass(arch, tiny_model, tiny_backbones):
    """Training runs the caption once without autograd and only [RET] with it. Reference: the
    plain full pass on the right-padded batch. Same u, same LMret loss, same gradients."""
    model = tiny_model if arch == "opt" else _tiny_llama(tiny_backbones)
    captions = CAPTIONS + ["stars", "a small pink hexagon at the top and a brown square below it"]
    tok = tokenize_captions(model.tokenizer, captions, 24, model.ret_id)
    ids, mask = tok["ret_ids"], tok["ret_mask"]
    w = torch.randn(len(captions), model.emb_dim, generator=torch.Generator().manual_seed(3))
    trainable = [model.ret_embedding, model.unified_mapping.weight]

    def grads_of(loss):
        for p in trainable:
            p.grad = None
        loss.backward()
        return [p.grad.clone() for p in trainable]

    u_fast, hidden, ids_run, mask_run = model.unified_from_tokens(ids, mask, return_hidden=True)
    assert last_position(mask_run).tolist() == [ids.shape[1] - 1] * len(captions)  # it ran split
    lm_fast, n_fast = model._token_nll(hidden[:, :-1], model.next_token_labels(ids_run, mask_run))
    g_fast = grads_of((u_fast * w).sum() + lm_fast)

    full = model.run_llm(model.embed_tokens(ids), mask)
    u_ref = model.unified_from_hidden(full, mask)
    lm_ref, n_ref = model._token_nll(full[:, :-1], model.next_token_labels(ids, mask))
    g_ref = grads_of((u_ref * w).sum() + lm_ref)

    assert int(n_fast) == int(n_ref)
    assert torch.allclose(u_fast, u_ref, atol=1e-5)
    assert torch.allclose(lm_fast, lm_ref, rtol=1e-5)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_left_align_moves_tokens_to_the_end():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8], [9, 0, 0, 0]])
    mask = (ids != 0).long()
    out_ids, out_mask = left_align(ids, mask)
    assert out_ids.masked_fill(out_mask == 0, 0).tolist() == [[0, 5, 6, 7], [5, 6, 7, 8], [0, 0, 0, 9]]
    assert torch.equal(left_align(out_ids, out_mask)[1], out_mask)  # idempotent
