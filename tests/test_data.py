"""CC3M TSV reader, image loading/conversion, dataset, collator and skip counting (CPU, offline)."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from unimur.data.cc3m import (
    CaptionCollator,
    CaptionDataset,
    CaptionRow,
    RowTable,
    SkipCounter,
    build_cc3m_datasets,
    is_empty_batch,
    read_caption_tsv,
)
from unimur.model.backbones.registry import load_encoders
from unimur.model.tokenizer import build_tokenizer
from unimur.utils.images import ImageChecks, UnusableImage, load_rgb_image

MAX_LEN = 24
IMAGE_SIZE = 32  # tiny-clip's input resolution


# ------------------------------------------------------------------------- fixtures


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_images(image_dir: Path) -> None:
    """One file per case the reader and loader must handle."""
    image_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(30, 40)).save(image_dir / "rgb.jpg", quality=90)
    Image.fromarray(_noise(47, 33, 1)).save(image_dir / "rgb.png")
    Image.fromarray(_noise(20, 20, 2)[..., 0], mode="L").save(image_dir / "gray.png")
    rgba = np.zeros((24, 24, 4), dtype=np.uint8)
    rgba[:, :12] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba, mode="RGBA").save(image_dir / "rgba.png")
    Image.fromarray(_noise(16, 16, 3)).convert("P").save(image_dir / "palette.png")
    Image.fromarray(_noise(16, 16, 4)).convert("P").save(image_dir / "palette.gif")
    Image.fromarray(_noise(16, 16, 5)).convert("CMYK").save(image_dir / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 257 * 100, dtype=np.uint16)).save(image_dir / "gray16.png")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(image_dir / "tiny.png")
    Image.new("RGB", (400, 10), (10, 20, 30)).save(image_dir / "banner.png")
    # A truncated JPEG: noise does not compress, so 60% of the bytes cut deep into the scan.
    Image.fromarray(_noise(64, 64, 6)).save(image_dir / "whole.jpg", quality=95)
    data = (image_dir / "whole.jpg").read_bytes()
    (image_dir / "truncated.jpg").write_bytes(data[: int(len(data) * 0.6)])
    (image_dir / "fake.jpg").write_text("this is not an image\n")


GOOD_ROWS = [
    ("a red square", "rgb.jpg"),
    ('he said "hi" to me', "rgb.png"),
    ('a 12" ruler on a desk', "gray.png"),  # unbalanced quote: a CSV reader would swallow lines
    ("half transparent", "rgba.png"),
    ("palette png", "palette.png"),
    ("palette gif", "palette.gif"),
    ("cmyk photo", "cmyk.jpg"),
    ("sixteen bit", "gray16.png"),
]
BAD_IMAGE_ROWS = [  # valid rows whose image is unusable: found when loading
    ("one pixel", "tiny.png", "too_small"),
    ("a banner", "banner.png", "extreme_aspect"),
    ("cut short", "truncated.jpg", "corrupt_image"),
    ("text file", "fake.jpg", "not_an_image"),
]
BAD_LINES = [  # (raw line, reason) dropped when reading
    (b"no such file\tmissing.jpg", "missing_image"),
    (b"   \trgb.jpg", "empty_caption"),
    (b"only one field", "bad_fields"),
    (b"three\trgb.jpg\tfields", "bad_fields"),
    (b"", "blank_line"),
    (b"bad \xff\xfe bytes\trgb.jpg", "bad_encoding"),
    (b"no image name\t ", "empty_image_name"),
]


def write_tsv(path: Path, lines: list[bytes], header: bytes = b"caption\timage") -> Path:
    path.write_bytes(b"\n".join([header, *lines]) + b"\n")
    return path


def good_line(caption: str, image: str) -> bytes:
    return f"{caption}\t{image}".encode()


@pytest.fixture
def fixture_dir(tmp_path: Path) -> tuple[Path, Path]:
    """(tsv, image_dir) with every good row, bad image and bad line, interleaved."""
    image_dir = tmp_path / "images"
    make_images(image_dir)
    lines = [good_line(c, i) for c, i in GOOD_ROWS[:2]]
    lines += [raw for raw, _ in BAD_LINES[:4]]
    lines += [good_line(c, i) for c, i in GOOD_ROWS[2:]]
    lines += [raw for raw, _ in BAD_LINES[4:]]
    lines += [good_line(c, i) for c, i, _ in BAD_IMAGE_ROWS]
    return write_tsv(tmp_path / "cc3m_train.tsv", lines), image_dir


@pytest.fixture(scope="module")
def preprocess():
    return load_encoders("tiny-clip").preprocess


@pytest.fixture(scope="module")
def collator() -> CaptionCollator:
    tokenizer, ret_id = build_tokenizer("tiny-opt")
    return CaptionCollator(tokenizer, MAX_LEN, ret_id)


# ----------------------------------------------------------------------------- reader


def test_reader_counts_each_bad_row_kind(fixture_dir):
    tsv, image_dir = fixture_dir
    rows, skipped = read_caption_tsv(tsv, image_dir)
    assert skipped == Counter(
        missing_image=1, empty_caption=1, bad_fields=2, blank_line=1, bad_encoding=1, empty_image_name=1
    )
    expected = [c for c, _ in GOOD_ROWS] + [c for c, _, _ in BAD_IMAGE_ROWS]
    assert [r.caption for r in rows] == expected  # quotes kept verbatim, no line swallowed
    assert rows[0] == CaptionRow(index=0, caption="a red square", image_path=str(image_dir / "rgb.jpg"))
    assert rows[2].index == 6  # line index in the file (after the header), bad rows included


def test_row_table_round_trips(fixture_dir):
    rows, _ = read_caption_tsv(*fixture_dir)
    rows.append(CaptionRow(index=99, caption="ünïcödé 🐶 \"q\"", image_path="/x/y.jpg"))
    table = RowTable(rows)
    assert len(table) == len(rows) and list(table) == rows
    assert table[-1] == rows[-1] and table[1:3] == rows[1:3]
    assert len(RowTable([])) == 0


def test_reader_accepts_bom_crlf_and_subdirectories(tmp_path):
    image_dir = tmp_path / "images"
    make_images(image_dir)
    (image_dir / "sub").mkdir()
    Image.fromarray(_noise(20, 20)).save(image_dir / "sub" / "x.png")
    tsv = tmp_path / "crlf.tsv"
    tsv.write_bytes(b"\xef\xbb\xbfcaption\timage\r\n a dog \trgb.jpg\r\nin a folder\tsub/x.png\r\n")
    rows, skipped = read_caption_tsv(tsv, image_dir)
    assert [r.caption for r in rows] == ["a dog", "in a folder"]
    assert rows[1].image_path == str(image_dir / "sub" / "x.png")
    assert sum(skipped.values()) == 0


@pytest.mark.parametrize("header", [b"", b"image\tcaption", b"caption,image", b"a dog\trgb.jpg"])
def test_reader_requires_header(tmp_path, header):
    image_dir = tmp_path / "images"
    make_images(image_dir)
    tsv = tmp_path / "noheader.tsv"
    tsv.write_bytes(header + b"\n" + good_line("a dog", "rgb.jpg") + b"\n" if header else b"")
    with pytest.raises(ValueError, match=r"noheader\.tsv.*(header|empty)"):
        read_caption_tsv(tsv, image_dir)


def test_reader_fails_clearly_when_no_valid_row(tmp_path):
    image_dir = tmp_path / "images"
    make_images(image_dir)
    tsv = write_tsv(tmp_path / "allbad.tsv", [raw for raw, _ in BAD_LINES])
    with pytest.raises(ValueError, match=r"allbad\.tsv: no valid row .*missing_image=1"):
        read_caption_tsv(tsv, image_dir)


def test_reader_wrong_paths(tmp_path, fixture_dir):
    tsv, image_dir = fixture_dir
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_caption_tsv(tmp_path / "nope.tsv", image_dir)
    with pytest.raises(FileNotFoundError, match="no_images"):
        read_caption_tsv(tsv, tmp_path / "no_images")


def test_build_cc3m_datasets(fixture_dir, preprocess):
    tsv, image_dir = fixture_dir
    ds = build_cc3m_datasets(tsv.parent, image_dir, preprocess, split="train")
    assert len(ds) == len(GOOD_ROWS) + len(BAD_IMAGE_ROWS)
    assert ds.read_skipped["bad_fields"] == 2
    with pytest.raises(FileNotFoundError, match="cc3m_val.tsv"):
        build_cc3m_datasets(tsv.parent, image_dir, preprocess, split="val")


# ---------------------------------------------------------------------- image loading


@pytest.mark.parametrize("name", [i for _, i in GOOD_ROWS])
def test_images_convert_to_rgb(fixture_dir, name):
    _, image_dir = fixture_dir
    img = load_rgb_image(image_dir / name)
    assert img.mode == "RGB"
    with Image.open(image_dir / name) as original:
        assert img.size == original.size


def test_rgba_is_composited_on_white(fixture_dir):
    arr = np.asarray(load_rgb_image(fixture_dir[1] / "rgba.png"))
    assert (arr[:, :12] == (255, 0, 0)).all()
    assert (arr[:, 12:] == 255).all()  # transparent black shows as white, not black


def test_16bit_grayscale_is_rescaled_not_clipped(fixture_dir):
    arr = np.asarray(load_rgb_image(fixture_dir[1] / "gray16.png"))
    assert (arr == 100).all()  # 257*100 / 257; convert("RGB") would give 255


@pytest.mark.parametrize("caption,name,reason", BAD_IMAGE_ROWS)
def test_unusable_images_raise_reason(fixture_dir, caption, name, reason):
    with pytest.raises(UnusableImage) as info:
        load_rgb_image(fixture_dir[1] / name)
    assert info.value.reason == reason


def test_decompression_bombs_are_too_large(fixture_dir, monkeypatch):
    path = fixture_dir[1] / "rgb.jpg"  # 40x30
    with pytest.raises(UnusableImage, match="too_large"):
        load_rgb_image(path, ImageChecks(max_pixels=1000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # PIL's own warning (> limit) and error (> 2x)
    with pytest.raises(UnusableImage, match="too_large"):
        load_rgb_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UnusableImage, match="too_large"):
        load_rgb_image(path)


def test_vanished_and_directory_images(fixture_dir):
    _, image_dir = fixture_dir
    with pytest.raises(UnusableImage, match="missing_image"):
        load_rgb_image(image_dir / "gone.jpg")
    (image_dir / "dir.jpg").mkdir()
    with pytest.raises(UnusableImage, match="unreadable_image"):
        load_rgb_image(image_dir / "dir.jpg")


# ------------------------------------------------------------------ dataset + collator


def test_dataset_samples(fixture_dir, preprocess):
    tsv, image_dir = fixture_dir
    rows, _ = read_caption_tsv(tsv, image_dir)
    ds = CaptionDataset(rows, preprocess)
    for i, (caption, _) in enumerate(GOOD_ROWS):
        sample = ds[i]
        assert sample["caption"] == caption and "skip" not in sample
        assert sample["pixels"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert sample["pixels"].dtype == torch.float32
    for j, (_, _, reason) in enumerate(BAD_IMAGE_ROWS):
        sample = ds[len(GOOD_ROWS) + j]
        assert sample["pixels"] is None and sample["skip"] == reason


def test_preprocess_errors_are_skipped(fixture_dir):
    tsv, image_dir = fixture_dir
    rows, _ = read_caption_tsv(tsv, image_dir)

    def broken(_):
        raise RuntimeError("boom")

    assert CaptionDataset(rows, broken)[0]["skip"] == "preprocess_error"


def test_dataloader_never_raises_and_counts(fixture_dir, preprocess, collator):
    tsv, image_dir = fixture_dir
    rows, read_skipped = read_caption_tsv(tsv, image_dir)
    ds = CaptionDataset(rows, preprocess)
    loader = DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collator)
    counter = SkipCounter()
    seen = []
    for batch in loader:
        counter.update(batch)
        b = len(batch["captions"])
        seen += batch["index"].tolist()
        if b:
            assert batch["pixels"].shape == (b, 3, IMAGE_SIZE, IMAGE_SIZE)
            assert batch["ret_ids"].shape[0] == b and batch["caption_ids"].shape[0] == b
            assert batch["ret_ids"].shape[1] <= MAX_LEN
            assert (batch["ret_ids"].gather(1, batch["ret_mask"].sum(1, keepdim=True) - 1) == collator.ret_id).all()
    assert counter.kept == len(GOOD_ROWS)
    assert counter.reasons == Counter({r: 1 for _, _, r in BAD_IMAGE_ROWS})
    assert counter.empty_batches == 1  # the last 4 rows are exactly the 4 unusable images
    assert seen == [r.index for r in rows[: len(GOOD_ROWS)]]
    counter.add(read_skipped)
    line = counter.summary("epoch 0")
    assert "\n" not in line and "8 samples used" in line and "too_small=1" in line and "bad_fields=2" in line


def test_empty_batch_is_representable(collator):
    samples = [{"index": 3, "caption": "x", "pixels": None, "skip": "corrupt_image"},
               {"index": 4, "caption": "y", "pixels": None, "skip": "too_small"}]
    batch = collator(samples)
    assert is_empty_batch(batch)
    assert batch["skipped"] == Counter(corrupt_image=1, too_small=1)
    assert batch["index"].shape == (0,) and batch["ret_ids"].shape == (0, 0)
    assert "pixels" not in batch
    counter = SkipCounter()
    counter.update(batch)
    assert counter.empty_batches == 1 and counter.skipped == 2


def test_collator_stacks_cached_features(collator):
    samples = [
        {"index": i, "caption": f"caption {i}", "image_pooled": torch.full((6,), float(i)),
         "image_embed": torch.zeros(4), "text_embed": torch.ones(4)}
        for i in range(3)
    ]
    batch = collator(samples)
    assert batch["image_pooled"].shape == (3, 6) and batch["image_pooled"][2, 0] == 2
    assert batch["text_embed"].shape == (3, 4) and "pixels" not in batch
    assert batch["index"].tolist() == [0, 1, 2]


def _sideways_jpeg(path: Path) -> Image.Image:
    """A photo stored sideways with EXIF Orientation 6 (what phones write); returns it upright."""
    upright = Image.new("RGB", (40, 64), "white")
    upright.paste((255, 0, 0), (0, 0, 40, 16))  # red band at the top
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    stored.save(path, "JPEG", quality=95, exif=exif)
    return upright


def test_exif_orientation_is_applied_by_the_one_loader(tmp_path):
    from unimur.utils.images import prepare_image

    upright = _sideways_jpeg(tmp_path / "phone.jpg")
    loaded = load_rgb_image(tmp_path / "phone.jpg")
    assert loaded.size == upright.size == (40, 64)
    top, bottom = np.asarray(loaded)[4, 20], np.asarray(loaded)[60, 20]
    assert top[0] > 200 and top[1] < 60 and bottom.min() > 200  # red on top, as the photo was taken
    with Image.open(tmp_path / "phone.jpg") as raw:  # a PIL image handed over directly: same rules
        assert np.array_equal(np.asarray(prepare_image(raw)), np.asarray(loaded))
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent pixels that store black
    assert np.asarray(prepare_image(rgba)).min() == 255  # composited on white, as load_rgb_image does


def test_pil_image_given_to_the_model_embeds_like_the_loaded_file(tmp_path):
    from unimur.config import ModelConfig
    from unimur.model.model import UniMuR

    _sideways_jpeg(tmp_path / "phone.jpg")
    torch.manual_seed(0)
    model = UniMuR.build(ModelConfig(llm="tiny-opt", visual_model="tiny-clip")).eval()
    with torch.no_grad(), Image.open(tmp_path / "phone.jpg") as raw:
        a = model.encode_context([["look", raw]])
        b = model.encode_context([["look", load_rgb_image(tmp_path / "phone.jpg")]])
    assert torch.equal(a, b)


def test_feature_cache_key_changes_with_the_image_loader(monkeypatch):
    import unimur.data.feature_cache as fc

    encoders = load_encoders("tiny-clip")
    rows = [CaptionRow(index=0, caption="x", image_path="a.jpg")]
    before = fc.cache_key(encoders, rows, "fp32", fingerprint="f")
    monkeypatch.setattr(fc, "IMAGE_LOADER_VERSION", fc.IMAGE_LOADER_VERSION + 1)
    assert fc.cache_key(encoders, rows, "fp32", fingerprint="f") != before
