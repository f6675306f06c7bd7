"""README.md's "Use a trained model" Python block, extracted from the README and run as written
(on a tiny model), so the documented code and the API cannot drift apart."""
import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(section: str) -> str:
    """The one ```python block of the README section titled ``section``."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)
    assert len(blocks) == 1, f"expected one python block in '{section}', found {len(blocks)}"
    return blocks[0]


def test_use_a_trained_model_block_runs(tiny_pool, tmp_path, monkeypatch):
    from test_retrieve import reference

    from unimur.inference.image_embeddings import load_image_embeddings
    from unimur.utils.images import load_rgb_image

    code = readme_block("Use a trained model")
    # the files the block names, in a fresh working folder: the tiny model, its pool, a photo
    shutil.copytree(tiny_pool.model_dir, tmp_path / "unimur_model")
    shutil.copy(tiny_pool.images, tmp_path / "unimur_model" / "image_embeddings.safetensors")
    shutil.copy(tiny_pool.image_dir / "red_circle.png", tmp_path / "my_circle.png")
    monkeypatch.chdir(tmp_path)
    namespace, out = {"__name__": "readme"}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)

    images = load_image_embeddings(tiny_pool.images)
    pieces = [namespace["dialogue"][0], load_rgb_image(tmp_path / "my_circle.png"), namespace["dialogue"][2]]
    ref_img, ref_txt = reference(tiny_pool.model, pieces, images, namespace["texts"], 3, raw=True)
    expected = [f"image {s:.3f}  {i}" for i, s in ref_img] + [f"text  {s:.3f}  {t}" for t, s in ref_txt]
    lines = out.getvalue().splitlines()
    assert len(lines) == 6
    for got, want in zip(lines, expected):  # same ids/texts, scores to the printed 3 decimals
        assert got.split()[2:] == want.split()[2:]
        assert float(got.split()[1]) == pytest.approx(float(want.split()[1]), abs=1.5e-3)
