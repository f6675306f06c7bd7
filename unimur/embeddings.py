"""Image-embedding collections: computing them with a model, and storing them safely.

An `ImageEmbeddings` holds, for an ordered list of image ids:
  embeds        (N, E) L2-normalised retrieval-space embeddings v (what a query u is scored
                against: CLIP-V, or W_v of it when target_proj=linear);
  cap_features  (N, Dc) the W_cap input feature, so the same images can appear *inside* a
                context (MMDialog) without re-encoding;
  clip_embeds   (N, Dv) L2-normalised frozen CLIP-V joint embeddings (cross-modal consistency).

Stored as one safetensors file (ids in the JSON metadata). FROMAGe's `cc3m_embeddings.pkl`
layout (`{"paths": [...], "embeddings": (N, D)}`) can be written, and read only with an
explicit `allow_pickle=True`, because unpickling runs code from the file.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

TENSORS = ("embeds", "cap_features", "clip_embeds")


@dataclass
class ImageEmbeddings:
    ids: list[str]
    embeds: torch.Tensor
    cap_features: torch.Tensor | None = None
    clip_embeds: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in TENSORS:
            t = getattr(self, name)
            if t is not None and t.shape[0] != len(self.ids):
                raise ValueError(f"{name} has {t.shape[0]} rows for {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.ids)

    def position(self) -> dict[str, int]:
        """id -> row."""
        return {k: i for i, k in enumerate(self.ids)}

    def select(self, ids: list[str]) -> "ImageEmbeddings":
        pos = self.position()
        missing = [i for i in ids if i not in pos]
        if missing:
            raise KeyError(f"{len(missing)} ids not in the embedding file, e.g. {missing[:3]}")
        rows = torch.tensor([pos[i] for i in ids], dtype=torch.long)
        pick = {n: (getattr(self, n)[rows] if getattr(self, n) is not None else None) for n in TENSORS}
        return ImageEmbeddings(list(ids), meta=dict(self.meta), **pick)

    @staticmethod
    def concat(parts: list["ImageEmbeddings"]) -> "ImageEmbeddings":
        ids = [i for p in parts for i in p.ids]
        cat = {n: (torch.cat([getattr(p, n) for p in parts]) if all(getattr(p, n) is not None for p in parts)
                   else None) for n in TENSORS}
        return ImageEmbeddings(ids, meta=dict(parts[0].meta) if parts else {}, **cat)


def save_image_embeddings(emb: ImageEmbeddings, path: str | Path) -> None:
    """safetensors, written atomically; ids and metadata in the header."""
    path = Path(path)
    tensors = {n: getattr(emb, n).contiguous().cpu() for n in TENSORS if getattr(emb, n) is not None}
    # one metadata key: safetensors orders several keys differently from run to run, and a
    # resumed extraction must produce the same bytes as an uninterrupted one
    metadata = {"unimur": json.dumps({"ids": emb.ids, "meta": emb.meta}, sort_keys=True)}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_image_embeddings(path: str | Path, allow_pickle: bool = False) -> ImageEmbeddings:
    """Read a `.safetensors` file written by `save_image_embeddings`, or FROMAGe's pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    if path.suffix == ".pkl":
        return _load_fromage_pickle(path, allow_pickle)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        header = json.loads(metadata["unimur"])
        ids, meta = header["ids"], header["meta"]
    except Exception as e:
        raise ValueError(f"cannot read embedding file {path}: {e}") from e
    return ImageEmbeddings(ids, meta=meta, **{n: tensors.get(n) for n in TENSORS})


def save_fromage_pickle(emb: ImageEmbeddings, path: str | Path) -> None:
    """FROMAGe's `cc3m_embeddings.pkl` layout: {"paths": [str], "embeddings": (N, D) float32}."""
    payload = {"paths": list(emb.ids), "embeddings": emb.embeds.float().cpu().numpy()}
    _atomic(Path(path), lambda tmp: Path(tmp).write_bytes(pickle.dumps(payload, protocol=4)))


def _load_fromage_pickle(path: Path, allow_pickle: bool) -> ImageEmbeddings:
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickle: loading it runs code stored in the file. Pass --allow-pickle "
            "(allow_pickle=True) only for files you trust, or convert it once with "
            "`python unimur/extract_vis_emb.py --convert-pickle` to safetensors.")
    with open(path, "rb") as f:
        payload = pickle.load(f)  # noqa: S301 - explicit opt-in above
    if not isinstance(payload, dict) or not {"paths", "embeddings"} <= set(payload):
        raise ValueError(f"{path}: expected a dict with 'paths' and 'embeddings'")
    embeds = torch.as_tensor(np.asarray(payload["embeddings"], dtype=np.float32))
    if embeds.ndim != 2 or embeds.shape[0] != len(payload["paths"]):
        raise ValueError(f"{path}: 'embeddings' has shape {tuple(embeds.shape)} for {len(payload['paths'])} paths")
    # FROMAGe stores W_v outputs unnormalised (norms vary ~0.9-15) and L2-normalises them on
    # load; scoring them raw would rank by dot product, not cosine.
    embeds = torch.nn.functional.normalize(embeds, dim=-1)
    return ImageEmbeddings([str(p) for p in payload["paths"]], embeds,
                           meta={"source": "fromage-pickle", "normalised_on_load": True})


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
