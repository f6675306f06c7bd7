"""Shared fixtures. Tests never reach a model hub: HF_HUB_OFFLINE is set before any import."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end tests (run with UNIMUR_SLOW_TESTS=1)")


@pytest.fixture(scope="session")
def tiny_model_config():
    from unimur.config import ModelConfig

    return ModelConfig(llm="tiny-opt", visual_model="tiny-clip")


@pytest.fixture(scope="session")
def tiny_backbones():
    """(llm, encoders, tokenizer, ret_id): built once; frozen, so safe to share."""
    from unimur.backbones import load_encoders, load_llm
    from unimur.tokenizer import build_tokenizer

    tok, ret_id = build_tokenizer("tiny-opt")
    return load_llm("tiny-opt"), load_encoders("tiny-clip"), tok, ret_id


@pytest.fixture
def tiny_model(tiny_model_config, tiny_backbones):
    from unimur.model import UniMuR

    llm, enc, tok, ret_id = tiny_backbones
    torch.manual_seed(0)
    return UniMuR(tiny_model_config, llm, enc, tok, ret_id)
