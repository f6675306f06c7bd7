"""A FROMAGe-format checkpoint converts to a model that embeds exactly like the original."""
import json

import torch

from unimur.config import ModelConfig
from unimur.convert_fromage import convert
from unimur.model import UniMuR


def test_fromage_checkpoint_converts_to_identical_embeddings(tiny_backbones, tmp_path):
    llm, enc, tok, ret_id = tiny_backbones
    cfg = ModelConfig(method="fromage", llm="tiny-opt", visual_model="tiny-clip", target_proj="linear",
                      shared_emb_dim=16)
    torch.manual_seed(5)
    model = UniMuR(cfg, llm, enc, tok, ret_id).eval()
    sd = model.trainable_state_dict()
    table = llm.get_input_embeddings().weight.detach().clone()
    fromage_ret_idx = 50258  # FROMAGe adds <|image|> before [RET]: its id differs from ours
    table = torch.cat([table, torch.zeros(fromage_ret_idx + 1 - table.shape[0], table.shape[1])]) \
        if table.shape[0] <= fromage_ret_idx else table
    table[fromage_ret_idx] = sd["ret_embedding"]
    fromage_state = {  # key names as FROMAGe's prune_model_ckpt.py writes them (before its [RET] slice)
        "model.logit_scale": sd["logit_scale"],
        "model.visual_embeddings.weight": sd["cap_mapping.weight"], "model.visual_embeddings.bias": sd["cap_mapping.bias"],
        "model.visual_fc.weight": sd["image_proj.weight"], "model.visual_fc.bias": sd["image_proj.bias"],
        "model.text_hidden_fcs.0.0.weight": sd["unified_mapping.weight"],
        "model.text_hidden_fcs.0.0.bias": sd["unified_mapping.bias"],
        "model.input_embeddings.weight": table,
    }
    src = tmp_path / "fromage_model"
    src.mkdir()
    torch.save({"state_dict": fromage_state}, src / "pretrained_ckpt.pth.tar")
    (src / "model_args.json").write_text(json.dumps({
        "opt_version": "tiny-opt", "visual_encoder": "tiny-clip", "n_visual_tokens": 1,
        "shared_emb_dim": 16, "text_emb_layers": [-1], "retrieval_token_idx": fromage_ret_idx}))
    out = convert(src, tmp_path / "converted")
    loaded = UniMuR.from_pretrained(out)
    assert loaded.config.method == "fromage"
    ctx = [["Q: is it red? A: yes."], ["a green star"]]
    pix = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_context(ctx), model.encode_context(ctx), atol=1e-6)
        f = model.encode_images(pix)
        assert torch.allclose(loaded.image_targets(f), model.image_targets(f), atol=1e-6)
