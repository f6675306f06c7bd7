"""Paths the tiny test models never exercise: OpenAI CLIP's activation, pruning and converting
real architectures (built on the meta device, no weights), FROMAGe's embedding pickle and its
evaluation-time image resize."""
import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from unimur.commands.convert_fromage import convert
from unimur.config import Config, ModelConfig
from unimur.data.feature_cache import cache_key
from unimur.inference.image_embeddings import load_image_embeddings
from unimur.model.backbones.hub import llm_config, resolve_open_clip
from unimur.model.backbones.registry import load_encoders
from unimur.model.model import UniMuR
from unimur.model.tokenizer import _gpt2_bpe_dir
from unimur.train.export import prune


def activations(module: nn.Module) -> set[str]:
    return {type(m).__name__ for m in module.modules() if "GELU" in type(m).__name__}


@pytest.mark.parametrize("name", ["openai/clip-vit-large-patch14", "ViT-L-14:openai", "ViT-B-32:openai",
                                  "openai/clip-vit-base-patch32"])
def test_openai_weights_get_quick_gelu(name):
    with torch.device("meta"):  # real architecture, no weights, no memory
        enc = load_encoders(name, weights=False)
    assert activations(enc.clip) == {"QuickGELU"}
    assert "|quick_gelu" in enc.identity


def test_tag_trained_with_gelu_is_left_alone():
    with torch.device("meta"):
        enc = load_encoders("ViT-B-32:laion2b_s34b_b79k", weights=False)
    assert activations(enc.clip) == {"GELU"}
    assert "quick_gelu" not in enc.identity
    assert resolve_open_clip("ViT-B-32-quickgelu:metaclip_400m").quick_gelu  # the -quickgelu names


def test_activation_is_part_of_the_feature_cache_key():
    spec = resolve_open_clip("openai/clip-vit-large-patch14")
    gelu_identity = spec.identity.replace("|quick_gelu", "")  # what caches were keyed by before
    rows = []
    assert cache_key(SimpleNamespace(identity=spec.identity), rows, "fp16") != \
        cache_key(SimpleNamespace(identity=gelu_identity), rows, "fp16")


def test_paper_configuration_skeleton_builds_offline():
    model = UniMuR.skeleton(ModelConfig())  # facebook/opt-6.7b + ViT-L-14:openai, no hub
    shapes = {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    assert shapes["cap_mapping.weight"] == (4096, 1024)  # ViT-L/14 pooled 1024 -> OPT 4096
    assert shapes["unified_mapping.weight"] == (768, 4096)  # -> CLIP joint space
    assert 6.6e9 < sum(p.numel() for p in model.llm.parameters()) < 6.7e9
    assert activations(model.encoders.clip) == {"QuickGELU"}


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    """A local LLM folder with OPT-125m's real shapes (config only) and the GPT-2 BPE tokenizer."""
    from transformers import GPT2TokenizerFast

    d = tmp_path_factory.mktemp("opt-125m-shaped")
    llm_config("facebook/opt-125m").save_pretrained(d)
    GPT2TokenizerFast.from_pretrained(str(_gpt2_bpe_dir())).save_pretrained(d)
    return d


def random_trainable(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.02
            for k, v in UniMuR.skeleton(config).trainable_state_dict().items()}


def test_prune_a_checkpoint_of_a_real_architecture(opt_dir, tmp_path):
    config = ModelConfig(llm=str(opt_dir), visual_model="ViT-B-32:openai")
    state = random_trainable(config)
    ckpt = tmp_path / "ckpt_best.pth.tar"
    torch.save({"config": Config(model=config).to_dict(), "model": state}, ckpt)
    out = prune(ckpt, tmp_path / "unimur_model")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "tokenizer"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["cap_mapping.weight"] == [768, 768]  # ViT-B/32 pooled 768 -> OPT-125m 768
    assert manifest["parameters"]["unified_mapping.weight"] == [512, 768]  # -> ViT-B/32 joint space
    # a checkpoint whose weights do not fit its config is still refused
    state["unified_mapping.weight"] = torch.zeros(256, 768)
    torch.save({"config": Config(model=config).to_dict(), "model": state}, ckpt)
    with pytest.raises(ValueError, match="unified_mapping.weight"):
        prune(ckpt, tmp_path / "bad")


def test_convert_a_fromage_model_of_a_real_architecture(opt_dir, tmp_path):
    config = ModelConfig(method="fromage", llm=str(opt_dir), visual_model="openai/clip-vit-base-patch32",
                         target_proj="linear")
    ours = random_trainable(config, seed=1)
    fromage = {  # FROMAGe's pruned layout (its prune_model_ckpt.py keeps only [RET]'s row)
        "model.logit_scale": ours["logit_scale"],
        "model.visual_embeddings.weight": ours["cap_mapping.weight"],
        "model.visual_embeddings.bias": ours["cap_mapping.bias"],
        "model.visual_fc.weight": ours["image_proj.weight"], "model.visual_fc.bias": ours["image_proj.bias"],
        "model.text_hidden_fcs.0.0.weight": ours["unified_mapping.weight"],
        "model.text_hidden_fcs.0.0.bias": ours["unified_mapping.bias"],
        "ret_input_embeddings.weight": ours["ret_embedding"][None],
    }
    src = tmp_path / "fromage_model"
    src.mkdir()
    torch.save({"state_dict": fromage}, src / "pretrained_ckpt.pth.tar")
    (src / "model_args.json").write_text(json.dumps({
        "opt_version": str(opt_dir), "visual_encoder": "openai/clip-vit-base-patch32", "n_visual_tokens": 1,
        "shared_emb_dim": 256, "text_emb_layers": [-1], "retrieval_token_idx": 50266}))
    out = convert(src, tmp_path / "fromage_unimur")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "tokenizer"]
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    assert got.keys() == ours.keys()
    for k in ours:
        assert torch.equal(got[k], ours[k]), k


