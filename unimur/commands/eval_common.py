"""What the evaluation commands (unimur.commands.eval_visdial, unimur.commands.eval_mmdialog) share: flags, path checks, loading
the model as an Embedder, writing the requested outputs, and turning expected failures into one
`error: ...` line."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from unimur.errors import UniMuRError, explain_backbone_errors
from unimur.evaluation.report import format_table, save_examples_png, write_results
from unimur.inference.embedder import Embedder
from unimur.inference.image_embeddings import ImageEmbeddings
from unimur.utils.distributed import default_device

logger = logging.getLogger(__name__)
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


# The model folder's config.json names the frozen backbones it is rebuilt from.
BACKBONE_FIXES = {"llm": "the model folder's config.json names it (llm): make it available in the "
                         "local cache, or set llm to a local folder holding the same model",
                  "visual": "the model folder's config.json names it (visual_model): make it "
                            "available in the local cache, or set visual_model to "
                            "NAME:/path/to/open_clip_weights.bin"}


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` if it holds a pruned model's files, else a FileNotFoundError saying so."""
    model_dir = Path(model_dir)
    missing = [name for name in MODEL_FILES if not (model_dir / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{model_dir.resolve()} is not a pruned UniMuR model folder (missing: "
            f"{', '.join(missing)})\n  pass --model-dir; such a folder is written by training "
            f"(see unimur/prune_model_ckpt.py) and shipped as unimur_model/ in the README")
    return model_dir


def load_embedder(model_dir: str | Path, device: str | None = None, batch_size: int = 64,
                  num_workers: int = 0, progress: bool = True, image_resize: str = "crop"):
    """A :class:`~unimur.inference.embedder.ModelEmbedder` over the pruned model in ``model_dir``."""
    from unimur.inference.embedder import ModelEmbedder
    from unimur.model.model import UniMuR
    from unimur.model.pretrained import read_model_config

    model_dir = check_model_dir(model_dir)
    device = device or default_device()
    config = read_model_config(model_dir)
    with explain_backbone_errors(config.llm, config.visual_model, BACKBONE_FIXES):
        model = UniMuR.from_pretrained(model_dir, device=device)
    return ModelEmbedder(model, batch_size=batch_size, num_workers=num_workers, progress=progress,
                         image_resize=image_resize)


def model_weights_digest(model_dir: str | Path) -> str | None:
    """The sha256 of the model's weights its manifest records (checked when the model loads)."""
    manifest = Path(model_dir) / "manifest.json"
    return json.loads(manifest.read_text()).get("weights_sha256") if manifest.is_file() else None


def check_embeddings_model(embeddings: ImageEmbeddings, path: str | Path, model_dir: str | Path,
                           allow_mismatch: bool) -> dict[str, Any]:
    """Refuse an embedding file extracted with another model (its ``model_weights_sha256``
    differs from the model's), unless ``allow_mismatch``; return what was found, for the
    results. A file that records no digest (a converted FROMAGe pickle) cannot be checked: it
    is evaluated with a warning, and the results say so."""
    file_digest = embeddings.meta.get("model_weights_sha256")
    model_digest = model_weights_digest(model_dir)
    check = {"file_weights_sha256": file_digest, "model_weights_sha256": model_digest,
             "allow_mismatch": bool(allow_mismatch)}
    if file_digest is None:
        source = embeddings.meta.get("source")
        check["status"] = "unchecked"
        check["note"] = (f"the embedding file {path} records no model digest"
                         f"{f' (source: {source})' if source else ''}: it could not be checked "
                         f"against the model; its image embeddings are assumed to be this model's")
        logger.warning("%s", check["note"])
    elif file_digest == model_digest:
        check["status"] = "match"
    elif allow_mismatch:
        check["status"] = "mismatch_allowed"
        check["note"] = (f"--allow-embeddings-mismatch: the embedding file {path} was extracted "
                         f"with other weights (sha256 {file_digest[:12]}...) than the model "
                         f"({str(model_digest)[:12]}...)")
        logger.warning("%s", check["note"])
    else:
        raise UniMuRError(
            f"{path} was extracted with another model (weights sha256 {file_digest[:12]}...) than "
            f"{model_dir} ({str(model_digest)[:12]}...): its image embeddings are not this model's; "
            f"re-extract them with `python unimur/extract_vis_emb.py --model-dir {model_dir} ...`, "
            f"omit --embeddings to embed the images now, or pass --allow-embeddings-mismatch to "
            f"evaluate anyway (recorded in the results)")
    return check


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
