"""Frozen CLIP features of a caption dataset, computed once and reused (SPEC section 2).

CLIP is frozen, so the CLIP-V (pooled + joint embedding) and CLIP-T features of a fixed
dataset never change; caching them removes image decoding and the CLIP forward from every
training step.

Files, in ``cache_dir`` (``name`` defaults to ``features``):

* ``<name>.safetensors``: tensors ``image_pooled`` (N, Dp), ``image_embed`` (N, Dv),
  ``text_embed`` (N, Dt) in the storage dtype, ``valid`` (N,) bool and ``skip_code`` (N,) uint8
  (0 = valid, else 1 + index in :data:`unimur.utils.images.IMAGE_SKIP_REASONS`), one row per
  :class:`~unimur.data.cc3m.CaptionRow`, in row order. Invalid rows hold zero image features.
* ``<name>.json``: the sidecar: cache key and the parts it hashes, row/valid counts, skip
  counts, dims, and the data file's SHA-256 and stamp (size, mtime, header hash). It is
  written last, so it marks a finished build.

Storage dtype: fp16 by default (half the fp32 size; the training code passes bf16 with
``--precision bf16`` and fp32 only when asked, ``--cache-dtype fp32``).

Integrity: the build computes the SHA-256 once, from the bytes as it writes them (re-reading
17 GB to hash it again kept the other ranks waiting in a collective). Every later
start only compares the stamp (size + mtime + SHA-256 of the header): constant cost, where
re-hashing 17 GB on every rank took minutes. A file whose mtime changed (copied without
``-p``) is hashed once; if the hash matches, the sidecar's stamp is renewed. A full re-hash on
every start is ``verify_checksum=True`` (``--cache-verify``).

Nothing is pickled. The data file is read through a memory map (zero-copy): at CC3M scale
with ViT-L/14 it holds ~3.3M x 2560 values, 17 GB in fp16, and every rank and DataLoader
worker then shares one page-cached copy instead of holding its own.

Key (:func:`cache_key`): SHA-256 over the encoder identity (weights and preprocessing), the
storage dtype, the autocast dtype the encoders ran under (the training precision's: bf16 and
fp16 features differ in their low bits), the image checks that decide validity, the number of rows and the dataset
fingerprint. The training code passes the shard-level fingerprint of ``unimur.data.cc3m_sources``
(name, size, mtime of each index file and image folder: constant cost per image). Without
one, the per-row fingerprint is used (caption, image name, size and mtime of every image: a
``stat`` per image, 3.3M at CC3M scale, but it also notices an image replaced in place).

Multi-GPU build: when torch.distributed is initialised every rank encodes a contiguous
shard of the rows and writes ``<name>.shard-<r>-of-<W>.<key>.<job>.safetensors`` into
``cache_dir`` (through a temporary name and ``os.replace``; ``<job>`` is drawn by rank 0 for
this build, so two jobs building into one folder never read each other's shards); after a
barrier rank 0 merges the shards into a temporary file and ``os.replace``s it into place, then
every rank loads the result. ``cache_dir`` must therefore be on a filesystem shared by all
ranks: :func:`check_shared_folder` proves it (a file written by rank 0, read by every rank)
before anything is built, and ends in one line if it is not.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from unimur.data.cc3m import CaptionDataset, CaptionRow
from unimur.errors import UniMuRError
from unimur.utils.distributed import all_ranks, barrier, broadcast_object, get_rank, get_world_size, is_main_process
from unimur.utils.files import file_sha256
from unimur.utils.images import IMAGE_LOADER_VERSION, IMAGE_SKIP_REASONS, ImageChecks
from unimur.utils.safetensors_io import CacheMiss, file_stamp, read_safetensors, write_safetensors  # noqa: F401 (tests use them via fc)

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "FeatureCache",
    "CacheMiss",
    "cache_key",
    "cache_paths",
    "build_feature_cache",
    "load_feature_cache",
    "load_or_build_feature_cache",
]

FORMAT = "unimur-feature-cache"
FORMAT_VERSION = 2  # 2: stamp (size, mtime, header hash) in the sidecar; shard-level fingerprints
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FEATURE_NAMES = ("image_pooled", "image_embed", "text_embed")
# Float tensors first: every tensor then starts at an offset aligned to its element size.
TENSOR_NAMES = (*FEATURE_NAMES, "valid", "skip_code")



# --------------------------------------------------------------------------------- key


def _dtype_name(dtype: str | torch.dtype) -> str:
    """Storage dtype as one of STORAGE_DTYPES' names."""
    if isinstance(dtype, torch.dtype):
        for name, value in STORAGE_DTYPES.items():
            if value == dtype:
                return name
    elif dtype in STORAGE_DTYPES:
        return dtype
    raise ValueError(f"unsupported cache dtype {dtype!r}; use one of {sorted(STORAGE_DTYPES)}")