def test_fromage_pickle_rows_are_l2_normalised_and_rank_by_cosine(tmp_path):
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    norms = torch.empty(50).uniform_(0.9, 15, generator=g)  # as in a FROMAGe file
    stored = directions * norms[:, None]
    path = tmp_path / "cc3m_embeddings.pkl"
    path.write_bytes(pickle.dumps({"paths": [f"{i}.jpg" for i in range(50)], "embeddings": stored.numpy()}))
    emb = load_image_embeddings(path, allow_pickle=True)
    assert torch.allclose(emb.embeds.norm(dim=-1), torch.ones(50), atol=1e-5)
    queries = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=-1)
    cosine_order = torch.argsort(queries @ directions.T, dim=1, descending=True)
    assert torch.equal(torch.argsort(queries @ emb.embeds.T, dim=1, descending=True), cosine_order)
    # the raw dot product the file would give unnormalised ranks differently (the test can fail)
    assert not torch.equal(torch.argsort(queries @ stored.T, dim=1, descending=True)[:, 0], cosine_order[:, 0])


def test_squash_resize_is_fromages_whole_image_resize(tiny_model, tmp_path):
    from PIL import Image

    from unimur.inference.embedder import ModelEmbedder

    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(40, 90, 3, generator=g) * 255).byte().numpy())  # wide: crop != squash
    img.save(tmp_path / "wide.png")
    prep = tiny_model.encoders.preprocess
    crop = ModelEmbedder(tiny_model, progress=False).embed_images([tmp_path / "wide.png"])[0]
    squash = ModelEmbedder(tiny_model, progress=False, image_resize="squash").embed_images([tmp_path / "wide.png"])[0]
    with torch.no_grad():
        expected = tiny_model.image_targets(tiny_model.encode_images(prep(img.resize((32, 32), Image.BICUBIC))[None]))
    assert torch.allclose(squash.embeds, expected, atol=1e-6)
    assert not torch.allclose(crop.embeds, expected, atol=1e-3)
    with pytest.raises(ValueError, match="image_resize"):
        ModelEmbedder(tiny_model, image_resize="stretch")


def test_dry_run_plans_the_seed_command_without_weights(tmp_path, capsys):
    from test_trainer import SEED_COMMAND

    import main as main_module

    argv = [a.replace("exp_log/", f"{tmp_path}/exp_log/") for a in SEED_COMMAND]
    plan = main_module.main([*argv, "--dry-run", "--nprocs", "4", "--gpu-memory", "32"])
    assert plan["per_gpu_batch"] == 30  # the seed's 120 over 4 GPUs
    assert plan["frozen_llm"] == pytest.approx(6.658e9 * 2, rel=1e-3)  # OPT-6.7B in bf16
    assert plan["trainable_params"] == 7_348_993  # as benchmarks/param_budget.py counts
    assert plan["host_ram_per_node_peak"] == plan["frozen_llm"] + 4 * plan["frozen_clip"]
    out = capsys.readouterr().out
    assert "per GPU, total" in out and "fits" in out
    assert not (tmp_path / "exp_log").exists()  # nothing started, no run folder


def test_llm_weights_load_straight_to_their_device_with_the_same_arguments(monkeypatch):
    """What the loader is asked for: a device_map on every device, so a GPU run takes the
    arguments the CPU tests take (tests/test_llm_loading.py loads a real folder that way)."""
    from transformers import AutoModelForCausalLM

    from unimur.model.backbones.registry import load_llm

    calls = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda name, **kw: calls.append(kw) or torch.nn.Linear(1, 1))
    load_llm("some/model", "bf16", device=torch.device("cuda", 3))
    load_llm("some/model", "bf16", device="cpu")
    load_llm("some/model", "bf16")
    assert [c["device_map"] for c in calls] == [{"": "cuda:3"}, {"": "cpu"}, {"": "cpu"}]
    assert {tuple(sorted(c)) for c in calls} == {("device_map", "dtype")}
