"""Reporting evaluation results: a plain-text table, strict JSON, and a PNG grid of example
queries with their top retrieved images. Results dicts come from `unimur.evaluation`."""
from __future__ import annotations

import json
import logging
import math
import platform
import textwrap
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from unimur.evaluation.common import EXAMPLE_TOP_K
from unimur.utils.files import atomic_write

logger = logging.getLogger(__name__)
# ==============================================================================================
# Output: table, JSON, example grid
# ==============================================================================================


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _metric_rows(title: str, rows: Iterable[tuple[str, Mapping[str, Any] | None]]) -> list[str]:
    lines = [f"{title:<18}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MRR':>8}{'mean_rank':>11}{'n':>8}"]
    for name, m in rows:
        m = m or {}
        lines.append(f"{name:<18}{_fmt(m.get('R@1'), '.2f'):>8}{_fmt(m.get('R@5'), '.2f'):>8}"
                     f"{_fmt(m.get('R@10'), '.2f'):>8}{_fmt(m.get('MRR'), '.4f'):>8}"
                     f"{_fmt(m.get('mean_rank'), '.2f'):>11}{_fmt(m.get('n'), 'd'):>8}")
    return lines


def _table_visdial(r: Mapping[str, Any]) -> list[str]:
    s, c, m = r["settings"], r["counts"], r["metrics"]
    head = (f"VisDial {s['split']} (context={s['context']}, rounds={s['rounds']}): "
            f"{c['dialogues_evaluated']} dialogues evaluated, {c['dialogues_skipped']} skipped")
    rows = [("dialogue->image", m["dialogue_to_image"]), ("image->dialogue", m["image_to_dialogue"])]
    if "dialogue_to_image_output" in m:
        rows.append(("dialogue->image, [RET] rule", m["dialogue_to_image_output"]))
    lines = [head, *_metric_rows("direction", rows)]
    if "image_retrieval_rate" in m:
        lines.append(f"image retrieval rate: {_fmt(m['image_retrieval_rate'], '.4f')} "
                     f"(image only when [RET] is generated)")
    return lines


