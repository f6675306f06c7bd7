"""The LLM loads through one `from_pretrained` path on every device (issue 26).

A GPU run passes `device_map` to `from_pretrained`, which needs `accelerate`; the CPU takes the
very same arguments, so a broken or missing dependency of that path fails here first. The folder
is a small random-init OPT written with `save_pretrained`, loaded the way the trainer does
(`UniMuR.build` -> `backbones.load_llm`), with no stub in between.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    from transformers import OPTForCausalLM

    from unimur.model.backbones.hub import tiny_opt_config
    from unimur.model.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("opt")
    torch.manual_seed(1)
    reference = OPTForCausalLM(tiny_opt_config()).eval()
    reference.save_pretrained(folder)
    tok, _ = build_tokenizer("tiny-opt")  # GPT-2 BPE, as OPT's own tokenizer; saved beside the weights
    tok.save_pretrained(folder)
    return folder, reference


def test_folder_loads_through_the_training_path(opt_folder):
    from unimur.config import ModelConfig
    from unimur.model.model import UniMuR

    folder, reference = opt_folder
    model = UniMuR.build(ModelConfig(llm=str(folder), visual_model="tiny-clip"), device=torch.device("cpu"))
    loaded = model.llm.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(loaded[name], value), name
    assert not any(p.requires_grad for p in model.llm.parameters()) and not model.llm.training
    ids = torch.tensor([[2, 100, 200, 300]])
    with torch.no_grad():
        assert torch.allclose(model.llm(ids).logits, reference(ids).logits)


def test_accelerate_is_a_core_dependency():
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].split("<")[0].strip() == "accelerate" for d in core)
    reqs = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert any(r.startswith("accelerate") for r in reqs)


def test_without_accelerate_the_cpu_fails_like_a_gpu(opt_folder):
    folder, _ = opt_folder
    code = ("import sys; sys.modules['accelerate'] = None\n"  # hidden, as on a machine without it
            "from unimur.model.backbones.registry import load_llm\n"
            f"load_llm({str(folder)!r}, device='cpu')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "accelerate" in done.stderr
