"""FROMAGe's training options: concatenated captions, [RET] read from several layers, and
"[RET]" typed in text staying text."""
import json

import pytest
import torch
import torch.nn.functional as F
from test_trainer import read_metrics, tiny_args, trainable

import main as main_module
from unimur.config import ModelConfig
from unimur.model.model import UniMuR
from unimur.model.packing import concat_pairs, concat_this_batch
from unimur.model.tokenizer import tokenize_captions


def test_concat_pairs_against_a_hand_built_batch():
    # 3 rows, right-padded: lengths 2, 3, 1 (the odd third row stays alone)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    ids = torch.tensor([[10, 11, 0], [20, 21, 22], [30, 0, 0]])
    labels = torch.tensor([[-100, 11, -100], [-100, 21, 22], [-100, -100, -100]])
    emb = ids[..., None].float().expand(-1, -1, 2)
    m, i, lab, e = concat_pairs(mask, ids, labels, emb, pad=(0, -100, 0.0))
    # trailing all-padding columns are trimmed: width = longest packed row (5)
    assert m.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert i.tolist() == [[10, 11, 20, 21, 22], [30, 0, 0, 0, 0]]
    assert lab.tolist() == [[-100, 11, -100, 21, 22], [-100, -100, -100, -100, -100]]
    assert torch.equal(e[..., 0], i.float())
    # positions count attended tokens only: the second example continues the first
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    assert pos[0, :5].tolist() == [0, 1, 2, 3, 4]


def test_concatenated_caption_nll_equals_the_hand_built_sequence(tiny_model):
    torch.manual_seed(0)
    model = tiny_model.eval()
    tok = tokenize_captions(model.tokenizer, ["a red square", "two big blue stars here", "a cat", "x"], 24,
                            model.ret_id)
    cap_in = torch.randn(4, model.cap_mapping.in_features)
    with torch.no_grad():
        nll, n_tok = model.caption_nll(cap_in, tok["caption_ids"], tok["caption_mask"], concat_captions=True)
        ref_nll, ref_n = 0.0, 0
        visual = model.map_images(cap_in)
        for a, b in ((0, 1), (2, 3)):  # image_a caption_a image_b caption_b, built by hand
            parts, targets = [], []
            for r in (a, b):
                n = int(tok["caption_mask"][r].sum())
                ids = tok["caption_ids"][r, :n]
                parts += [visual[r], model.embed_tokens(ids[None])[0]]
                # targets: caption tokens without the leading BOS, never the image position
                targets += [-100] + [-100] * len(model._bos_ids) + ids[len(model._bos_ids):].tolist()
            seq = torch.cat(parts)[None]
            hidden = model.run_llm(seq, torch.ones(1, seq.shape[1], dtype=torch.long))[0]
            labels = torch.tensor(targets)
            keep = labels[1:] != -100
            logits = model.lm_logits(hidden[:-1][keep])
            ref_nll += F.cross_entropy(logits, labels[1:][keep], reduction="sum")
            ref_n += int(keep.sum())
    assert int(n_tok) == ref_n
    assert torch.allclose(nll, ref_nll, rtol=1e-5)


def test_coin_is_a_function_of_seed_and_batch():
    coins = [concat_this_batch(0.5, 3, b, 0) for b in range(200)]
    assert coins == [concat_this_batch(0.5, 3, b, 0) for b in range(200)]
    assert 70 < sum(coins) < 130
    assert not any(concat_this_batch(0.0, 3, b, 0) for b in range(50))
    assert all(concat_this_batch(1.0, 3, b, 0) for b in range(50))


def test_text_emb_layers_minus_one_is_todays_model(tiny_backbones):
    llm, enc, tok, ret_id = tiny_backbones
    models = []
    for layers in ((-1,), (2,)):  # tiny-opt has 2 layers: layer 2 is the last one
        torch.manual_seed(0)
        models.append(UniMuR(ModelConfig(llm="tiny-opt", visual_model="tiny-clip", text_emb_layers=layers),
                             llm, enc, tok, ret_id).eval())
    keys = set(models[0].trainable_state_dict())
    assert keys == {"ret_embedding", "logit_scale", "cap_mapping.weight", "cap_mapping.bias",
                    "unified_mapping.weight", "unified_mapping.bias"}
    assert keys == set(models[1].trainable_state_dict())
    ctx = [["Q: is it red? A: yes."], ["a green star"]]
    assert torch.equal(models[0].encode_context(ctx), models[1].encode_context(ctx))


