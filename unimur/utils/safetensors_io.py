"""The feature cache's file I/O: a streaming safetensors writer, a zero-copy memory-mapped
reader, and the cheap integrity stamp (size + mtime + header hash) checked at every start.

The safetensors layout (8-byte little-endian header length, JSON header, raw data) is
written and memory-mapped here directly: the reference writer (`safetensors.torch.save_file`)
needs every tensor in memory at once and `load_file` copies; streaming the merge shard by
shard and mapping the result keeps a 17 GB cache out of each process's private memory. The
files stay readable by `safetensors.torch.load_file`.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


class CacheMiss(Exception):
    """No usable cache. kind: ``missing`` (never built), ``stale`` (key changed), ``corrupt``."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.bool: "BOOL",
    torch.uint8: "U8",
}
# numpy has no bfloat16: map it as int16 and reinterpret in torch.
_NUMPY_VIEWS = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "BOOL": np.bool_, "U8": np.uint8}
_TORCH_FROM_CODE = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # a larger header is garbage, not a cache
_WRITE_CHUNK_BYTES = 64 * 2**20


def write_safetensors(path: Path, tensors: dict[str, list[torch.Tensor]], metadata: dict[str, str]) -> str:
    """Write tensors, each given as pieces concatenated along dim 0; return the file's SHA-256."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    header: dict[str, Any] = {}
    offset = 0
    for name, pieces in tensors.items():
        shape = [sum(p.shape[0] for p in pieces), *pieces[0].shape[1:]]
        nbytes = math.prod(shape) * pieces[0].element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[pieces[0].dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keeps the data section 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes):
            f.write(chunk)
            digest.update(chunk)
        for pieces in tensors.values():
            for piece in pieces:
                for chunk in _byte_chunks(piece):
                    f.write(chunk)
                    digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _byte_chunks(t: torch.Tensor) -> Iterable[memoryview]:
    """The raw bytes of `t` in row chunks (bounded extra memory for huge tensors)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return
    row_bytes = max(t[0].numel() * t.element_size(), 1)
    step = max(_WRITE_CHUNK_BYTES // row_bytes, 1)
    for start in range(0, t.shape[0], step):
        part = t[start : start + step].contiguous().view(torch.uint8) if t.dtype != torch.uint8 else t[start : start + step]
        yield memoryview(part.numpy()).cast("B")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Memory-map a safetensors file (copy-on-write); raise CacheMiss('corrupt') on any damage."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CacheMiss("corrupt", f"{path}: {size} bytes, shorter than a safetensors header")
        n = struct.unpack("<Q", prefix)[0]
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise CacheMiss("corrupt", f"{path}: header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheMiss("corrupt", f"{path}: unreadable header ({e})") from e
    if not isinstance(header, dict):
        raise CacheMiss("corrupt", f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    data_start, data_size = 8 + n, size - 8 - n
    specs = {name: _tensor_spec(path, name, info, data_size) for name, info in header.items()}
    end = max((s[3] for s in specs.values()), default=0)
    if end != data_size:
        raise CacheMiss("corrupt", f"{path}: data section is {data_size} bytes, tensors describe {end} (truncated?)")
    if data_size == 0:
        return {name: torch.empty(shape, dtype=_TORCH_FROM_CODE[code]) for name, (code, shape, _, _) in specs.items()}, metadata
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=data_start, shape=(data_size,))
    _advise_random(raw)
    tensors = {}
    for name, (code, shape, begin, stop) in specs.items():
        arr = raw[begin:stop].view(_NUMPY_VIEWS[code]).reshape(shape)
        t = torch.from_numpy(arr)
        tensors[name] = t.view(torch.bfloat16) if code == "BF16" else t
    return tensors, metadata


def _advise_random(raw: np.memmap) -> None:
    """Training reads rows in random order: without this, the kernel's read-ahead and
    fault-around pull 64-256 KB around each 5 KB row into the page cache and the RSS."""
    try:
        raw._mmap.madvise(mmap.MADV_RANDOM)
    except (AttributeError, OSError, ValueError):  # no madvise on this platform: only slower
        pass


def _tensor_spec(path: Path, name: str, info: Any, data_size: int) -> tuple[str, list[int], int, int]:
    """Validate one header entry: (dtype code, shape, begin, end)."""
    try:
        code, shape, (begin, stop) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        itemsize = np.dtype(_NUMPY_VIEWS[code]).itemsize
    except (KeyError, TypeError, ValueError) as e:
        raise CacheMiss("corrupt", f"{path}: bad header entry for {name!r}: {info!r}") from e
    if not (0 <= begin <= stop <= data_size) or stop - begin != math.prod(shape) * itemsize:
        raise CacheMiss("corrupt", f"{path}: tensor {name!r} offsets {begin}..{stop} do not match shape {shape} / file")
    return code, shape, begin, stop



def header_sha256(path: Path) -> str:
    """SHA-256 of the 8-byte prefix and the JSON header (names, dtypes, shapes, offsets)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        return hashlib.sha256(prefix + f.read(min(n, _MAX_HEADER_BYTES))).hexdigest()


def file_stamp(path: Path) -> dict[str, Any]:
    """What the cheap check compares: size, mtime (ns) and the header hash."""
    st = path.stat()
    return {"file_bytes": st.st_size, "file_mtime_ns": st.st_mtime_ns, "header_sha256": header_sha256(path)}
