"""Frozen-CLIP feature cache: hit/miss/stale/corrupt, equality with direct encoding, sharded
merge, cached dataset (CPU, offline, tiny-clip)."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from unimur.data import feature_cache as fc
from unimur.data.cached_dataset import CachedCaptionDataset, build_cached_cc3m_dataset
from unimur.data.cc3m import CaptionCollator, CaptionRow, read_caption_tsv
from unimur.data.feature_cache import (
    build_feature_cache,
    cache_key,
    cache_paths,
    load_or_build_feature_cache,
)
from unimur.model.backbones.registry import load_encoders
from unimur.model.tokenizer import build_tokenizer
from unimur.utils.images import ImageChecks, load_rgb_image

N_GOOD = 10
BAD = {"tiny.png": "too_small", "truncated.jpg": "corrupt_image", "fake.jpg": "not_an_image"}


class CountingEncoders:
    """Delegates to real encoders, counting encode calls; identity can be overridden."""

    def __init__(self, inner, identity: str | None = None):
        self.inner = inner
        self.identity = identity or inner.identity
        self.preprocess = inner.preprocess
        self.image_pooled_dim = inner.image_pooled_dim
        self.image_embed_dim = inner.image_embed_dim
        self.text_embed_dim = inner.text_embed_dim
        self.calls = Counter()

    def encode_image(self, pixels):
        self.calls["image"] += 1
        return self.inner.encode_image(pixels)

    def encode_text(self, texts):
        self.calls["text"] += 1
        return self.inner.encode_text(texts)

    def to(self, *args, **kwargs):
        self.inner.to(*args, **kwargs)
        return self


@pytest.fixture(scope="module")
def encoders():
    return load_encoders("tiny-clip")


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path, list[CaptionRow]]:
    """(tsv, image_dir, rows): N_GOOD valid images of mixed sizes/modes, then the BAD ones."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    rng = np.random.default_rng(0)
    lines = ["caption\timage"]
    for i in range(N_GOOD):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i % 3 == 1:
            img = img.convert("L")
        img.save(image_dir / f"img{i}.{'png' if i % 2 else 'jpg'}")
        lines.append(f'picture "{i}" of a thing\timg{i}.{"png" if i % 2 else "jpg"}')
    Image.new("RGB", (1, 1)).save(image_dir / "tiny.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image_dir / "full.jpg", quality=95)
    raw = (image_dir / "full.jpg").read_bytes()
    (image_dir / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (image_dir / "fake.jpg").write_text("not an image")
    lines += [f"bad image {name}\t{name}" for name in BAD]
    tsv = tmp_path / "cc3m_train.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    rows, _ = read_caption_tsv(tsv, image_dir)
    return tsv, image_dir, rows


def _direct_features(encoders, rows):
    """Features of the valid rows computed without the cache, one batch."""
    pixels = torch.stack([encoders.preprocess(load_rgb_image(r.image_path)) for r in rows])
    feats = encoders.encode_image(pixels)
    return feats.pooled, feats.embed, encoders.encode_text([r.caption for r in rows])


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "unimur.data.feature_cache")


# ------------------------------------------------------------------------------ tests


def test_miss_then_hit_without_encoder_calls(data, encoders, tmp_path, caplog):
    _, _, rows = data
    caplog.set_level(logging.INFO, logger="unimur.data.feature_cache")
    enc = CountingEncoders(encoders)
    cache = load_or_build_feature_cache(rows, enc, tmp_path / "cache", batch_size=4)
    assert enc.calls["image"] > 0 and enc.calls["text"] > 0
    assert "miss" in _messages(caplog)
    enc2 = CountingEncoders(encoders)
    caplog.clear()
    again = load_or_build_feature_cache(rows, enc2, tmp_path / "cache", batch_size=4)
    assert enc2.calls == Counter()  # a hit decodes no image and runs no encoder
    assert "hit" in _messages(caplog)
    assert again.key == cache.key == cache_key(enc, rows, "fp16")  # half precision by default
    assert cache.image_embed.dtype == torch.float16
    assert torch.equal(again.image_embed, cache.image_embed)


def test_cached_features_equal_direct_encoding(data, encoders, tmp_path):
    _, _, rows = data
    cache = build_feature_cache(rows, encoders, tmp_path / "cache", batch_size=3, dtype="fp32")
    assert cache.num_rows == len(rows) == N_GOOD + len(BAD)
    assert cache.valid.tolist() == [True] * N_GOOD + [False] * len(BAD)
    assert cache.skip_counts() == Counter(BAD.values())
    pooled, embed, text = _direct_features(encoders, rows[:N_GOOD])
    assert cache.image_pooled.dtype == torch.float32
    torch.testing.assert_close(cache.image_pooled[:N_GOOD], pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.image_embed[:N_GOOD], embed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.text_embed[:N_GOOD], text, rtol=1e-5, atol=1e-6)
    assert (cache.image_embed[N_GOOD:] == 0).all()  # unusable images hold zeros
    # The file is plain safetensors (reference reader agrees) and the sidecar describes it.
    from safetensors.torch import load_file

    data_path, sidecar_path = cache_paths(tmp_path / "cache")
    ref = load_file(str(data_path))
    assert set(ref) == {"image_pooled", "image_embed", "text_embed", "valid", "skip_code"}
    assert torch.equal(ref["text_embed"], cache.text_embed) and torch.equal(ref["valid"], cache.valid)
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["key"] == cache.key and sidecar["num_valid"] == N_GOOD
    assert sidecar["skipped"] == dict(sorted(Counter(BAD.values()).items()))


def test_key_changes_invalidate(data, encoders, tmp_path, caplog):
    tsv, image_dir, rows = data
    cache_dir = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="unimur.data.feature_cache")
    load_or_build_feature_cache(rows, encoders, cache_dir)

    # Another encoder identity (other weights or preprocessing).
    other = CountingEncoders(encoders, identity=encoders.identity + "|other-preprocess")
    caplog.clear()
    load_or_build_feature_cache(rows, other, cache_dir)
    assert other.calls["image"] > 0 and "encoder identity changed" in _messages(caplog)

    # Edited TSV content (one caption).
    tsv.write_text(tsv.read_text().replace('picture "3"', 'picture "three"'))
    rows2, _ = read_caption_tsv(tsv, image_dir)
    enc = CountingEncoders(encoders)
    caplog.clear()
    cache = load_or_build_feature_cache(rows2, enc, cache_dir)
    assert enc.calls["image"] > 0 and "dataset content changed" in _messages(caplog)
    torch.testing.assert_close(cache.text_embed[3], encoders.encode_text(['picture "three" of a thing'])[0].half())

    # A replaced image file (new size/mtime), same name.
    Image.new("RGB", (30, 30), (1, 2, 3)).save(image_dir / "img0.jpg")
    os.utime(image_dir / "img0.jpg", ns=(1, 1))
    enc = CountingEncoders(encoders)
    load_or_build_feature_cache(rows2, enc, cache_dir)
    assert enc.calls["image"] > 0

    # Storage dtype.
    enc = CountingEncoders(encoders)
    caplog.clear()
    cache = load_or_build_feature_cache(rows2, enc, cache_dir, dtype="bf16")
    assert enc.calls["image"] > 0 and "storage dtype changed" in _messages(caplog)
    assert cache.image_embed.dtype == torch.bfloat16
    torch.testing.assert_close(cache.text_embed[3], encoders.encode_text(['picture "three" of a thing'])[0].bfloat16())
    enc = CountingEncoders(encoders)
    assert load_or_build_feature_cache(rows2, enc, cache_dir, dtype="bf16").image_embed.dtype == torch.bfloat16
    assert enc.calls == Counter()