def dataset_fingerprint(rows: Sequence[CaptionRow]) -> str:
    """SHA-256 of the rows' captions, image file names, sizes and mtimes, in order."""
    h = hashlib.sha256()
    for row in rows:
        try:
            st = os.stat(row.image_path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # vanished since the TSV was read: still a definite dataset state
            size, mtime = -1, -1
        # JSON-encode each row so captions containing tabs/newlines cannot collide.
        h.update(json.dumps([row.caption, os.path.basename(row.image_path), size, mtime]).encode())
        h.update(b"\n")
    return h.hexdigest()


def _key_parts(encoders, rows: Sequence[CaptionRow], dtype: str | torch.dtype, checks: ImageChecks,
               fingerprint: str | None = None, autocast: str | None = None) -> dict[str, Any]:
    """Everything the cached content depends on, by name (stored in the sidecar, so a stale
    cache can say which part changed). fingerprint: the source's shard-level fingerprint;
    None: the per-row one (:func:`dataset_fingerprint`)."""
    return {
        "format": f"{FORMAT}/{FORMAT_VERSION}",
        "encoder_identity": encoders.identity,
        "dtype": _dtype_name(dtype),
        "autocast": autocast,
        "image_checks": repr(checks),
        "image_loader": IMAGE_LOADER_VERSION,
        "skip_reasons": list(IMAGE_SKIP_REASONS),
        "num_rows": len(rows),
        "dataset": fingerprint if fingerprint is not None else "rows:" + dataset_fingerprint(rows),
    }


def _key_from_parts(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_key(encoders, rows: Sequence[CaptionRow], dtype: str | torch.dtype, checks: ImageChecks = ImageChecks(),
              fingerprint: str | None = None, autocast: str | None = None) -> str:
    """Hex SHA-256 identifying the cache content (see module docstring)."""
    return _key_from_parts(_key_parts(encoders, rows, dtype, checks, fingerprint, autocast))


def cache_paths(cache_dir: str | os.PathLike, name: str = "features") -> tuple[Path, Path]:
    """(data file, sidecar) of a cache."""
    cache_dir = Path(cache_dir)
    return cache_dir / f"{name}.safetensors", cache_dir / f"{name}.json"


# ------------------------------------------------------------------------------ cache


@dataclass
class FeatureCache:
    """Cached CLIP features of a row list (tensors are memory-mapped, row order = rows).

    image_pooled (N, Dp), image_embed (N, Dv), text_embed (N, Dt): storage dtype.
    valid (N,) bool; skip_code (N,) uint8: 0 valid, else 1 + IMAGE_SKIP_REASONS index.
    """

    path: Path
    key: str
    image_pooled: torch.Tensor
    image_embed: torch.Tensor
    text_embed: torch.Tensor
    valid: torch.Tensor
    skip_code: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.valid.shape[0])

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def skip_counts(self) -> Counter:
        """Invalid rows per reason."""
        codes = Counter(self.skip_code[~self.valid].tolist())
        return Counter({_reason_of(code): n for code, n in codes.items()})

    # DataLoader workers started with "spawn" pickle the dataset: send the path, not the
    # gigabytes, and map the file again on the other side.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "key": self.key, "metadata": self.metadata}

    def __setstate__(self, state: dict[str, Any]) -> None:
        tensors, _ = read_safetensors(Path(state["path"]))
        self.__dict__.update(state)
        self.__dict__.update({name: tensors[name] for name in TENSOR_NAMES})


def _reason_of(code: int) -> str:
    return IMAGE_SKIP_REASONS[code - 1] if 1 <= code <= len(IMAGE_SKIP_REASONS) else f"code_{code}"


def _code_of(reason: str) -> int:
    return IMAGE_SKIP_REASONS.index(reason) + 1


def load_feature_cache(
    cache_dir: str | os.PathLike,
    name: str = "features",
    expected_key: str | None = None,
    expected_parts: dict[str, Any] | None = None,
    verify_checksum: bool = False,
) -> FeatureCache:
    """Open a finished cache; raise CacheMiss (missing / stale / corrupt) if it is not usable.

    By default only the stamp is compared (size, mtime, header hash: constant cost); a changed
    mtime with an unchanged SHA-256 renews the stamp. verify_checksum: always re-hash the
    whole data file against the sidecar's SHA-256 (catches flipped bytes in place).
    """
    data_path, sidecar_path = cache_paths(cache_dir, name)
    sidecar = _read_sidecar(sidecar_path)
    if expected_key is not None and sidecar.get("key") != expected_key:
        raise CacheMiss("stale", _what_changed(sidecar.get("parts", {}), expected_parts))
    if not data_path.is_file():
        raise CacheMiss("corrupt", f"{data_path} is missing next to its sidecar")
    if data_path.stat().st_size != sidecar.get("file_bytes"):
        raise CacheMiss("corrupt", f"{data_path}: {data_path.stat().st_size} bytes, sidecar says {sidecar.get('file_bytes')} (truncated?)")
    _check_integrity(data_path, sidecar_path, sidecar, verify_checksum)
    tensors, _ = read_safetensors(data_path)
    _check_tensors(data_path, tensors, sidecar.get("num_rows"))
    return FeatureCache(path=data_path, key=sidecar["key"], metadata=sidecar, **{n: tensors[n] for n in TENSOR_NAMES})


def _check_integrity(data_path: Path, sidecar_path: Path, sidecar: dict[str, Any], full: bool) -> None:
    stamp = file_stamp(data_path)
    if stamp["header_sha256"] != sidecar.get("header_sha256"):
        raise CacheMiss("corrupt", f"{data_path}: header differs from the one the sidecar records")
    if not full and stamp["file_mtime_ns"] == sidecar.get("file_mtime_ns"):
        return
    started = time.time()
    if file_sha256(data_path) != sidecar.get("sha256"):
        raise CacheMiss("corrupt", f"{data_path}: SHA-256 differs from the sidecar")
    if stamp["file_mtime_ns"] != sidecar.get("file_mtime_ns") and is_main_process():
        logger.info("%s: modified time changed, content verified (%.1fs): stamp renewed", data_path, time.time() - started)
        _write_json_atomic(sidecar_path, {**sidecar, **stamp})


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:12]}")  # pids repeat across nodes
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_sidecar(sidecar_path: Path) -> dict[str, Any]:
    if not sidecar_path.is_file():
        raise CacheMiss("missing", f"no cache at {sidecar_path.parent} ({sidecar_path.name} absent)")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheMiss("corrupt", f"{sidecar_path}: unreadable ({e})") from e
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT or not isinstance(sidecar.get("key"), str):
        raise CacheMiss("corrupt", f"{sidecar_path}: not a {FORMAT} sidecar")
    if sidecar.get("version") != FORMAT_VERSION:
        raise CacheMiss("stale", f"{sidecar_path}: cache format version {sidecar.get('version')}, "
                                 f"this code writes {FORMAT_VERSION}")
    return sidecar


