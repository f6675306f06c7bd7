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
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unimur.utils.files import atomic_write

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
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# torch dtype -> safetensors dtype name (the header's "dtype"), in safetensors' own order of
# dtypes (its files list tensors by dtype, descending, then by name)
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                       torch.float64: "F64"}


def part_ids(path: str | Path) -> list[str]:
    """The ids of a file written by `save_image_embeddings`, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["unimur"])["ids"]


def save_image_embeddings_from_parts(parts: list[Path], path: str | Path, meta: dict) -> int:
    """Concatenate files written by `save_image_embeddings` into one such file, in memory
    bounded by one part's tensor; returns the number of rows.

    At millions of images the merged tensors are tens of GB: loading every part, concatenating
    and then serialising (safetensors' ``save_file`` builds each tensor's bytes in memory) would
    hold them two or three times. The safetensors layout is simple (an 8-byte little-endian
    header length, a JSON header of dtype / shape / byte offsets per tensor, then the raw
    bytes), so the header is written from the parts' shapes and each tensor's bytes are copied
    part by part. A tensor is kept only if every part has it (as `ImageEmbeddings.concat`);
    the file reads back with `load_image_embeddings` like one written in one go.
    """
    from safetensors import safe_open

    if not parts:
        raise ValueError("no parts to merge")
    ids: list[str] = []
    shapes: dict[str, list[tuple[list[int], str]]] = {n: [] for n in TENSORS}
    for part in parts:
        ids += part_ids(part)
        with safe_open(str(part), framework="pt") as f:
            keys = set(f.keys())
            for n in TENSORS:
                if n in keys:
                    sl = f.get_slice(n)
                    shapes[n].append((list(sl.get_shape()), sl.get_dtype()))
    names = [n for n in TENSORS if len(shapes[n]) == len(parts)]
    rank = {name: i for i, name in enumerate(_SAFETENSORS_DTYPES.values())}
    # the library's layout (by dtype, descending, then name), so the bytes equal save_file's
    names.sort(key=lambda n: (-rank.get(shapes[n][0][1], -1), n))
    header: dict = {"__metadata__": {"unimur": json.dumps({"ids": ids, "meta": meta}, sort_keys=True)}}
    offset = 0
    for n in names:
        trailing, dtypes = {tuple(s[1:]) for s, _ in shapes[n]}, {d for _, d in shapes[n]}
        if len(trailing) != 1 or len(dtypes) != 1:
            raise ValueError(f"parts disagree on {n}: shapes {sorted(trailing)}, dtypes {sorted(dtypes)}")
        rows = sum(s[0] for s, _ in shapes[n])
        if rows != len(ids):
            raise ValueError(f"{n} has {rows} rows for {len(ids)} ids across the parts")
        (dtype,), (rest,) = dtypes, trailing
        item = next((t.itemsize for t, name in _SAFETENSORS_DTYPES.items() if name == dtype), None)
        if item is None:
            raise ValueError(f"{n}: dtype {dtype} is not one of {sorted(_SAFETENSORS_DTYPES.values())}")
        size = rows * int(np.prod(rest, dtype=np.int64)) * item
        header[n] = {"dtype": dtype, "shape": [rows, *rest], "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # as safetensors does: the data starts 8-byte aligned

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            out.write(len(head).to_bytes(8, "little") + head)
            for n in names:
                for part in parts:
                    with safe_open(str(part), framework="pt") as f:
                        t = f.get_tensor(n).contiguous()
                    out.write(t.view(torch.uint8).numpy().data)  # raw little-endian bytes, no copy

    atomic_write(Path(path), write)
    return len(ids)


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


def model_widths(model) -> dict[str, int]:
    """The row width each stored tensor must have for ``model`` (a UniMuR): the retrieval
    space, W_cap's input, CLIP-V's joint space."""
    return {"embeds": int(model.emb_dim), "cap_features": int(model.cap_mapping.in_features),
            "clip_embeds": int(model.encoders.image_embed_dim)}


def check_widths(emb: ImageEmbeddings, path: str | Path, widths: dict[str, int]) -> None:
    """Every stored tensor is (N, width) for the model: a file of another model otherwise
    loads fine and fails later inside a matmul (a pool image used in a dialogue)."""
    for name in TENSORS:
        t = getattr(emb, name)
        if t is None or name not in widths:
            continue
        if t.ndim != 2 or t.shape[1] != widths[name]:
            raise ValueError(f"embedding file {path}: {name} has shape {tuple(t.shape)} but the model needs "
                             f"(N, {widths[name]}): it was computed with another model; re-run "
                             f"unimur/extract_vis_emb.py with this --model-dir")


def finite_rows(emb: ImageEmbeddings, path: str | Path, skip: bool = False) -> ImageEmbeddings:
    """``emb`` if every stored value is finite. A NaN row scores NaN against every query and
    its rank is then arbitrary, so such rows are refused (ValueError), or with ``skip`` left
    out, counted in ``meta["nonfinite_rows_skipped"]`` and logged."""
    bad = torch.zeros(len(emb), dtype=torch.bool)
    for name in TENSORS:
        t = getattr(emb, name)
        if t is not None and t.numel():
            bad |= ~torch.isfinite(t.float()).reshape(len(emb), -1).all(dim=1)
    n_bad = int(bad.sum())
    if not n_bad:
        return emb
    example = emb.ids[int(bad.nonzero()[0])]
    if not skip:
        raise ValueError(f"embedding file {path}: {n_bad} of {len(emb)} rows hold NaN or inf (e.g. {example!r}); "
                         f"re-extract it, or pass --skip-nonfinite-embeddings to leave those rows out")
    kept = emb.select([i for i, b in zip(emb.ids, bad.tolist()) if not b])
    kept.meta["nonfinite_rows_skipped"] = n_bad
    logger.warning("embedding file %s: %d of %d rows hold NaN or inf (e.g. %r); left out", path, n_bad, len(emb), example)
    if not len(kept):
        raise ValueError(f"embedding file {path}: every row holds NaN or inf")
    return kept


def save_fromage_pickle(emb: ImageEmbeddings, path: str | Path) -> None:
    """FROMAGe's `cc3m_embeddings.pkl` layout: {"paths": [str], "embeddings": (N, D) float32}."""
    payload = {"paths": list(emb.ids), "embeddings": emb.embeds.float().cpu().numpy()}
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(pickle.dumps(payload, protocol=4)))


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
