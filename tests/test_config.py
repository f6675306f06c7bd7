import json

import pytest

from unimur.config import Config, LossConfig, ModelConfig, fromage_preset


def test_json_round_trip_is_lossless():
    cfg = Config()
    cfg.model.llm = "tiny-opt"
    cfg.train.betas = (0.8, 0.9)
    cfg.train.loss.l_tm = 0.5
    back = Config.from_json(cfg.to_json())
    assert back == cfg
    assert back.to_json() == cfg.to_json()
    assert isinstance(back.train.betas, tuple) and isinstance(back.train.loss, LossConfig)


def test_unknown_keys_are_rejected_with_their_path():
    d = Config().to_dict()
    d["train"]["loss"]["l_xx"] = 1.0
    with pytest.raises(ValueError, match=r"config\.train\.loss: unknown key\(s\) \['l_xx'\]"):
        Config.from_dict(d)
    with pytest.raises(ValueError, match="unknown key"):
        Config.from_json(json.dumps({"modle": {}}))


def test_invalid_choices_are_rejected():
    with pytest.raises(ValueError, match="target_proj"):
        ModelConfig(target_proj="mlp")
    with pytest.raises(ValueError, match="fromage"):
        ModelConfig(method="fromage")  # needs target_proj=linear


def test_fromage_preset():
    model, loss = fromage_preset(ModelConfig(), LossConfig())
    assert (model.method, model.target_proj, model.shared_emb_dim) == ("fromage", "linear", 256)
    assert loss.l_tm == 0 and loss.l_lm == 1
