"""img2dataset `files` folders and webdataset shards (written here, with failed rows and bad
images) read like the TSV the converter writes from them: same rows, skip counts, cached
features and training losses (CPU, offline, tiny models)."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import main as main_module
from unimur.backbones import load_encoders
from unimur.feature_cache import build_cached_cc3m_dataset
from unimur.sources import check_split_source, expand_braces, read_split
from unimur.to_tsv import main as to_tsv_main

# (caption, image kind, img2dataset status); kinds: good, truncated, fake, tiny, none (no file)
TRAIN = [("a red \"box\"", "good", "success"), ("two\tcats", "good", "success"), ("failed row", "none", "failed_to_download"),
         ("a dog", "good", "success"), ("", "good", "success"), ("cut jpeg", "truncated", "success"),
         ("a tree", "good", "success"), ("not an image", "fake", "success"), ("resize failed", "none", "failed_to_resize"),
         ("a car", "good", "success"), ("one pixel", "tiny", "success"), ("a boat\nat sea", "good", "success"),
         ("a house", "good", "success"), ("a bird", "good", "success")]
VAL = [("val one", "good", "success"), ("val failed", "none", "failed_to_download"), ("val two", "good", "success"),
       ("val three", "good", "success"), ("val four", "good", "success"), ("val five", "good", "success")]
SHARD_SIZE = 5


def _image_bytes(kind: str, rng) -> bytes:
    buf = io.BytesIO()
    if kind == "tiny":
        Image.new("RGB", (1, 1)).save(buf, "PNG")
        return buf.getvalue()
    if kind == "fake":
        return b"this is not an image"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2] if kind == "truncated" else buf.getvalue()


def _ext(kind: str) -> str:
    return "png" if kind == "tiny" else "jpg"


def write_img2dataset(root: Path, rows, fmt: str, seed: int = 0) -> None:
    """img2dataset's output for `rows`: `files` (00000/<key>.jpg/.txt/.json) or `webdataset`
    (00000.tar), with 00000.parquet (key, caption, status, ...) beside it either way."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for s in range(0, len(rows), SHARD_SIZE):
        shard = f"{s // SHARD_SIZE:05d}"
        keys, captions, statuses = [], [], []
        tar = tarfile.open(root / f"{shard}.tar", "w") if fmt == "wds" else None
        for i, (caption, kind, status) in enumerate(rows[s : s + SHARD_SIZE], start=s):
            key = f"{shard}{i % SHARD_SIZE:04d}"
            keys.append(key), captions.append(caption), statuses.append(status)
            if status != "success":
                continue
            members = {f"{key}.{_ext(kind)}": _image_bytes(kind, rng), f"{key}.txt": caption.encode(),
                       f"{key}.json": json.dumps({"key": key, "caption": caption}).encode()}
            for name, data in members.items():
                if tar is None:
                    (root / shard).mkdir(exist_ok=True)
                    (root / shard / name).write_bytes(data)
                else:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        if tar is not None:
            tar.close()
        table = pa.table({"url": [f"http://x/{k}" for k in keys], "key": keys, "caption": captions,
                          "status": statuses, "error_message": [None] * len(keys)})
        pq.write_table(table, root / f"{shard}.parquet")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("i2d")
    for fmt in ("img2dataset", "wds"):
        write_img2dataset(base / fmt / "train", TRAIN, fmt, seed=0)
        write_img2dataset(base / fmt / "val", VAL, fmt, seed=1)
    tsv = {}
    for fmt in ("img2dataset", "wds"):
        out = base / f"tsv_from_{fmt}"
        assert to_tsv_main(["--dataset-format", fmt, "--dataset-dir", str(base / fmt), "--out-dir", str(out)]) == 0
        tsv[fmt] = (out, base / fmt if fmt == "img2dataset" else out / "images")
    return base, tsv


@pytest.fixture(scope="module")
def encoders():
    return load_encoders("tiny-clip")


EXPECTED_ROW_SKIPS = Counter(missing_image=2, empty_caption=1)
EXPECTED_IMAGE_SKIPS = Counter(corrupt_image=1, not_an_image=1, too_small=1)


@pytest.mark.parametrize("fmt", ["img2dataset", "wds"])
def test_rows_and_skips_match_the_converted_tsv(layouts, fmt):
    base, tsv = layouts
    src = read_split(fmt, base / fmt, "unused", "train")
    ref = read_split("tsv", tsv[fmt][0], tsv[fmt][1], "train")
    assert src.skipped == ref.skipped == EXPECTED_ROW_SKIPS
    assert len(src.rows) == len(ref.rows) == len(TRAIN) - 3
    assert [(r.index, r.caption) for r in src.rows] == [(r.index, r.caption) for r in ref.rows]
    assert src.rows[1].caption == "two cats" and src.rows[-3].caption == "a boat at sea"  # tab, newline -> space
    assert len(src.fingerprint) == 64 and src.fingerprint != ref.fingerprint


@pytest.mark.parametrize("fmt", ["img2dataset", "wds"])
def test_cached_features_and_image_skips_match_the_tsv_path(layouts, encoders, tmp_path, fmt):
    base, tsv = layouts
    kw = dict(split="train", dtype="fp32", batch_size=4)
    src = build_cached_cc3m_dataset(base / fmt, "unused", encoders, tmp_path / "a", dataset_format=fmt, **kw)
    ref = build_cached_cc3m_dataset(tsv[fmt][0], tsv[fmt][1], encoders, tmp_path / "b", **kw)
    assert src.skipped == ref.skipped == EXPECTED_IMAGE_SKIPS
    assert src.read_skipped == ref.read_skipped == EXPECTED_ROW_SKIPS
    assert len(src) == len(ref) == len(TRAIN) - 6
    for name in ("image_pooled", "image_embed", "text_embed", "valid", "skip_code"):
        assert torch.equal(getattr(src.cache, name), getattr(ref.cache, name)), name


