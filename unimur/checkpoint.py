"""Training checkpoints: written atomically, loaded with clear errors.

A checkpoint (`ckpt.pth.tar`) holds only what a frozen-backbone run needs to continue:
the trainable parameters, optimizer / scheduler / grad-scaler state, the step, RNG states
and the full config. The frozen LLM and CLIP are rebuilt from the identifiers in the config,
so a checkpoint is megabytes, not the 13 GB of a full OPT-6.7B state dict.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

LATEST = "ckpt.pth.tar"
BEST = "ckpt_best.pth.tar"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (streamed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def remove_stale_temp_files(run_dir: str | Path) -> int:
    """Delete temp files of saves interrupted by a hard kill (the real files are intact)."""
    stale = list(Path(run_dir).glob(".*.pth.tar.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d temp file(s) of an interrupted save in %s", len(stale), run_dir)
    return len(stale)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint on CPU; a clear error for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint is data, and loading must not run code from it
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong format, ...
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    missing = {"config", "model"} - set(ckpt) if isinstance(ckpt, dict) else {"config", "model"}
    if missing:
        raise ValueError(f"{path} is not a UniMuR training checkpoint (missing {sorted(missing)})")
    return ckpt


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`--resume latest` -> <run_dir>/ckpt.pth.tar if present (else start fresh); a path as is."""
    if not resume:
        return None
    if resume == "latest":
        path = run_dir / LATEST
        if not path.exists():
            logger.info("--resume latest: no checkpoint in %s, starting from scratch", run_dir)
            return None
        return path
    return Path(resume)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(s) -> dict[str, Any]:
    # plain types + a tensor, so `torch.load(weights_only=True)` can read it back
    name, keys, pos, has_gauss, gauss = s
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _numpy_state_from_plain(d: dict[str, Any]):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])


def _as_python_state(s):
    # weights_only loading returns lists where random.getstate() produced tuples
    return (s[0], tuple(s[1]), s[2])