@pytest.mark.parametrize(
    "damage,verify",
    [("truncate", True), ("flip_data_byte", True), ("garbage_header", True), ("garbage_sidecar", True),
     ("delete_data", True),
     # without the checksum, size and layout checks still catch these
     ("truncate", False), ("garbage_header", False), ("garbage_sidecar", False)],
)
def test_corrupt_cache_is_rebuilt(data, encoders, tmp_path, caplog, damage, verify):
    _, _, rows = data
    cache_dir = tmp_path / "cache"
    good = load_or_build_feature_cache(rows, encoders, cache_dir)
    expected = good.image_embed.clone()
    del good
    data_path, sidecar_path = cache_paths(cache_dir)
    raw = bytearray(data_path.read_bytes())
    if damage == "truncate":
        data_path.write_bytes(raw[: len(raw) - 100])
    elif damage == "flip_data_byte":
        raw[-20] ^= 0xFF  # layout stays valid: only the checksum notices
        data_path.write_bytes(raw)
    elif damage == "garbage_header":
        data_path.write_bytes(b"\x00garbage" * 4 + raw[32:])
    elif damage == "garbage_sidecar":
        sidecar_path.write_text("{not json")
    else:
        data_path.unlink()
    caplog.set_level(logging.INFO, logger="unimur.data.feature_cache")
    enc = CountingEncoders(encoders)
    cache = load_or_build_feature_cache(rows, enc, cache_dir, verify_checksum=verify)
    assert enc.calls["image"] > 0
    assert "corrupt" in _messages(caplog)
    assert torch.equal(cache.image_embed, expected)


