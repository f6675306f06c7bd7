"""Candidate pools for retrieval with a trained model: the images and texts a dialogue is answered from.

Images come from an embedding file written by ``unimur/extract_vis_emb.py`` (safetensors; FROMAGe's
``cc3m_embeddings.pkl`` only with ``allow_pickle``), from the one embedding file kept in the model
folder (the seed README's layout), or from an image folder embedded now and cached under
``$UNIMUR_CACHE/pools`` (keyed by the model's weights and the folder's file list, sizes and times).
Texts come from a file: one response per line, or JSON Lines (``.jsonl``: a string or
``{"text": ...}`` per line).

Used by ``python -m unimur.commands.retrieve`` and ``python -m unimur.commands.app``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from unimur.inference.image_embeddings import (
    ImageEmbeddings,
    check_widths,
    finite_rows,
    load_image_embeddings,
    save_image_embeddings,
)
from unimur.utils.images import IMAGE_LOADER_VERSION

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"  # the model's own weights in a pruned folder, never a pool
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------
# Texts
# ----------------------------------------------------------------------------------------------


def read_texts(path: str | Path) -> list[str]:
    """Candidate responses from ``path``, in file order, blank lines skipped, duplicates kept once.

    ``.jsonl``/``.ndjson``: one JSON value per line, a string or an object with a ``text`` key.
    Anything else: one response per line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text pool not found: {path}")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    texts: dict[str, None] = {}
    # read_text already turned \r\n and \r into \n; str.splitlines would also split at U+2028,
    # U+0085, ... inside a response (the evaluation's line reader does not)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        text = _json_text(line, path, lineno) if jsonl else line
        if text.strip():
            texts.setdefault(text.strip())
    if not texts:
        raise ValueError(f"text pool {path} holds no text")
    return list(texts)


def _json_text(line: str, path: Path, lineno: int) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON ({e.msg}); a .jsonl text pool holds one JSON "
                         f"string or {{\"text\": ...}} per line") from e
    if isinstance(value, dict):
        value = value.get("text")
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: expected a JSON string or an object with a \"text\" string")
    return value


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def find_model_embeddings(model_dir: str | Path) -> Path | None:
    """The image embedding file kept in a model folder, or None.

    A ``.safetensors`` file other than the weights wins over a ``.pkl`` (a converted
    ``cc3m_embeddings.pkl`` sits next to its original); two candidates of the same kind are
    ambiguous and raise.
    """
    model_dir = Path(model_dir)
    safe = sorted(p for p in model_dir.glob("*.safetensors") if p.name != WEIGHTS_FILE and p.is_file())
    pickles = sorted(p for p in model_dir.glob("*.pkl") if p.is_file())
    for found in (safe, pickles):
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"{model_dir} holds several embedding files ({names}): choose one with --images")
        if found:
            return found[0]
    return None


def load_image_pool(path: str | Path, allow_pickle: bool = False, weights_sha256: str | None = None,
                    emb_dim: int | None = None, *, widths: dict[str, int] | None = None,
                    skip_nonfinite: bool = False) -> ImageEmbeddings:
    """An embedding file, checked against the model that will query it.

    ``widths``: each stored tensor's row width for the model (``embeddings.model_widths``;
    ``emb_dim`` alone checks the retrieval space): a mismatch means another model, an error.
    Rows holding NaN or inf are an error, or with ``skip_nonfinite`` left out and counted.
    ``weights_sha256``: the model's weights digest; a file recorded with other weights is used
    with a warning (its vectors are in that model's W_v space, or plain CLIP-V when target_proj=none).
    """
    emb = load_image_embeddings(path, allow_pickle=allow_pickle)
    if not len(emb):
        raise ValueError(f"embedding file {path} holds no image")
    check_widths(emb, path, widths if widths is not None else ({"embeds": emb_dim} if emb_dim else {}))
    emb = finite_rows(emb, path, skip_nonfinite)
    recorded = emb.meta.get("model_weights_sha256")
    if weights_sha256 and recorded and recorded != weights_sha256:
        logger.warning("%s was computed with other weights (sha256 %s..., this model %s...): scores "
                       "may be meaningless; re-run unimur/extract_vis_emb.py", path, recorded[:12],
                       weights_sha256[:12])
    return emb


def list_image_dir(image_dir: str | Path) -> tuple[list[str], list[Path]]:
    """(ids, paths) of the images under ``image_dir``, sorted; ids are paths relative to it."""
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no image found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return [p.relative_to(root).as_posix() for p in paths], paths


def cache_root() -> Path:
    return Path(os.environ.get("UNIMUR_CACHE", Path.home() / ".cache" / "unimur")) / "pools"


def image_dir_pool(embedder, image_dir: str | Path, weights_sha256: str,
                   cache_dir: str | Path | None = None) -> ImageEmbeddings:
    """Embeddings of every image under ``image_dir``, computed once per model and folder content.

    The cache file's name is a digest of the weights, the folder's absolute path and every
    file's (id, size, mtime): an added, removed or rewritten image, or another model, misses.
    """
    ids, paths = list_image_dir(image_dir)
    root = Path(image_dir).resolve()
    listing = [(i, p.stat().st_size, p.stat().st_mtime_ns) for i, p in zip(ids, paths)]
    key = hashlib.sha256(json.dumps([weights_sha256, str(root), listing, IMAGE_LOADER_VERSION]).encode()).hexdigest()[:24]
    cached = Path(cache_dir or cache_root()) / f"{key}.safetensors"
    if cached.is_file():
        logger.info("image pool: %d images of %s, embeddings cached in %s", len(ids), root, cached)
        return load_image_embeddings(cached)
    logger.info("image pool: embedding %d images of %s (cached afterwards in %s)", len(ids), root, cached)
    emb, skipped = embedder.embed_images(paths, ids)
    emb.meta = {"model_weights_sha256": weights_sha256, "image_root": str(root),
                "skipped": emb.meta.get("skipped", {})}
    if skipped:
        logger.warning("image pool: %d unreadable images left out (%s)", sum(skipped.values()), dict(skipped))
    save_image_embeddings(emb, cached)
    return emb


def image_file(image_id: str, emb: ImageEmbeddings | None = None, image_root: str | Path | None = None
               ) -> Path | None:
    """The file of a pool image, for display: ``image_root/id``, then the root recorded in the
    embedding file, then ``id`` itself (absolute, or relative to the working folder)."""
    roots = [r for r in (image_root, (emb.meta.get("image_root") if emb is not None else None)) if r]
    for candidate in [Path(r) / image_id for r in roots] + [Path(image_id)]:
        if candidate.is_file():
            return candidate
    return None
