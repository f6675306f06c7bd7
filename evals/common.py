"""What evals/eval_visdial.py and evals/eval_mmdialog.py share: flags, path checks, loading
the model as an Embedder, writing the requested outputs, and turning expected failures into one
`error: ...` line."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from unimur.eval_report import format_table, save_examples_png, write_results
from unimur.retriever import Embedder
# ==============================================================================================
# Command-line support: evals/eval_visdial.py and evals/eval_mmdialog.py are thin wrappers
# ==============================================================================================

MODEL_FILES = ("config.json", "model.safetensors", "manifest.json", "tokenizer")


def add_common_args(parser) -> None:
    """Flags both evaluation scripts share (defaults follow the seed README's layout)."""
    parser.add_argument("--model-dir", default="unimur_model",
                        help="pruned model folder (config.json, model.safetensors, tokenizer/, "
                             "manifest.json); default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="image-decoding worker processes; default: %(default)s")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--output", default=None, metavar="FILE.json",
                        help="write metrics, settings, counts and model info as JSON")
    parser.add_argument("--examples-png", default=None, metavar="FILE.png",
                        help="draw a few queries with their top retrieved images")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def require_path(path: str | Path, what: str, hint: str) -> Path:
    """``path`` if it exists, else a FileNotFoundError that says what was expected and how to fix it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path.resolve()}\n  {hint}")
    return path


def load_embedder(model_dir: str | Path, device: str | None = None, batch_size: int = 64,
                  num_workers: int = 0, progress: bool = True, image_resize: str = "crop"):
    """A :class:`~unimur.retriever.ModelEmbedder` over the pruned model in ``model_dir``."""
    from unimur.model import UniMuR
    from unimur.retriever import ModelEmbedder

    model_dir = Path(model_dir)
    missing = [name for name in MODEL_FILES if not (model_dir / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{model_dir.resolve()} is not a pruned UniMuR model folder (missing: "
            f"{', '.join(missing)})\n  pass --model-dir; such a folder is written by training "
            f"(see unimur/prune_model_ckpt.py) and shipped as unimur_model/ in the README")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = UniMuR.from_pretrained(model_dir, device=device)
    return ModelEmbedder(model, batch_size=batch_size, num_workers=num_workers, progress=progress,
                         image_resize=image_resize)


def model_info(model_dir: str | Path, embedder: Embedder) -> dict[str, Any]:
    """What produced the numbers: folder, config and weights digest of the model."""
    info: dict[str, Any] = {"dir": str(Path(model_dir).resolve())}
    model = getattr(embedder, "model", None)
    if model is not None:
        info["method"] = model.config.method
        info["config"] = dict(vars(model.config))
    manifest = Path(model_dir) / "manifest.json"
    if manifest.is_file():
        info["weights_sha256"] = json.loads(manifest.read_text()).get("weights_sha256")
    return info


def report(results: dict[str, Any], output: str | Path | None, examples_png: str | Path | None
           ) -> str:
    """Write the requested files; return the table to show."""
    if output:
        write_results(results, output)
    if examples_png:
        save_examples_png(results, examples_png)
    return format_table(results)


def run_cli(main, argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; expected failures (missing data, bad files or settings) become one
    ``error: ...`` line and exit status 1 instead of a traceback. ``UNIMUR_TRACEBACK=1`` re-raises."""
    import sys

    try:
        main(argv)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if os.environ.get("UNIMUR_TRACEBACK"):
            raise
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0
