"""Expected failures and how the commands report them: one ``error: ...`` line on stderr and
exit status 1, never a traceback (``UNIMUR_TRACEBACK=1`` re-raises, for debugging).

"Expected" means a problem with the user's inputs or environment that a message can explain
(a missing file, a wrong header, a run folder in use, a hub that cannot be reached); a bug
still ends in a traceback. The commands (``main.py``, ``evals/*.py``, the scripts in
``unimur/``) call :func:`run_cli`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


class UniMuRError(Exception):
    """A failure whose message tells the user what is wrong and what to do."""


class RunFolderError(UniMuRError):
    """The run folder cannot be used: another trainer holds it, or a new run would replace
    an earlier run's checkpoints."""


class CheckpointWriteError(UniMuRError):
    """A checkpoint could not be written (full disk, ...); the previous one is intact."""


class BackboneLoadError(UniMuRError):
    """A frozen backbone named by a hub id or path could not be loaded."""


# What the commands turn into one line. FileNotFoundError / ValueError / KeyError are what the
# readers raise for bad inputs (they name the file); anything else is a bug and keeps its traceback.
EXPECTED = (UniMuRError, FileNotFoundError, ValueError, KeyError)


def show_tracebacks() -> bool:
    return bool(os.environ.get("UNIMUR_TRACEBACK"))


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, *,
            one_line: bool = False) -> int:
    """Run a command's ``main``; expected failures become one ``error: ...`` line on stderr and
    exit status 1 instead of a traceback. ``UNIMUR_TRACEBACK=1`` re-raises. ``one_line``: fold a
    message's line breaks and runs of spaces (the retrieve command and the app, whose output a
    script may parse line by line)."""
    try:
        main(argv)
    except EXPECTED as e:
        if show_tracebacks():
            raise
        text = message(e)
        sys.stderr.write(f"error: {' '.join(text.split()) if one_line else text}\n")
        return 1
    return 0


def message(e: BaseException) -> str:
    """What to print for ``e``: its message (a KeyError's without the quotes its str adds)."""
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
        # a bare key says nothing on its own: name the error and where to look
        return text if " " in text else f"KeyError: {text!r} (UNIMUR_TRACEBACK=1 shows where)"
    return str(e)


# ----------------------------------------------------------------------------------------------
# Frozen backbones that cannot be loaded from the hub
# ----------------------------------------------------------------------------------------------

# The loaders of unimur.model.backbones.hub / unimur.model.tokenizer, and what each loads (found in the traceback,
# so that the message can name the model without wrapping every call site).
_LOADERS = {"load_llm": "llm", "build_tokenizer": "llm", "load_encoders": "visual"}


_PACKAGE = Path(__file__).resolve().parent  # unimur/: loaders are ours only if defined under it


def _failed_loader(exc: BaseException) -> str | None:
    """'llm' or 'visual' if ``exc`` was raised inside one of the backbone loaders (innermost wins)."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        if code.co_name in _LOADERS and _PACKAGE in Path(code.co_filename).resolve().parents:
            found = _LOADERS[code.co_name]
    return found


def _is_load_failure(exc: BaseException) -> bool:
    # transformers / huggingface_hub raise OSError (LocalEntryNotFoundError, connection errors,
    # "not a valid model identifier"); open_clip wraps its download failure in a RuntimeError.
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and "download" in str(exc).lower()


def _first_line(exc: BaseException) -> str:
    """The exception's first sentence: the hub clients' messages run to several."""
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(exc).__name__}: {first[:200]}"


def _hub_state() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "the hub is switched off (HF_HUB_OFFLINE=1)"
    return "the hub is unreachable or does not have it"


@contextlib.contextmanager
def explain_backbone_errors(llm: str, visual_model: str, fix: dict[str, str]) -> Iterator[None]:
    """Turn a backbone that cannot be loaded (not cached, hub offline or unreachable, no such
    folder) into one :class:`BackboneLoadError` naming the model and how to fix it.

    ``fix`` maps "llm" / "visual" to how to point at a local copy instead (e.g. "pass
    --opt-version /path/to/folder"). Errors raised outside the backbone loaders pass through.
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        which = _failed_loader(e)
        if which is None or not _is_load_failure(e):
            raise
        name = llm if which == "llm" else visual_model
        what = "frozen LLM (and its tokenizer)" if which == "llm" else "frozen CLIP model"
        # A hub id is NAME or ORG/NAME; something that starts like a path was meant as a folder.
        if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
            reason, fetch = f"no such local folder ({Path(name).expanduser()})", ""
        else:
            reason = f"it is not in the local cache and {_hub_state()}"
            fetch = "fetch it where the hub is reachable" + (
                f" (huggingface-cli download {name})" if which == "llm" else "") + ", or "
        raise BackboneLoadError(f"cannot load the {what} {name!r}: {reason} [{_first_line(e)}]; "
                                f"{fetch}{fix[which]}") from e