def test_fingerprint_is_shard_level(layouts, tmp_path):
    base, _ = layouts
    root = tmp_path / "copy"
    write_img2dataset(root / "train", TRAIN, "img2dataset")
    a = read_split("img2dataset", root, "unused", "train").fingerprint
    image = next((root / "train" / "00000").glob("*.jpg"))
    st = image.stat()
    image.write_bytes(image.read_bytes())  # rewritten in place, folder unchanged: no per-image stat
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert read_split("img2dataset", root, "unused", "train").fingerprint == a
    parquet = root / "train" / "00001.parquet"
    os.utime(parquet, ns=(1, 1))  # an index file changed: a new fingerprint
    assert read_split("img2dataset", root, "unused", "train").fingerprint != a


def test_wds_without_parquet_reads_txt_members_and_brace_patterns(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    for s in range(2):
        with tarfile.open(shards / f"part-{s:03d}.tar", "w") as tar:
            for i in range(3):
                members = {f"s{s}/k{i}.jpg": _image_bytes("good", rng),
                           f"s{s}/k{i}.txt": b"\xff\xfe bad" if (s, i) == (1, 2) else f"cap {s} {i}".encode()}
                if (s, i) == (0, 1):
                    members.pop(f"s{s}/k{i}.jpg")  # a caption without its image
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    data = read_split("wds", str(shards / "part-{000..001}.tar"), "unused", "train")
    assert data.skipped == Counter(missing_image=1, bad_encoding=1)
    assert [r.caption for r in data.rows] == ["cap 0 0", "cap 0 2", "cap 1 0", "cap 1 1"]
    assert expand_braces("a{08..10}{x,y}.tar") == ["a08x.tar", "a08y.tar", "a09x.tar", "a09y.tar", "a10x.tar", "a10y.tar"]


def test_bad_inputs_fail_with_one_line(tmp_path):
    (tmp_path / "train").mkdir()
    cases = [
        ("img2dataset", tmp_path, FileNotFoundError, "no img2dataset index"),
        ("img2dataset", tmp_path / "nowhere", FileNotFoundError, "train split not found"),
        ("wds", tmp_path, FileNotFoundError, "no webdataset shard"),
        ("wds", str(tmp_path / "{split}-{0..2}.tar"), FileNotFoundError, "3 shard"),
    ]
    for fmt, where, exc, msg in cases:
        with pytest.raises(exc, match=msg) as e:
            check_split_source(fmt, where, "unused", "train")
        assert "\n" not in str(e.value)
    (tmp_path / "train" / "00000.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match="unreadable parquet") as e:
        read_split("img2dataset", tmp_path, "unused", "train")
    assert "\n" not in str(e.value)
    (tmp_path / "train" / "00000.parquet").unlink()
    (tmp_path / "train" / "00000.tar").write_bytes(b"\x01" * 1000)
    with pytest.raises(ValueError, match="unreadable tar shard"):
        read_split("wds", tmp_path, "unused", "train")


def _log_counts(run_dir: Path) -> list[str]:
    """The reader's and the cache's skip lines of train.log, paths removed."""
    text = (run_dir / "train.log").read_text()
    lines = re.findall(r"read .*?: (\d+ valid rows, \d+ skipped \(.*?\))", text)
    lines += re.findall(r"cached dataset: (.*)", text)
    return lines


@pytest.mark.parametrize("fmt", ["img2dataset", "wds"])
def test_training_runs_with_the_same_skips_and_losses_as_the_tsv(layouts, tmp_path, fmt):
    base, tsv = layouts
    common = ["--opt-version=tiny-opt", "--visual-model=tiny-clip", f"--log-base-dir={tmp_path}", "--epochs=1",
              "--steps-per-epoch=2", "--val-steps-per-epoch=1", "--batch-size=4", "--val-batch-size=4",
              "--precision=fp32", "-j", "0", "--seed=3", "--lr-warmup-steps=1"]
    main_module.main([*common, "--exp_name=src", f"--dataset-format={fmt}", f"--dataset-dir={base / fmt}",
                      f"--cache-dir={tmp_path / 'c1'}"])
    main_module.main([*common, "--exp_name=tsv", f"--dataset-dir={tsv[fmt][0]}", f"--image-dir={tsv[fmt][1]}",
                      f"--cache-dir={tmp_path / 'c2'}"])
    src, ref = _log_counts(tmp_path / "src"), _log_counts(tmp_path / "tsv")
    assert src == ref and len(src) == 4, (src, ref)
    assert "11 valid rows, 3 skipped (empty_caption=1, missing_image=2)" in src
    assert "8 of 11 rows usable, 3 excluded (corrupt_image=1, not_an_image=1, too_small=1)" in src
    m1, m2 = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("src", "tsv"))
    assert [m.get("loss") for m in m1] == [m.get("loss") for m in m2]
    assert any(m.get("loss") is not None for m in m1)
    assert json.loads((tmp_path / "c1" / "cc3m_train.json").read_text())["parts"]["dtype"] == "fp16"
