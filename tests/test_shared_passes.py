"""Frozen passes shared across models (unimur/inference/frozen_pass_memo.py): same answers, computed once."""

import torch

from unimur.inference.embedder import ModelEmbedder
from unimur.inference.frozen_pass_memo import FrozenPassMemo, unified_from_prefix

CONTEXTS = [["what colour is the star? it is red."], ["hello"], ["a longer context about a blue circle on the left"]]


def _other_model(tiny_model):
    """A second model on the same frozen backbones: other trainable layers and [RET]."""
    import copy

    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for _, p in other.trainable_named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    other.llm = tiny_model.llm  # shared frozen LLM, as in a comparison
    return other


def test_ret_over_cached_prefix_equals_one_pass(tiny_model):
    memo = FrozenPassMemo()
    with torch.no_grad():
        want = tiny_model.encode_context(CONTEXTS)
    got = unified_from_prefix(tiny_model, CONTEXTS, memo)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert memo.stats["prefix_miss"] == 1 and len(memo.prefixes) == 1


def test_a_second_model_reuses_the_prefix_and_gets_its_own_answer(tiny_model):
    memo = FrozenPassMemo()
    other = _other_model(tiny_model)
    first = unified_from_prefix(tiny_model, CONTEXTS, memo)
    again = unified_from_prefix(tiny_model, CONTEXTS, memo)   # a hit: the stored cache is intact
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    mine = unified_from_prefix(other, CONTEXTS, memo)          # a hit with another [RET] and W_u
    assert memo.stats["prefix_hit"] == 2 and memo.stats["prefix_miss"] == 1
    fresh = unified_from_prefix(other, CONTEXTS, FrozenPassMemo())
    torch.testing.assert_close(mine, fresh, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(mine, other.encode_context(CONTEXTS), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mine, first, atol=1e-3)


def test_budget_stops_storing_but_never_changes_answers(tiny_model):
    memo = FrozenPassMemo(prefix_budget_bytes=1)
    a = unified_from_prefix(tiny_model, CONTEXTS, memo)
    b = unified_from_prefix(tiny_model, CONTEXTS, memo)
    assert not memo.prefixes and memo.stats["prefix_not_kept"] == 2
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_embedders_share_image_features(tiny_model, tmp_path):
    from PIL import Image

    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        paths.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.insert(1, tmp_path / "bad.jpg")
    memo = FrozenPassMemo()
    other = _other_model(tiny_model)
    plain, plain_skips = ModelEmbedder(other, batch_size=2, progress=False).embed_images(paths)
    ModelEmbedder(tiny_model, batch_size=2, progress=False, memo=memo).embed_images(paths)
    shared, shared_skips = ModelEmbedder(other, batch_size=2, progress=False, memo=memo).embed_images(paths)
    assert memo.stats["images_miss"] == 1 and memo.stats["images_hit"] == 1
    assert shared.ids == plain.ids and shared_skips == plain_skips and len(shared.ids) == 3
    assert shared.meta == plain.meta
    torch.testing.assert_close(shared.embeds, plain.embeds, atol=0, rtol=0)
    torch.testing.assert_close(shared.cap_features, plain.cap_features, atol=0, rtol=0)


def test_several_ret_layers_read_from_the_ret_pass(tiny_model_config, tiny_backbones):
    import dataclasses

    from unimur.model.model import UniMuR

    llm, enc, tok, ret_id = tiny_backbones
    torch.manual_seed(1)
    model = UniMuR(dataclasses.replace(tiny_model_config, text_emb_layers=(-1, 1)), llm, enc, tok, ret_id).eval()
    with torch.no_grad():
        want = model.encode_context(CONTEXTS)
    torch.testing.assert_close(unified_from_prefix(model, CONTEXTS, FrozenPassMemo()), want, atol=1e-5, rtol=1e-5)
