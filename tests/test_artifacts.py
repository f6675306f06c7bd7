"""Pruned model folders, loading, image-embedding extraction and the retrieval API."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from unimur.config import Config
from unimur.inference.embedder import ModelEmbedder
from unimur.inference.extract import extract, list_images
from unimur.inference.image_embeddings import load_image_embeddings, save_fromage_pickle
from unimur.inference.retriever import Retriever
from unimur.model.model import UniMuR
from unimur.ranking import topk_chunked
from unimur.train.checkpoint import atomic_torch_save
from unimur.train.export import prune

ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = [["Q: what colour is the circle? A: red."], ["a blue square", "on the left"]]


@pytest.fixture
def trained(tiny_model, tmp_path):
    """A tiny model with non-trivial trainable weights, saved as a training checkpoint."""
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in tiny_model.trainable_named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = Config()
    cfg.model = tiny_model.config
    ckpt = tmp_path / "ckpt_best.pth.tar"
    atomic_torch_save({"config": cfg.to_dict(), "model": tiny_model.trainable_state_dict()}, ckpt)
    return tiny_model.eval(), ckpt


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, c in enumerate(["red", "blue", "green", "yellow", "white", "black", "purple"]):
        Image.new("RGB", (40, 40), c).save(d / f"{i:03d}.jpg")
    (d / "zz_broken.jpg").write_bytes(b"not an image")
    return d


def test_prune_then_load_gives_identical_embeddings(trained, tmp_path):
    model, ckpt = trained
    out = prune(ckpt, tmp_path / "unimur_model")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer", "manifest.json"}
    loaded = UniMuR.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded.encode_context(CONTEXTS), model.encode_context(CONTEXTS))
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[k], v), k
    assert loaded.ret_id == model.ret_id


def test_prune_also_works_as_a_script(trained, tmp_path):
    _, ckpt = trained
    r = subprocess.run([sys.executable, "unimur/prune_model_ckpt.py", "--ckpt", str(ckpt),
                        "--output", str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_tampered_weights_are_refused(trained, tmp_path):
    _, ckpt = trained
    out = prune(ckpt, tmp_path / "m")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256.*does not match the manifest"):
        UniMuR.from_pretrained(out)


def test_checkpoint_whose_weights_disagree_with_its_config_is_refused(trained, tmp_path):
    model, _ = trained
    cfg = Config()
    cfg.model = type(model.config)(**{**vars(model.config), "n_visual_tokens": 2})
    bad = tmp_path / "bad.pth.tar"
    atomic_torch_save({"config": cfg.to_dict(), "model": model.trainable_state_dict()}, bad)
    with pytest.raises(ValueError, match=r"cap_mapping.weight: checkpoint \(64, 64\) vs config \(128, 64\)"):
        prune(bad, tmp_path / "m")
    missing = dict(model.trainable_state_dict())
    missing.pop("ret_embedding")
    atomic_torch_save({"config": Config(model=model.config).to_dict(), "model": missing}, bad)
    with pytest.raises(ValueError, match=r"missing \['ret_embedding'\]"):
        prune(bad, tmp_path / "m")


def test_loading_a_folder_with_missing_parts_fails_clearly(trained, tmp_path):
    _, ckpt = trained
    out = prune(ckpt, tmp_path / "m")
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        UniMuR.from_pretrained(out)
    with pytest.raises(FileNotFoundError, match="not a pruned UniMuR model folder"):
        UniMuR.from_pretrained(tmp_path / "nowhere")


def test_interrupted_extraction_resumes_to_the_same_file(trained, images, tmp_path):
    _, ckpt = trained
    model_dir = prune(ckpt, tmp_path / "m")
    ids, paths = list_images(image_dir=images)
    whole = extract(model_dir, ids, paths, tmp_path / "whole.safetensors", part_size=3, batch_size=2)
    out = tmp_path / "resumed.safetensors"
    assert extract(model_dir, ids, paths, out, part_size=3, batch_size=2, max_parts=2) is None  # "killed"
    assert not out.exists() and len(list((tmp_path / "resumed.safetensors.parts").glob("part_*.safetensors"))) == 2
    extract(model_dir, ids, paths, out, part_size=3, batch_size=2)
    assert out.read_bytes() == whole.read_bytes()
    emb = load_image_embeddings(out)
    assert emb.ids == [f"{i:03d}.jpg" for i in range(7)]
    assert json.loads((tmp_path / "resumed.safetensors.skipped.json").read_text()) == {"zz_broken.jpg": "not_an_image"}
    # embeddings equal the model's own image targets
    model = UniMuR.from_pretrained(model_dir)
    pix = torch.stack([model.encoders.preprocess(Image.open(p).convert("RGB")) for p in paths[:7]])
    with torch.no_grad():
        assert torch.allclose(emb.embeds, model.image_targets(model.encode_images(pix)), atol=1e-6)


def test_pickle_needs_explicit_opt_in(trained, images, tmp_path):
    _, ckpt = trained
    model_dir = prune(ckpt, tmp_path / "m")
    ids, paths = list_images(image_dir=images)
    emb = load_image_embeddings(extract(model_dir, ids, paths, tmp_path / "e.safetensors"))
    save_fromage_pickle(emb, tmp_path / "cc3m_embeddings.pkl")
    with pytest.raises(ValueError, match="allow-pickle"):
        load_image_embeddings(tmp_path / "cc3m_embeddings.pkl")
    back = load_image_embeddings(tmp_path / "cc3m_embeddings.pkl", allow_pickle=True)
    assert back.ids == emb.ids and torch.allclose(back.embeds, emb.embeds, atol=1e-6)  # re-normalised on load


def test_retriever_top_k_matches_brute_force(trained, images):
    model, _ = trained
    ids, paths = list_images(image_dir=images)
    embedder = ModelEmbedder(model, batch_size=3, progress=False)
    index, skipped = embedder.embed_images(paths, ids)
    assert skipped == {"not_an_image": 1}
    texts = ["a red square", "a blue circle", "two stars", "nothing at all"]
    results = Retriever(embedder, index, texts).retrieve(CONTEXTS, k=3)
    u = embedder.embed_queries(CONTEXTS)
    img_order = torch.argsort(u @ index.embeds.T, dim=1, descending=True, stable=True)[:, :3]
    txt_order = torch.argsort(u @ embedder.embed_texts(texts).T, dim=1, descending=True, stable=True)[:, :3]
    for q, r in enumerate(results):
        assert [i for i, _ in r.images] == [index.ids[j] for j in img_order[q]]
        assert [t for t, _ in r.texts] == [texts[j] for j in txt_order[q]]
    s, i = topk_chunked(u, index.embeds, 3, index_chunk=2)
    assert torch.equal(i, img_order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_parts_equals_one_shot_file(tmp_path, dtype):
    """extract_vis_emb's bounded merge (part by part, tensors never concatenated in memory)
    writes the file save_image_embeddings writes for the whole collection, byte for byte; an
    empty part (every image unreadable) and a tensor missing from one part are handled."""
    from unimur.inference.image_embeddings import (
        ImageEmbeddings,
        save_image_embeddings,
        save_image_embeddings_from_parts,
    )

    g = torch.Generator().manual_seed(0)
    n = 11
    whole = ImageEmbeddings([f"{i:03d}.jpg" for i in range(n)], torch.randn(n, 4, generator=g).to(dtype),
                            torch.randn(n, 6, generator=g).to(dtype), torch.randn(n, 4, generator=g).to(dtype),
                            meta={"model_weights_sha256": "ab", "space": "unified retrieval space"})
    save_image_embeddings(whole, tmp_path / "one.safetensors")
    parts = []
    for k, (a, b) in enumerate([(0, 4), (4, 4), (4, 9), (9, 11)]):
        parts.append(tmp_path / f"part_{k}.safetensors")
        save_image_embeddings(whole.select(whole.ids[a:b]) if b > a else ImageEmbeddings(
            [], torch.empty(0, 4, dtype=dtype), torch.empty(0, 6, dtype=dtype), torch.empty(0, 4, dtype=dtype)), parts[-1])
    assert save_image_embeddings_from_parts(parts, tmp_path / "merged.safetensors", whole.meta) == n
    assert (tmp_path / "merged.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()
    back = load_image_embeddings(tmp_path / "merged.safetensors")
    assert back.ids == whole.ids and torch.equal(back.cap_features, whole.cap_features)

    # a part without CLIP-V embeddings: the merged file has none (as ImageEmbeddings.concat)
    save_image_embeddings(ImageEmbeddings(whole.ids[9:], whole.embeds[9:], whole.cap_features[9:]), parts[-1])
    save_image_embeddings_from_parts(parts, tmp_path / "merged.safetensors", whole.meta)
    back = load_image_embeddings(tmp_path / "merged.safetensors")
    assert back.clip_embeds is None and torch.equal(back.embeds, whole.embeds)


def test_prune_onto_a_run_folder_is_refused_and_keeps_the_runs_config(trained, tmp_path):
    _, ckpt = trained
    run = tmp_path / "exp_log" / "tiny"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"the": "run config"}')
    (run / "ckpt_best.pth.tar").write_bytes(ckpt.read_bytes())
    r = subprocess.run([sys.executable, "unimur/prune_model_ckpt.py", "--ckpt", str(run / "ckpt_best.pth.tar"),
                        "--output", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "is a training run folder" in r.stderr
    assert (run / "config.json").read_text() == '{"the": "run config"}'
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_best.pth.tar", "config.json"]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a pruned UniMuR model folder"):
        prune(ckpt, stranger)
    out = prune(ckpt, tmp_path / "m")
    assert prune(ckpt, out) == out  # an earlier pruned model is replaced, as before


@pytest.mark.parametrize("name", ["model.safetensors", "manifest.json", "config.json", "tokenizer/vocab.json"])
def test_extraction_onto_a_model_folder_file_is_refused(trained, images, tmp_path, name):
    from unimur.commands.extract_vis_emb import main as extract_main
    from unimur.errors import run_cli

    _, ckpt = trained
    model_dir = prune(ckpt, tmp_path / "m")
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="is the (model folder|tokenizer)"):
        extract(model_dir, *list_images(image_dir=images), model_dir / name)
    assert run_cli(extract_main, ["--model-dir", str(model_dir), "--image-dir", str(images),
                                  "--output", str(model_dir / name), "--device", "cpu"]) == 1
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
    UniMuR.from_pretrained(model_dir)  # still loads