def _what_changed(old: dict[str, Any], new: dict[str, Any] | None) -> str:
    if new is None:
        return "cache key differs"
    labels = {"encoder_identity": "encoder identity", "dtype": "storage dtype", "autocast": "encoding autocast", "dataset": "dataset content",
              "num_rows": "number of rows", "image_checks": "image checks", "format": "cache format",
              "skip_reasons": "skip reason table"}
    changed = [labels.get(k, k) for k in new if old.get(k) != new.get(k)]
    return f"{', '.join(changed) or 'cache key'} changed"


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], num_rows: Any) -> None:
    missing = [n for n in TENSOR_NAMES if n not in tensors]
    if missing:
        raise CacheMiss("corrupt", f"{path}: tensors {missing} missing")
    if any(tensors[n].shape[0] != num_rows for n in TENSOR_NAMES):
        shapes = {n: list(tensors[n].shape) for n in TENSOR_NAMES}
        raise CacheMiss("corrupt", f"{path}: tensor shapes {shapes} do not match {num_rows} rows")


# ------------------------------------------------------------------------------ build


class _PositionedDataset(Dataset):
    """CaptionDataset samples plus their position in the row list (row.index is a TSV line)."""

    def __init__(self, inner: CaptionDataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.inner[i]
        sample["pos"] = i
        return sample


def _collate_for_encoding(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Positions, captions and skip codes of all samples; pixels of the usable ones."""
    ok = [s for s in samples if s.get("skip") is None]
    return {
        "pos": torch.tensor([s["pos"] for s in samples], dtype=torch.long),
        "captions": [s["caption"] for s in samples],
        "codes": torch.tensor([0 if s.get("skip") is None else _code_of(s["skip"]) for s in samples], dtype=torch.uint8),
        "ok_pos": torch.tensor([s["pos"] for s in ok], dtype=torch.long),
        "pixels": torch.stack([s["pixels"] for s in ok]) if ok else None,
    }


@torch.no_grad()
def _encode_rows(
    rows: Sequence[CaptionRow],
    encoders,
    dtype: torch.dtype,
    batch_size: int,
    num_workers: int,
    checks: ImageChecks,
    desc: str = "CLIP features",
    autocast: str | None = None,
) -> dict[str, torch.Tensor]:
    """Features of `rows` in order: image features zero where the image is unusable.
    autocast: the encoders run under autocast in this dtype (the training precision): on a GPU
    ViT-L/14 in bf16 takes a fraction of its fp32 time for 3.3M images."""
    n = len(rows)
    out = {
        "image_pooled": torch.zeros((n, encoders.image_pooled_dim), dtype=dtype),
        "image_embed": torch.zeros((n, encoders.image_embed_dim), dtype=dtype),
        "text_embed": torch.zeros((n, encoders.text_embed_dim), dtype=dtype),
        "skip_code": torch.zeros((n,), dtype=torch.uint8),
    }
    dataset = _PositionedDataset(CaptionDataset(rows, encoders.preprocess, checks=checks))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=_collate_for_encoding)
    precision = STORAGE_DTYPES[autocast] if autocast else None
    device_type = next(encoders.parameters()).device.type if precision is not None else "cpu"
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not is_main_process() or n == 0):
        pos = batch["pos"]
        out["skip_code"][pos] = batch["codes"]
        with torch.autocast(device_type, dtype=precision, enabled=precision is not None):
            text = encoders.encode_text(batch["captions"])
            feats = encoders.encode_image(batch["pixels"]) if batch["pixels"] is not None else None
        out["text_embed"][pos] = text.to("cpu", dtype)
        if feats is not None:
            out["image_pooled"][batch["ok_pos"]] = feats.pooled.to("cpu", dtype)
            out["image_embed"][batch["ok_pos"]] = feats.embed.to("cpu", dtype)
    out["valid"] = out["skip_code"] == 0
    return {name: out[name] for name in TENSOR_NAMES}


def _shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [start, end) of rank's share of n rows (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def _shard_path(cache_dir: Path, name: str, key: str, rank: int, world: int, job: str = "local") -> Path:
    return cache_dir / f"{name}.shard-{rank}-of-{world}.{key[:16]}.{job}.safetensors"


def _write_shard(path: Path, features: dict[str, torch.Tensor]) -> None:
    """A shard via a temporary name: rank 0 never merges a half-written one."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        write_safetensors(tmp, {k: [v] for k, v in features.items()}, {})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_shared_folder(cache_dir: Path) -> None:
    """Under torch.distributed: raise on every rank, in one line, unless every rank sees the
    file rank 0 writes into `cache_dir` (ranks on other nodes with a node-local folder would
    otherwise wait for shards they can never read, until the collective timeout)."""
    if get_world_size() == 1:
        return
    token = broadcast_object(uuid.uuid4().hex if is_main_process() else None)
    probe = cache_dir / f".shared-check-{token[:12]}"
    if is_main_process():
        _write_json_atomic(probe, {"token": token})
    barrier()
    try:
        seen = json.loads(probe.read_text()).get("token") == token
    except (OSError, ValueError):
        seen = False
    shared = all_ranks(seen)
    barrier()
    if is_main_process():
        probe.unlink(missing_ok=True)
    if not shared:
        raise UniMuRError(f"feature cache folder {cache_dir} is not shared by all ranks (rank {get_rank()} "
                          f"{'sees' if seen else 'cannot see'} the file rank 0 wrote there): put --cache-dir on "
                          f"a filesystem every node mounts")


def _write_final(
    cache_dir: Path, name: str, pieces: dict[str, list[torch.Tensor]], key: str, parts: dict[str, Any], extra: dict[str, Any],
    job: str = "local",
) -> None:
    """Write data file then sidecar, each via temp file + os.replace (a crash never leaves a
    half-written cache that looks finished: without a matching sidecar it is a miss)."""
    data_path, sidecar_path = cache_paths(cache_dir, name)
    sidecar_path.unlink(missing_ok=True)  # invalidate first: the old sidecar must not vouch for the new file
    tmp = data_path.with_name(f"{data_path.name}.tmp-{job}-{os.getpid()}")
    try:
        sha = write_safetensors(tmp, pieces, {"format": FORMAT, "key": key})
        os.replace(tmp, data_path)
    finally:
        tmp.unlink(missing_ok=True)
    valid = torch.cat(pieces["valid"])
    codes = torch.cat(pieces["skip_code"])
    skipped = Counter({_reason_of(c): n for c, n in Counter(codes[~valid].tolist()).items()})
    sidecar = {
        "format": FORMAT, "version": FORMAT_VERSION, "key": key, "parts": parts,
        "num_rows": int(valid.shape[0]), "num_valid": int(valid.sum()), "skipped": dict(sorted(skipped.items())),
        "dims": {n: int(pieces[n][0].shape[1]) for n in FEATURE_NAMES},
        "file": data_path.name, **file_stamp(data_path), "sha256": sha,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }
    _write_json_atomic(sidecar_path, sidecar)


def _merge_shards(shard_paths: list[Path]) -> dict[str, list[torch.Tensor]]:
    """Memory-mapped pieces of every tensor, in rank order (the writer streams them)."""
    shards = [read_safetensors(p)[0] for p in shard_paths]
    return {name: [s[name] for s in shards] for name in TENSOR_NAMES}


def build_feature_cache(
    rows: Sequence[CaptionRow],
    encoders,
    cache_dir: str | os.PathLike,
    *,
    name: str = "features",
    dtype: str | torch.dtype = "fp16",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    checks: ImageChecks = ImageChecks(),
    fingerprint: str | None = None,
    autocast: str | None = None,
) -> FeatureCache:
    """Encode every row with the frozen encoders and write the cache; return it loaded.

    A collective when torch.distributed is initialised (call on every rank): each rank
    encodes its shard, rank 0 merges. device: move `encoders` there first (in place);
    None keeps them where they are. Unusable images are recorded in `valid`/`skip_code`.
    fingerprint: the source's shard-level fingerprint (None: per-row, see module docstring).
    autocast: encode under autocast in this dtype (part of the key; None: the encoders' own).
    The SHA-256 is computed once, while the file is written.
    """
    started = time.time()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    storage = STORAGE_DTYPES[_dtype_name(dtype)]
    parts = _key_parts(encoders, rows, dtype, checks, fingerprint, autocast)
    key = _key_from_parts(parts)
    if device is not None:
        encoders.to(device)
    rank, world = get_rank(), get_world_size()
    start, end = _shard_bounds(len(rows), rank, world)
    features = _encode_rows(rows[start:end], encoders, storage, batch_size, num_workers, checks,
                            desc=f"CLIP features ({name}, rank {rank}/{world})", autocast=autocast)
    extra = {"world_size": world, "build_seconds": None}
    if world == 1:
        extra["build_seconds"] = round(time.time() - started, 3)
        _write_final(cache_dir, name, {k: [v] for k, v in features.items()}, key, parts, extra)
    else:
        job = broadcast_object(uuid.uuid4().hex[:12] if is_main_process() else None)
        _write_shard(_shard_path(cache_dir, name, key, rank, world, job), features)
        del features
        barrier()
        if is_main_process():
            shard_paths = [_shard_path(cache_dir, name, key, r, world, job) for r in range(world)]
            extra["build_seconds"] = round(time.time() - started, 3)
            _write_final(cache_dir, name, _merge_shards(shard_paths), key, parts, extra, job)
            for p in shard_paths:
                p.unlink(missing_ok=True)
        barrier()
    cache = load_feature_cache(cache_dir, name, expected_key=key)
    _log_built(cache, time.time() - started)
    return cache


def _log_built(cache: FeatureCache, seconds: float) -> None:
    if is_main_process():
        skipped = cache.skip_counts()
        logger.info(
            "built feature cache %s: %d rows, %d valid, %d unusable images (%s) in %.1fs",
            cache.path, cache.num_rows, cache.num_valid, sum(skipped.values()),
            ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none", seconds,
        )


def load_or_build_feature_cache(
    rows: Sequence[CaptionRow],
    encoders,
    cache_dir: str | os.PathLike,
    *,
    name: str = "features",
    dtype: str | torch.dtype = "fp16",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    checks: ImageChecks = ImageChecks(),
    verify_checksum: bool = False,
    fingerprint: str | None = None,
    autocast: str | None = None,
) -> FeatureCache:
    """The cache for (encoders, rows, dtype, autocast): loaded on a hit, (re)built when missing, stale
    (key changed) or corrupt; the reason is logged. A collective under torch.distributed.
    verify_checksum: re-hash the whole file (default: the stamp check, see module docstring)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    check_shared_folder(cache_dir)
    parts = _key_parts(encoders, rows, dtype, checks, fingerprint, autocast)
    key = _key_from_parts(parts)
    cache, miss = None, None
    try:
        cache = load_feature_cache(cache_dir, name, expected_key=key, expected_parts=parts, verify_checksum=verify_checksum)
    except CacheMiss as e:
        miss = e
    # all ranks take the same branch: the build is a collective, diverging would deadlock it
    if all_ranks(cache is not None):
        if is_main_process():
            logger.info("feature cache hit: %s (%d rows, %d valid)", cache.path, cache.num_rows, cache.num_valid)
        return cache
    if is_main_process():
        if miss is None:
            logger.info("feature cache in %s unusable on another rank: rebuilding", cache_dir)
        elif miss.kind == "missing":
            logger.info("feature cache miss (%s): building", miss.detail)
        elif miss.kind == "stale":
            logger.info("feature cache stale in %s (%s): rebuilding", cache_dir, miss.detail)
        else:
            logger.warning("feature cache corrupt (%s): rebuilding", miss.detail)
    del cache  # drop the mapping of a file that is about to be replaced
    return build_feature_cache(rows, encoders, cache_dir, name=name, dtype=dtype, batch_size=batch_size,
                               num_workers=num_workers, device=device, checks=checks, fingerprint=fingerprint,
                               autocast=autocast)
