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
    from unimur.model.backbones.registry import load_encoders, load_llm
    from unimur.model.tokenizer import build_tokenizer

    tok, ret_id = build_tokenizer("tiny-opt")
    return load_llm("tiny-opt"), load_encoders("tiny-clip"), tok, ret_id


@pytest.fixture
def tiny_model(tiny_model_config, tiny_backbones):
    from unimur.model.model import UniMuR

    llm, enc, tok, ret_id = tiny_backbones
    torch.manual_seed(0)
    return UniMuR(tiny_model_config, llm, enc, tok, ret_id)


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory, tiny_model_config, tiny_backbones):
    """A pruned tiny model folder with an image pool and a text pool, for the retrieval commands.

    root/unimur_model/                 the model (tiny-opt + tiny-clip, seeded trainable layers)
    root/images/<colour>_<shape>.png   six drawn shapes
    root/pool.safetensors              their embeddings (ids = file names, image_root recorded)
    root/texts.txt                     candidate responses
    """
    import json
    from types import SimpleNamespace

    from PIL import Image, ImageDraw

    from unimur.inference.embedder import ModelEmbedder
    from unimur.inference.image_embeddings import save_image_embeddings
    from unimur.model.model import UniMuR
    from unimur.model.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("pool")
    torch.manual_seed(0)
    model = UniMuR(tiny_model_config, *tiny_backbones).eval()
    model_dir = save_pretrained(model.config, model.trainable_state_dict(), model.tokenizer, model.ret_id,
                                root / "unimur_model")
    image_dir = root / "images"
    image_dir.mkdir()
    for colour in ("red", "green", "blue"):
        for shape in ("circle", "square"):
            img = Image.new("RGB", (48, 48), "white")
            (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(
                (10, 10, 38, 38), fill=colour)
            img.save(image_dir / f"{colour}_{shape}.png")
    ids = sorted(p.name for p in image_dir.iterdir())
    emb, _ = ModelEmbedder(model, progress=False).embed_images([image_dir / i for i in ids], ids)
    sha = json.loads((model_dir / "manifest.json").read_text())["weights_sha256"]
    emb.meta = {"model_weights_sha256": sha, "image_root": str(image_dir)}
    save_image_embeddings(emb, root / "pool.safetensors")
    texts = ["here is a red circle", "look, a green square", "how about a blue circle",
             "i have a red square here", "nice to meet you", "what a lovely picture"]
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    return SimpleNamespace(root=root, model_dir=model_dir, image_dir=image_dir, images=root / "pool.safetensors",
                           texts_file=root / "texts.txt", texts=texts, ids=ids, model=model)
