"""Files every layer writes or checks: a streamed sha256, and the one atomic write (temp file in
the same folder, fsync, rename), so a crash leaves the old file or the new one, never half."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (streamed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: str | Path, write: Callable[[str], None], mode: int | None = None) -> None:
    """``write(tmp)`` to a temp file beside ``path``, fsync it, then rename it over ``path``.

    ``mode``: permissions of the result (mkstemp creates 0600). The temp file is removed when
    ``write`` fails; the folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