def test_two_layers_sum_two_mappings(tiny_backbones):
    llm, enc, tok, ret_id = tiny_backbones
    torch.manual_seed(0)
    model = UniMuR(ModelConfig(llm="tiny-opt", visual_model="tiny-clip", text_emb_layers=(-1, 1)),
                   llm, enc, tok, ret_id)
    assert "extra_unified_mappings.0.weight" in model.trainable_state_dict()
    t = tokenize_captions(tok, ["a red square", "two blue stars"], 24, ret_id)
    ids, mask = t["ret_ids"], t["ret_mask"]
    with torch.no_grad():
        out = llm.base_model(inputs_embeds=model.embed_tokens(ids), attention_mask=mask,
                             output_hidden_states=True)
        last = mask.sum(1) - 1
        rows = torch.arange(2)
        ref = F.normalize(model.unified_mapping(out.last_hidden_state[rows, last])
                          + model.extra_unified_mappings[0](out.hidden_states[1][rows, last]), dim=-1)
        assert torch.allclose(model.unified_from_tokens(ids, mask), ref, atol=1e-6)
    u_grad = model.unified_from_tokens(ids, mask)  # training path: [RET] on the cached caption
    assert torch.allclose(u_grad.detach(), ref, atol=1e-5)
    u_grad.sum().backward()
    assert model.extra_unified_mappings[0].weight.grad.abs().sum() > 0


def test_ret_typed_in_text_is_text(tiny_model):
    tok = tiny_model.tokenizer
    t = tokenize_captions(tok, ["a [RET] in a caption", "plain"], 24, tiny_model.ret_id)
    ret_positions = (t["ret_ids"] == tiny_model.ret_id).nonzero()[:, 1].tolist()
    ends = (t["ret_mask"].sum(1) - 1).tolist()
    assert ret_positions == ends  # only the appended [RET], at the end of each row
    assert (t["caption_ids"] != tiny_model.ret_id).all()
    assert tiny_model.ret_id not in tok("Q: what is [RET]? A: text.")["input_ids"]
    with torch.no_grad():  # a query containing "[RET]" still embeds (one [RET] at the end)
        assert tiny_model.encode_context([["what does [RET] mean?"]]).shape[0] == 1


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from unimur.data.synthetic.generator import generate

    return generate(tmp_path_factory.mktemp("syn"), seed=0, n_train=96, n_val=32, n_visdial=4, n_mmdialog=4,
                    image_size=32, n_negatives=8)


def test_exact_resume_with_concatenated_captions(synthetic, tmp_path):
    full = tiny_args(synthetic, tmp_path, "full", "--epochs=2", "--concat-captions-prob=0.5")
    main_module.main(full)
    half = tiny_args(synthetic, tmp_path, "half", "--epochs=1", "--concat-captions-prob=0.5")
    main_module.main(half)
    main_module.main([*tiny_args(synthetic, tmp_path, "half", "--epochs=2", "--concat-captions-prob=0.5"),
                      "--resume=latest"])
    coins = [r["concat_captions"] for r in read_metrics(tmp_path / "full")]
    assert set(coins) == {0.0, 1.0}  # both kinds of step happened
    assert coins == [r["concat_captions"] for r in read_metrics(tmp_path / "half")]
    a, b = trainable(tmp_path / "full"), trainable(tmp_path / "half")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_evaluate_mode_validates_the_checkpoint_and_exits(synthetic, tmp_path):
    main_module.main(tiny_args(synthetic, tmp_path, "run", "--epochs=1"))
    run = tmp_path / "run"
    before = {p.name: p.stat().st_mtime_ns for p in run.glob("ckpt*.pth.tar")}
    metrics = main_module.main([*tiny_args(synthetic, tmp_path, "run", "--epochs=1"), "-e",
                                f"--resume={run / 'ckpt_best.pth.tar'}"])
    out = json.loads((run / "eval_step3.json").read_text())
    assert out["metrics"]["score"] == pytest.approx(metrics["score"])
    assert out["metrics"]["score"] == pytest.approx(read_metrics(run, "val")[-2]["score"])  # same as in training
    assert before == {p.name: p.stat().st_mtime_ns for p in run.glob("ckpt*.pth.tar")}  # untouched


def test_pruned_model_carries_text_emb_layers(tiny_backbones, tmp_path):
    from unimur.model.pretrained import save_pretrained

    llm, enc, tok, ret_id = tiny_backbones
    torch.manual_seed(0)
    cfg = ModelConfig(llm="tiny-opt", visual_model="tiny-clip", text_emb_layers=(-1, 1))
    model = UniMuR(cfg, llm, enc, tok, ret_id).eval()
    save_pretrained(cfg, model.trainable_state_dict(), tok, ret_id, tmp_path / "m")
    loaded = UniMuR.from_pretrained(tmp_path / "m")
    assert loaded.config.text_emb_layers == (-1, 1)
    ctx = [["Q: is it red? A: yes."], ["a green star"]]
    assert torch.allclose(loaded.encode_context(ctx), model.encode_context(ctx), atol=1e-6)
