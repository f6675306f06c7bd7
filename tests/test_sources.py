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
from unimur.commands.to_tsv import main as to_tsv_main
from unimur.data.cached_dataset import build_cached_cc3m_dataset
from unimur.data.cc3m_sources import check_split_source, expand_braces, read_split
from unimur.model.backbones.registry import load_encoders

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


# ---------------------------------------------------------------- hostile shards (issue 25)


def _write_tar(path: Path, members, rng=None) -> None:
    """A tar of (name, bytes) members in order; image bytes drawn when the data is None."""
    rng = rng or np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = _image_bytes("good", rng) if data is None else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tar_member_climbing_out_of_image_out_is_skipped_and_nothing_outside_changes(tmp_path):
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"precious")
    work = tmp_path / "a" / "b" / "c"
    _write_tar(work / "cc3m" / "train" / "00000.tar", [
        ("k0.jpg", None), ("k0.txt", b"a good row"),
        ("../../../../../../victim.jpg", None), ("../../../../../../victim.txt", b"evil"),
        ("/abs/k1.jpg", None), ("/abs/k1.txt", b"absolute"),
        ("k2\nx.jpg", None), ("k2\nx.txt", b"newline name"),
        ("k3\u2028.jpg", None), ("k3\u2028.txt", b"line separator name"),
    ])
    before = _tree(tmp_path)
    out = work / "out"
    assert to_tsv_main(["--dataset-format", "wds", "--dataset-dir", str(work / "cc3m"), "--out-dir", str(out),
                        "--splits", "train"]) == 0
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("a/b/c/out/")} == before  # nothing else touched
    assert victim.read_bytes() == b"precious"
    assert sorted(k for k in after if k.startswith("a/b/c/out/")) == [
        "a/b/c/out/cc3m_train.tsv", "a/b/c/out/images/train/00000/k0.jpg"]
    assert (out / "cc3m_train.tsv").read_text().splitlines() == ["caption\timage", "a good row\ttrain/00000/k0.jpg"]
    data = read_split("wds", work / "cc3m", "unused", "train")
    assert data.skipped == Counter(unsafe_name=4) and len(data.rows) == 1


def test_extraction_refuses_a_symlinked_folder_pointing_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _write_tar(tmp_path / "cc3m" / "train" / "00000.tar", [("k0.jpg", None), ("k0.txt", b"cap")])
    (tmp_path / "out" / "images" / "train").mkdir(parents=True)
    (tmp_path / "out" / "images" / "train" / "00000").symlink_to(outside)
    assert to_tsv_main(["--dataset-format", "wds", "--dataset-dir", str(tmp_path / "cc3m"),
                        "--out-dir", str(tmp_path / "out"), "--splits", "train"]) == 1
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images"]  # no TSV, no temp file


def test_same_named_shards_in_two_folders_extract_to_distinct_paths(tmp_path):
    colours = {"a": (255, 0, 0), "b": (0, 0, 255)}
    for folder, rgb in colours.items():
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), rgb).save(buf, "PNG")
        _write_tar(tmp_path / "train" / folder / "00000.tar",
                   [("k0.png", buf.getvalue()), ("k0.txt", f"a {'red' if folder == 'a' else 'blue'} square".encode())])
    out = tmp_path / "out"
    assert to_tsv_main(["--dataset-format", "wds", "--dataset-dir", str(tmp_path / "{split}/{a,b}/00000.tar"),
                        "--out-dir", str(out), "--splits", "train"]) == 0
    lines = (out / "cc3m_train.tsv").read_text().splitlines()[1:]
    assert lines == ["a red square\ttrain/a/00000/k0.png", "a blue square\ttrain/b/00000/k0.png"]
    for line in lines:
        caption, name = line.split("\t")
        pixel = Image.open(out / "images" / name).getpixel((0, 0))
        assert pixel == (colours["a"] if "red" in caption else colours["b"])


def test_truncated_tar_shard_is_counted(tmp_path):
    shard = tmp_path / "train" / "00000.tar"
    _write_tar(shard, [m for i in range(6) for m in ((f"k{i}.jpg", None), (f"k{i}.txt", f"cap {i}".encode()))])
    full = shard.read_bytes()
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    cases = {  # cut inside sample 4's image bytes; cut exactly between samples 3 and 4
        "mid-member": (members[8].offset_data + 10, Counter(truncated_sample=1, truncated_shard=1), 4),
        "at a header": (members[8].offset, Counter(truncated_shard=1), 4),
    }
    for what, (cut, skips, n_rows) in cases.items():
        shard.write_bytes(full[:cut])
        data = read_split("wds", tmp_path, "unused", "train")
        assert (data.skipped, len(data.rows)) == (skips, n_rows), what
    shard.write_bytes(full)
    assert read_split("wds", tmp_path, "unused", "train").skipped == Counter()


def test_repeated_key_in_a_tar_skips_every_occurrence_and_counts_them(tmp_path):
    _write_tar(tmp_path / "train" / "00000.tar", [
        ("k0.jpg", None), ("k0.txt", b"first"), ("k1.jpg", None), ("k1.txt", b"fine"),
        ("k0.jpg", None), ("k0.txt", b"second"),
    ])
    data = read_split("wds", tmp_path, "unused", "train")
    assert data.skipped == Counter(duplicate_key=2)
    assert [r.caption for r in data.rows] == ["fine"]


def test_parquet_caption_column_of_numbers_fails_with_one_line(tmp_path, capsys):
    root = tmp_path / "train"
    root.mkdir()
    pq.write_table(pa.table({"key": ["000000000"], "caption": [12345], "status": ["success"]}), root / "00000.parquet")
    assert to_tsv_main(["--dataset-format", "img2dataset", "--dataset-dir", str(tmp_path),
                        "--out-dir", str(tmp_path / "out"), "--splits", "train"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "column caption holds int64" in err and "\n" not in err


def test_failed_conversion_leaves_no_temp_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "00000.tar").write_bytes(b"\x01" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "cc3m_train.tsv").write_text("caption\timage\nold\told.jpg\n")
    assert to_tsv_main(["--dataset-format", "wds", "--dataset-dir", str(tmp_path), "--out-dir", str(out),
                        "--splits", "train"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["cc3m_train.tsv"]
    assert (out / "cc3m_train.tsv").read_text() == "caption\timage\nold\told.jpg\n"
