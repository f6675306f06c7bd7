"""A FROMAGe-format checkpoint converts to a model that embeds exactly like the original."""
import json

import torch

from unimur.commands.convert_fromage import convert
from unimur.config import ModelConfig
from unimur.model.model import UniMuR


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


def test_bad_fromage_inputs_end_in_one_error_line_without_unsafe_advice(tmp_path):
    import argparse
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "fromage_model"
    args = {"opt_version": "tiny-opt", "visual_encoder": "tiny-clip", "shared_emb_dim": 16,
            "retrieval_token_idx": 5}

    def run() -> str:
        r = subprocess.run([sys.executable, "unimur/commands/convert_fromage.py", "--fromage-dir", str(src),
                            "--output", str(tmp_path / "out")], cwd=root, capture_output=True, text=True,
                           env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "weights_only=False" not in r.stderr and not (tmp_path / "out").exists()
        return r.stderr

    assert "model_args.json not found" in run()                       # no folder at all
    src.mkdir()
    (src / "model_args.json").write_text("{not json")
    assert "not a JSON file" in run()
    (src / "model_args.json").write_text(json.dumps({k: v for k, v in args.items() if k != "retrieval_token_idx"}))
    assert "no retrieval_token_idx" in run()
    (src / "model_args.json").write_text(json.dumps(args))
    assert "pretrained_ckpt.pth.tar not found" in run()
    torch.save({"state_dict": {"x": torch.zeros(1)}}, src / "pretrained_ckpt.pth.tar")
    assert "missing" in run()                                           # keys of another model
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, src / "pretrained_ckpt.pth.tar")
    err = run()
    assert "pickled Python objects (argparse.Namespace)" in err and "never loaded" in err
    (src / "pretrained_ckpt.pth.tar").write_bytes(b"PK\x03\x04 truncated")
    assert "not a readable torch checkpoint" in run()
