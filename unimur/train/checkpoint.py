"""Training checkpoints: written atomically, loaded with clear errors.

A checkpoint (`ckpt.pth.tar`) holds only what a frozen-backbone run needs to continue:
the trainable parameters, optimizer / scheduler / grad-scaler state, the step, RNG states
and the full config. The frozen LLM and CLIP are rebuilt from the identifiers in the config,
so a checkpoint is megabytes, not the 13 GB of a full OPT-6.7B state dict.
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimur.errors import CheckpointWriteError
from unimur.utils.files import atomic_write

logger = logging.getLogger(__name__)

LATEST = "ckpt.pth.tar"
BEST = "ckpt_best.pth.tar"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through :func:`~unimur.utils.files.atomic_write`: a crash at any moment leaves
    either the old file or the new one, never half of one."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def remove_stale_temp_files(run_dir: str | Path) -> int:
    """Delete temp files of saves interrupted by a hard kill (the real files are intact)."""
    stale = list(Path(run_dir).glob(".*.pth.tar.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d temp file(s) of an interrupted save in %s", len(stale), run_dir)
    return len(stale)


class CheckpointFormatError(ValueError):
    """A file given as a training checkpoint is something else (or damaged)."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint on CPU; a one-line error for anything else.

    Nothing in the file is ever unpickled as objects (``weights_only=True``): a file holding
    pickled Python objects, a FROMAGe checkpoint, a pruned model's weights or a truncated file
    is named as such, with what to do instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint is data, and loading must not run code from it
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects, truncated zip, not a torch file, ...
        raise CheckpointFormatError(_unreadable(path, e)) from e
    if isinstance(ckpt, dict) and _is_fromage(ckpt):
        raise CheckpointFormatError(f"{path} is a FROMAGe checkpoint ({_FROMAGE_HINT}), not a UniMuR "
                                    f"training checkpoint: {_FROMAGE_FIX}")
    missing = {"config", "model"} - set(ckpt) if isinstance(ckpt, dict) else {"config", "model"}
    if missing:
        raise CheckpointFormatError(
            f"{path} is not a UniMuR training checkpoint ({_describe(path, ckpt)}; missing "
            f"{sorted(missing)}): --resume and prune_model_ckpt.py take a ckpt.pth.tar or "
            f"ckpt_best.pth.tar written by main.py")
    return ckpt


# FROMAGe's main.py saves {"epoch", "state_dict", "best_acc1", "optimizer", "scheduler"}, its
# prune_model_ckpt.py {"state_dict"}; the state dict's keys name FROMAGe's modules.
_FROMAGE_KEYS = ("model.visual_embeddings.", "model.text_hidden_fcs.", "ret_input_embeddings.")
_FROMAGE_HINT = "its state_dict holds model.visual_embeddings / model.text_hidden_fcs"
_FROMAGE_FIX = ("convert it with `python unimur/commands/convert_fromage.py --fromage-dir DIR --output OUT` "
                "(DIR holds it and FROMAGe's model_args.json; --ckpt-name if it is not "
                "pretrained_ckpt.pth.tar) and evaluate the converted model folder; training cannot "
                "continue from it")


def _is_fromage(ckpt: dict) -> bool:
    state = ckpt.get("state_dict")
    return isinstance(state, dict) and any(
        str(k).removeprefix("module.").startswith(_FROMAGE_KEYS) for k in state)


def _describe(path: Path, obj: Any) -> str:
    if _is_safetensors(path):
        return "a safetensors weights file, e.g. a pruned model folder's model.safetensors"
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        return f"a dict with keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"
    return f"a {type(obj).__name__}"


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _unreadable(path: Path, e: Exception) -> str:
    """What a file that torch.load(weights_only=True) refused is, and what to do."""
    import pickle

    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes): an interrupted copy? use another checkpoint"
    if isinstance(e, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        objects = f" ({found.group(1)})" if found else ""
        if _pickle_mentions(path, _FROMAGE_KEYS):
            return (f"{path} is a FROMAGe checkpoint that also holds pickled Python objects{objects}, "
                    f"which are never loaded here (unpickling runs code from the file); where you "
                    f"trust it, re-save only its state_dict (torch.save({{'state_dict': "
                    f"ckpt['state_dict']}}, ...)) and {_FROMAGE_FIX}")
        return (f"{path} holds pickled Python objects{objects}, not only tensors: it is not a "
                f"UniMuR training checkpoint, and it is not loaded (unpickling runs code from the "
                f"file); use a ckpt.pth.tar written by main.py")
    if _is_safetensors(path):
        return (f"{path} is a safetensors file whose header cannot be read (truncated?): "
                f"use another checkpoint")
    first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
    return (f"{path} is truncated or corrupt ({size} bytes; {first[:160]}): an interrupted copy "
            f"or save? use another checkpoint (a run folder's ckpt.pth.tar and ckpt_best.pth.tar "
            f"are written atomically, so the other one may be intact)")


def _pickle_mentions(path: Path, prefixes: tuple[str, ...]) -> bool:
    """Whether the pickle inside a torch zip file holds a string starting with one of
    ``prefixes``, found by walking its opcodes (nothing is unpickled)."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            data = z.read(name)
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and arg.removeprefix("module.").startswith(prefixes):
                return True
    except Exception:  # not a zip, no data.pkl, damaged opcodes: no evidence
        return False
    return False


def save_checkpoint(ckpt: dict[str, Any], path: str | Path, previous_step: int | None = None) -> None:
    """:func:`atomic_torch_save` whose failure (full disk, ...) is one line saying which file
    could not be written and that the previous one is intact (the rename never happened)."""
    path = Path(path)
    try:
        atomic_torch_save(ckpt, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        if path.exists():
            step = f" (step {previous_step})" if previous_step is not None else ""
            kept = f"the last good checkpoint {path.name}{step} is intact"
        else:
            kept = f"no earlier {path.name} existed, and no partial file was left"
        raise CheckpointWriteError(f"could not write checkpoint {path}: {reason[:200]}; {kept}; "
                                   f"free space on that disk and continue with --resume latest") from e


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