def test_sharded_build_merges_to_the_single_process_file(data, encoders, tmp_path):
    """The multi-rank path (shard files, rank-0 merge), with the ranks run one after another."""
    _, _, rows = data
    single = build_feature_cache(rows, encoders, tmp_path / "single", batch_size=4, dtype="fp32")
    parts = fc._key_parts(encoders, rows, "fp32", ImageChecks())
    key = fc._key_from_parts(parts)
    out = tmp_path / "sharded"
    out.mkdir()
    world = 3
    shard_paths = []
    for rank in range(world):
        start, end = fc._shard_bounds(len(rows), rank, world)
        feats = fc._encode_rows(rows[start:end], encoders, torch.float32, 2, 0, ImageChecks())
        shard_paths.append(fc._shard_path(out, "features", key, rank, world))
        fc.write_safetensors(shard_paths[-1], {k: [v] for k, v in feats.items()}, {})
    fc._write_final(out, "features", fc._merge_shards(shard_paths), key, parts, {"world_size": world})
    merged = fc.load_feature_cache(out, expected_key=key)
    for name in fc.TENSOR_NAMES:
        torch.testing.assert_close(getattr(merged, name), getattr(single, name), rtol=1e-5, atol=1e-6)
    assert fc._shard_bounds(2, 2, 3) == (1, 2) and fc._shard_bounds(2, 0, 3) == (0, 0)  # empty shards are fine


def test_cached_dataset_and_collator(data, encoders, tmp_path):
    tsv, image_dir, rows = data
    tokenizer, ret_id = build_tokenizer("tiny-opt")
    ds = build_cached_cc3m_dataset(tsv.parent, image_dir, encoders, tmp_path / "cache", split="train", batch_size=5,
                                  dtype="fp32")
    assert len(ds) == N_GOOD and ds.skipped == Counter(BAD.values())
    sample = ds[2]
    assert set(sample) == {"index", "caption", "image_pooled", "image_embed", "text_embed"}
    assert sample["caption"] == rows[2].caption and sample["index"] == rows[2].index
    loader = DataLoader(ds, batch_size=4, num_workers=0, collate_fn=CaptionCollator(tokenizer, 24, ret_id))
    batches = list(loader)
    assert sum(len(b["captions"]) for b in batches) == N_GOOD
    b = batches[0]
    assert b["image_pooled"].shape == (4, encoders.image_pooled_dim)
    assert b["image_embed"].shape == (4, encoders.image_embed_dim) and b["text_embed"].shape == (4, encoders.text_embed_dim)
    assert b["ret_ids"].shape[0] == 4 and b["skipped"] == Counter()
    pooled, _, _ = _direct_features(encoders, rows[:4])
    torch.testing.assert_close(b["image_pooled"], pooled, rtol=1e-5, atol=1e-6)
    # Spawned DataLoader workers get the cache by path, not by value.
    clone = pickle.loads(pickle.dumps(ds.cache))
    assert len(pickle.dumps(ds.cache)) < 2000 and torch.equal(clone.image_embed, ds.cache.image_embed)