def _table_mmdialog(r: Mapping[str, Any]) -> list[str]:
    s, c, m = r["settings"], r["counts"], r["metrics"]
    head = (f"MMDialog {s['split']} (target={s['target']}): {c['queries_evaluated']} queries "
            f"evaluated, {c['queries_skipped']} skipped")
    lines = [head]
    skipped = {**c.get("skipped_dialogues", {}), **c.get("skipped_queries", {})}
    if skipped:  # say why, so that a pool-size or data problem is seen next to the numbers
        rule = f" (full pool: {s['n_negatives']} negatives per modality)" if "n_negatives" in s else ""
        lines.append("skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) + rule)
    rows = [("text", m["text"])]
    if m.get("text_mean_loglik") is not None:
        rows.append(("text (mean loglik)", m["text_mean_loglik"]))
    rows += [("image", m["image"]), ("overall", m["overall"])]
    if m.get("overall_mean_loglik") is not None:
        rows.append(("overall (mean loglik)", m["overall_mean_loglik"]))
    lines += _metric_rows("modality", rows)
    if s.get("text_ranking"):
        lines.append(f"text ranking: {s['text_ranking']}")
    if s.get("prompt_style"):
        lines.append(f"prompt: {s['prompt_style']} style, contexts cut to fit "
                     f"{s.get('max_context_tokens')} positions: {c.get('contexts_cut', 0)}")
    lines.append(f"image retrieval rate: {_fmt(m['image_retrieval_rate'], '.4f')} "
                 f"({s['image_output_rule']})")
    q = m.get("image_output")
    if q:
        lines.append(f"image outputs vs responses with an image: precision {_fmt(q['precision'], '.4f')}, "
                     f"recall {_fmt(q['recall'], '.4f')}, F1 {_fmt(q['f1'], '.4f')} "
                     f"({q['correct_image_outputs']} of {q['image_outputs']} outputs; "
                     f"{q['responses_with_image']} responses with an image)")
    lines.append(f"cross-modal consistency: {_fmt(m['cross_modal_consistency'], '.4f')} "
                 f"(n={c['consistency_pairs']}, CLIP cosine)")
    if m.get("attribute_consistency") is not None:
        lines.append(f"attribute consistency: {_fmt(m['attribute_consistency'], '.4f')} "
                     f"(n={c.get('attribute_consistency_pairs', 0)}, synthetic labels)")
    return lines


def format_table(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of one results dict (or several, one block each)."""
    if isinstance(results, Mapping):
        results = [results]
    blocks = []
    for r in results:
        lines = {"visdial": _table_visdial, "mmdialog": _table_mmdialog}[r["benchmark"]](r)
        lines += [f"note: {n}" for n in r.get("notes", [])]
        if "timing" in r:
            lines.append(f"time: {r['timing']['seconds']:.1f} s "
                         f"({_fmt(r['timing']['queries_per_s'], '.1f')} queries/s)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON has no NaN), paths -> str, tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write results (metrics, settings, counts, model, examples) as strict JSON, atomically.

    Adds ``environment`` (python/torch versions) and ``written_at``; NaN becomes null.
    """
    path = Path(path)
    if "model" not in results:
        logger.warning("results carry no 'model' entry: %s will not say which model produced them", path)
    payload = dict(results)
    payload["environment"] = {"python": platform.python_version(), "torch": torch.__version__}
    payload["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n"
    # mode 0644: mkstemp creates 0600; results are meant to be shared
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode=0o644)
    logger.info("wrote %s", path)
    return path


def _thumbnail(path: str, size: int = 160):
    """An RGB array of the image at ``path``, or None if it cannot be read."""
    import numpy as np

    from unimur.utils.images import load_rgb_image

    try:
        img = load_rgb_image(path)  # upright and on white, as the encoder saw it
        img.thumbnail((size, size))
        return np.asarray(img)
    except Exception:  # an example grid never fails because one file is odd
        return None


def _query_caption(ex: Mapping[str, Any], width: int) -> str:
    """The query (shortened, wrapped), plus the top text and ground-truth texts when present."""
    query = ex["query"] if len(ex["query"]) <= 600 else "..." + ex["query"][-597:]
    lines = textwrap.wrap(query, width)
    texts = ex.get("retrieved_texts")
    if texts:
        lines += textwrap.wrap(f"top text: {texts[0]['text']}" + (" (gt)" if texts[0]["is_gt"] else ""),
                               width)
    if ex.get("gt_texts"):
        lines += textwrap.wrap("gt text: " + " | ".join(ex["gt_texts"]), width)
    ranks = [f"{name} {ex[key]}" for name, key in (("image", "gt_rank"), ("image", "image_ranks"),
                                                   ("text", "text_ranks")) if ex.get(key)]
    if ranks:
        lines.append("gt rank: " + ", ".join(ranks))
    return "\n".join(lines[:18])


def save_examples_png(results: Mapping[str, Any] | Sequence[Mapping[str, Any]], path: str | Path,
                      *, max_queries: int = 4, top_k: int = EXAMPLE_TOP_K) -> Path:
    """A PNG grid: one row per query, its text then its top retrieved images (scores in the
    titles, ground truth in green). ``results`` is a results dict or its ``examples`` list."""
    # Figure + Agg canvas directly: no pyplot global state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    examples = list(results["examples"] if isinstance(results, Mapping) else results)[:max_queries]
    if not examples:
        raise ValueError("no examples to draw")
    cols = 1 + top_k
    fig = Figure(figsize=(2.2 * cols + 2.0, 2.6 * len(examples)))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(examples), cols, width_ratios=[2.5] + [1] * top_k)
    for r, ex in enumerate(examples):
        ax = fig.add_subplot(grid[r, 0])
        ax.axis("off")
        ax.text(0, 1, _query_caption(ex, 48), va="top", ha="left", fontsize=7, family="monospace",
                transform=ax.transAxes)
        for c, item in enumerate(ex.get("retrieved_images", [])[:top_k]):
            ax = fig.add_subplot(grid[r, 1 + c])
            ax.set_xticks([])
            ax.set_yticks([])
            thumb = _thumbnail(item["path"])
            if thumb is not None:
                ax.imshow(thumb)
            else:
                ax.text(0.5, 0.5, "(no file)", ha="center", va="center", transform=ax.transAxes)
            colour = "green" if item["is_gt"] else "black"
            ax.set_title(f"#{c + 1}  {item['score']:.3f}", fontsize=8, color=colour)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3 if item["is_gt"] else 0.5)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    logger.info("wrote %s", path)
    return path
