"""Embed an image collection once, for retrieval (FROMAGe's cc3m_embeddings, made safe).

    python unimur/extract_vis_emb.py --model-dir unimur_model --image-dir MMDialog/test \
        --output unimur_model/mmdialog_test_embeddings.safetensors
    python unimur/extract_vis_emb.py --model-dir unimur_model --image-list images.txt --output OUT \
        --format fromage-pkl          # FROMAGe's {"paths", "embeddings"} pickle layout
    python unimur/extract_vis_emb.py --convert-pickle cc3m_embeddings.pkl --allow-pickle --output OUT

Ids are image paths relative to --image-dir (or as written in --image-list). Work is done in
parts of --part-size images, each written atomically under `<OUT>.parts/`; an interrupted run
rerun with the same arguments skips finished parts, and the merged file is identical to an
uninterrupted run's. Unreadable images are skipped, listed in `<OUT>.skipped.json`, and
counted in the log.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import torch

from unimur.inference.image_embeddings import (
    ImageEmbeddings,
    load_image_embeddings,
    part_ids,
    save_fromage_pickle,
    save_image_embeddings,
    save_image_embeddings_from_parts,
)
from unimur.model.pretrained import artifact_owning
from unimur.utils.images import IMAGE_LOADER_VERSION

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(image_dir: str | Path | None = None, image_list: str | Path | None = None) -> tuple[list[str], list[Path]]:
    """(ids, paths), sorted by id for a directory, in file order for a list."""
    if (image_dir is None) == (image_list is None):
        raise ValueError("give exactly one of --image-dir and --image-list")
    if image_dir is not None:
        root = Path(image_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"image directory not found: {root}")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        ids = [p.relative_to(root).as_posix() for p in paths]
    else:
        lst = Path(image_list)
        if not lst.is_file():
            raise FileNotFoundError(f"image list not found: {lst}")
        ids = [line.strip() for line in lst.read_text().splitlines() if line.strip()]
        paths = [Path(i) if Path(i).is_absolute() else lst.parent / i for i in ids]
    if not ids:
        raise ValueError(f"no images found in {image_dir or image_list}")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate image ids in the input")
    return ids, paths


def _plan_key(model_dir: Path, ids: list[str], part_size: int) -> str:
    """Identifies the work: model weights + image list + part size. A changed plan restarts."""
    h = hashlib.sha256()
    h.update((model_dir / "manifest.json").read_bytes())
    h.update(json.dumps([ids, part_size, IMAGE_LOADER_VERSION]).encode())  # parts of the old loader restart
    return h.hexdigest()


def extract(model_dir: str | Path, ids: list[str], paths: list[Path], output: str | Path, *,
            fmt: str = "safetensors", batch_size: int = 64, workers: int = 0, part_size: int = 4096,
            device: str = "cpu", max_parts: int | None = None, image_root: str | Path | None = None
            ) -> Path | None:
    """Embed `paths` into `output`; resumable by parts. `max_parts` stops early (tests).
    `image_root`: the folder the ids are relative to, recorded in the file (to show the images)."""
    from unimur.inference.embedder import ModelEmbedder
    from unimur.model.model import UniMuR

    model_dir, output = Path(model_dir), Path(output)
    check_output(output)
    parts_dir = output.with_name(output.name + ".parts")
    key = _plan_key(model_dir, ids, part_size)
    plan = parts_dir / "plan.json"
    if plan.exists() and json.loads(plan.read_text()).get("key") != key:
        logger.warning("%s belongs to other inputs or weights: starting over", parts_dir)
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps({"key": key, "n": len(ids), "part_size": part_size}))

    embedder = ModelEmbedder(UniMuR.from_pretrained(model_dir, device), batch_size=batch_size,
                             num_workers=workers, progress=True)
    n_parts = (len(ids) + part_size - 1) // part_size
    done_now = 0
    for p in range(n_parts):
        part, skip_file = parts_dir / f"part_{p:06d}.safetensors", parts_dir / f"part_{p:06d}.skipped.json"
        if part.exists() and skip_file.exists():
            continue
        if max_parts is not None and done_now >= max_parts:
            logger.info("stopping after %d parts (max_parts)", done_now)
            return None
        sl = slice(p * part_size, (p + 1) * part_size)
        emb, skipped = _embed_part(embedder, paths[sl], ids[sl])
        save_image_embeddings(emb, part)
        skip_file.write_text(json.dumps(skipped, sort_keys=True))
        done_now += 1
        logger.info("part %d/%d: %d images, %d skipped", p + 1, n_parts, len(emb), len(skipped))

    n, skipped = _merge(parts_dir, n_parts, model_dir, output, fmt, image_root)
    output.with_name(output.name + ".skipped.json").write_text(json.dumps(skipped, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(parts_dir)
    logger.info("wrote %s: %d images embedded, %d skipped (%s)", output, n, len(skipped),
                dict(Counter(skipped.values())) or "none")
    return output


def _embed_part(embedder, paths: list[Path], ids: list[str]) -> tuple[ImageEmbeddings, dict[str, str]]:
    """Embeddings of one part and {id: reason} of its unusable images."""
    try:
        emb, _ = embedder.embed_images(paths, ids)
    except ValueError as e:  # every image of this part is unusable
        logger.warning("no usable image in this part: %s", e)
        m = embedder.model
        empty = ImageEmbeddings([], torch.empty(0, m.emb_dim), torch.empty(0, m.cap_mapping.in_features),
                                torch.empty(0, m.encoders.image_embed_dim))
        reasons = getattr(e, "skipped", {})  # NoUsableImages names each image's reason
        return empty, {i: reasons.get(i, "unusable_image") for i in ids}
    skipped = emb.meta.pop("skipped", {})
    return emb, skipped


def _merge(parts_dir: Path, n_parts: int, model_dir: Path, output: Path, fmt: str,
           image_root: str | Path | None) -> tuple[int, dict[str, str]]:
    """Write the parts as one file; (rows written, {id: reason} of the skipped images).

    safetensors is merged part by part, so memory stays at one part's size however many
    images there are; FROMAGe's pickle layout is one object, so it is built in memory.
    """
    files = [parts_dir / f"part_{p:06d}.safetensors" for p in range(n_parts)]
    skipped: dict[str, str] = {}
    for p in range(n_parts):
        skipped.update(json.loads((parts_dir / f"part_{p:06d}.skipped.json").read_text()))
    if not any(part_ids(f) for f in files):
        raise ValueError(f"none of the images could be embedded ({dict(Counter(skipped.values()))})")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    meta = {"model_weights_sha256": manifest["weights_sha256"], "space": "unified retrieval space"}
    if image_root is not None:
        meta["image_root"] = str(Path(image_root).resolve())
    if fmt == "fromage-pkl":
        merged = ImageEmbeddings.concat([load_image_embeddings(f) for f in files])
        merged.meta = meta
        save_fromage_pickle(merged, output)
        return len(merged), skipped
    return save_image_embeddings_from_parts(files, output, meta), skipped


def check_output(output: str | Path) -> None:
    """Refuse an output that is another artifact's file (``--output unimur_model/model.safetensors``
    would replace the trained weights, and the folder would no longer load)."""
    owner = artifact_owning(output)
    if owner:
        raise ValueError(f"--output {output} is {owner}: writing embeddings there would destroy it; give "
                         f"another file name, e.g. {Path(output).parent / 'image_embeddings.safetensors'}")


def convert_pickle(src: str | Path, output: str | Path, allow_pickle: bool) -> Path:
    check_output(output)
    emb = load_image_embeddings(src, allow_pickle=allow_pickle)
    save_image_embeddings(emb, output)
    logger.info("converted %s -> %s (%d embeddings)", src, output, len(emb))
    return Path(output)