def test_cached_dataset_with_no_usable_image_fails(data, encoders, tmp_path):
    _, _, rows = data
    bad_rows = rows[N_GOOD:]
    cache = build_feature_cache(bad_rows, encoders, tmp_path / "cache")
    assert cache.num_valid == 0
    with pytest.raises(ValueError, match="none of the 3 images is usable"):
        CachedCaptionDataset(bad_rows, cache)
    with pytest.raises(ValueError, match="wrong cache"):
        CachedCaptionDataset(rows, cache)


def test_start_up_checks_the_stamp_not_the_whole_file(data, encoders, tmp_path, monkeypatch):
    """The build hashes the bytes as it writes them (no re-read); the whole file is hashed again
    only when asked or when the mtime changed (and a matching hash renews the stamp); the
    header is always compared."""
    _, _, rows = data
    cache_dir = tmp_path / "cache"
    hashed = []
    real = fc.file_sha256
    monkeypatch.setattr(fc, "file_sha256", lambda p: hashed.append(p) or real(p))
    load_or_build_feature_cache(rows, encoders, cache_dir)
    assert len(hashed) == 0  # computed once, while writing
    data_path, sidecar_path = cache_paths(cache_dir)
    assert json.loads(sidecar_path.read_text())["sha256"] == real(data_path)
    enc = CountingEncoders(encoders)
    load_or_build_feature_cache(rows, enc, cache_dir)
    assert len(hashed) == 0 and enc.calls == Counter()  # a hit: stamp only
    load_or_build_feature_cache(rows, enc, cache_dir, verify_checksum=True)
    assert len(hashed) == 1 and enc.calls == Counter()  # --cache-verify
    os.utime(data_path, ns=(10**18, 10**18))  # a copy without -p: same bytes, new mtime
    load_or_build_feature_cache(rows, enc, cache_dir)
    assert len(hashed) == 2 and enc.calls == Counter()
    assert json.loads(sidecar_path.read_text())["file_mtime_ns"] == 10**18  # stamp renewed
    load_or_build_feature_cache(rows, enc, cache_dir)
    assert len(hashed) == 2
    # A flipped byte that keeps size and mtime passes the stamp; the full check finds it.
    raw = bytearray(data_path.read_bytes())
    raw[-20] ^= 0xFF
    data_path.write_bytes(raw)
    os.utime(data_path, ns=(10**18, 10**18))
    load_or_build_feature_cache(rows, enc, cache_dir)
    assert enc.calls == Counter()
    load_or_build_feature_cache(rows, enc, cache_dir, verify_checksum=True)
    assert enc.calls["image"] > 0


def test_old_format_version_is_rebuilt(data, encoders, tmp_path, caplog):
    _, _, rows = data
    cache_dir = tmp_path / "cache"
    load_or_build_feature_cache(rows, encoders, cache_dir)
    _, sidecar_path = cache_paths(cache_dir)
    sidecar = json.loads(sidecar_path.read_text())
    sidecar_path.write_text(json.dumps({**sidecar, "version": 1}))
    caplog.set_level(logging.INFO, logger="unimur.data.feature_cache")
    enc = CountingEncoders(encoders)
    load_or_build_feature_cache(rows, enc, cache_dir)
    assert enc.calls["image"] > 0 and "format version 1" in _messages(caplog)
