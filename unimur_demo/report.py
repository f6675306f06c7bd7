"""The demo's results: per-query ranks split into held-out / seen subsets, and the table.

Used by `unimur_demo.pipeline` (one row per benchmark and subset, one column per model, plus chance).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

N_KEPT_EXAMPLES = 8  # example queries kept in each JSON file (the scripts keep 8 too)
SUBSETS_NOTE = ("subsets: 'held-out' = queries built around a (colour, shape) pair never seen in "
                "training (meta.json heldout_pairs); 'seen' = the others (all queries use dialogue "
                "wordings the training captions never use)")


def _subset_metrics(groups: dict[str, list[int]]) -> dict[str, Any]:
    import torch

    from unimur.ranking import recall_metrics

    return {name: recall_metrics(torch.tensor(ranks, dtype=torch.long)) for name, ranks in groups.items()}


def visdial_subsets(results: dict[str, Any], meta: dict[str, Any]) -> tuple[dict, list]:
    """dialogue->image metrics on all / held-out / seen dialogues, and per-query rows."""
    heldout = {int(d["image_id"]): bool(d["heldout"]) for d in meta["splits"]["visdial"]}
    examples = results["examples"]
    if len(examples) != results["counts"]["dialogues_evaluated"]:
        raise RuntimeError("VisDial results do not carry every query's rank")
    d2i: dict[str, list[int]] = {"held-out": [], "seen": []}
    i2d: dict[str, list[int]] = {"held-out": [], "seen": []}
    rows = []
    for ex in examples:
        image_id = int(Path(ex["gt_images"][0]).stem.rsplit("_", 1)[1])
        group = "held-out" if heldout[image_id] else "seen"
        d2i[group].append(int(ex["gt_rank"]))
        i2d[group].append(int(ex["image_to_dialogue_rank"]))
        rows.append({"image_id": image_id, "heldout": heldout[image_id], "rank": int(ex["gt_rank"]),
                     "image_to_dialogue_rank": int(ex["image_to_dialogue_rank"])})
    return {"dialogue_to_image": {"all": results["metrics"]["dialogue_to_image"], **_subset_metrics(d2i)},
            "image_to_dialogue": {"all": results["metrics"]["image_to_dialogue"], **_subset_metrics(i2d)},
            }, rows


def mmdialog_subsets(results: dict[str, Any], meta: dict[str, Any]) -> tuple[dict, list]:
    """text / image / overall metrics on all / held-out / seen target pairs, and per-query rows."""
    dialogues = meta["splits"]["mmdialog"]["dialogues"]
    heldout = {str(d["conversation_id"]): bool(d["heldout"]) for d in dialogues}
    scenario = {str(d["conversation_id"]): d["scenario"] for d in dialogues}
    examples = results["examples"]
    if len(examples) != results["counts"]["queries_evaluated"]:
        raise RuntimeError("MMDialog results do not carry every query's rank")
    ranks: dict[str, dict[str, list[int]]] = {m: {"held-out": [], "seen": []} for m in ("text", "image")}
    rows = []
    for ex in examples:
        cid = str(ex["conversation_id"])
        group = "held-out" if heldout[cid] else "seen"
        ranks["image"][group] += ex["image_ranks"]
        ranks["text"][group] += ex.get("text_ranks", [])
        rows.append({"conversation_id": ex["conversation_id"], "heldout": heldout[cid],
                     "scenario": scenario[cid], "image_ranks": ex["image_ranks"],
                     "text_ranks": ex.get("text_ranks", [])})
    m = results["metrics"]
    out = {"image": {"all": m["image"], **_subset_metrics(ranks["image"])}}
    if m["text"] is not None:
        out["text"] = {"all": m["text"], **_subset_metrics(ranks["text"])}
        out["overall"] = {"all": m["overall"], **_subset_metrics(
            {g: ranks["text"][g] + ranks["image"][g] for g in ("held-out", "seen")})}
    return out, rows


def labelled_examples(results: dict[str, Any], rows: list[dict], n_each: int = 2) -> list[dict]:
    """Two held-out and two seen example queries, the subset named in the query text."""
    picked = []
    examples = results["examples"]
    for want in (True, False):
        idx = [i for i, r in enumerate(rows) if r["heldout"] == want]
        idx.sort(key=lambda i: not examples[i].get("gt_images"))  # queries with a target image first
        idx = idx[:n_each]
        for i in idx:
            ex = dict(examples[i])
            ex["query"] = f"[{'HELD-OUT pair' if want else 'seen pair'}] {ex['query']}"
            picked.append(ex)
    return picked



def chance(pool: int) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking of a pool of ``pool`` candidates."""
    return {"R@1": 100.0 * min(1, pool) / pool, "R@5": 100.0 * min(5, pool) / pool,
            "R@10": 100.0 * min(10, pool) / pool,
            "MRR": sum(1.0 / r for r in range(1, pool + 1)) / pool, "mean_rank": (pool + 1) / 2}


# Report -----------------------------------------------------------------------------------------

ROWS = (  # (benchmark, metric, subset, label)
    ("visdial", "dialogue_to_image", "all", "VisDial dialogue->image  all"),
    ("visdial", "dialogue_to_image", "held-out", "                         held-out"),
    ("visdial", "dialogue_to_image", "seen", "                         seen"),
    ("visdial", "image_to_dialogue", "all", "VisDial image->dialogue  all"),
    ("visdial", "image_to_dialogue", "held-out", "                         held-out"),
    ("visdial", "image_to_dialogue", "seen", "                         seen"),
    ("mmdialog", "overall", "all", "MMDialog overall         all"),
    ("mmdialog", "overall", "held-out", "                         held-out"),
    ("mmdialog", "overall", "seen", "                         seen"),
    ("mmdialog", "image", "held-out", "MMDialog image           held-out"),
    ("mmdialog", "image", "seen", "                         seen"),
    ("mmdialog", "text", "held-out", "MMDialog text            held-out"),
    ("mmdialog", "text", "seen", "                         seen"),
)


def _cell(m: dict[str, Any] | None) -> str:
    if not m or m.get("R@1") is None or (isinstance(m["R@1"], float) and math.isnan(m["R@1"])):
        return "-"
    return f"{m['R@1']:5.1f} /{m['R@10']:5.1f}"


def results_table(models: dict[str, dict[str, Any]], chance_by_bench: dict[str, dict]) -> str:
    """R@1 / R@10 (%) per benchmark and subset, one column per model plus chance."""
    cols = list(models)
    width = 15
    head = f"{'benchmark / subset':<34}{'n':>5}  " + "".join(f"{c:>{width}}" for c in cols) + f"{'chance':>{width}}"
    legend = ("R@1 / R@10 in % (higher is better); n = queries (VisDial) or ground-truth "
              "elements (MMDialog)")
    lines = [legend, head, "-" * len(head)]
    for bench, metric, subset, label in ROWS:
        cells, n = [], None
        for c in cols:
            m = models[c].get(bench, {}).get("subsets", {}).get(metric, {}).get(subset)
            n = n if n is not None else (m or {}).get("n")
            cells.append(_cell(m))
        if all(c == "-" for c in cells):
            continue
        lines.append(f"{label:<34}{n if n is not None else '-':>5}  "
                     + "".join(f"{c:>{width}}" for c in cells)
                     + f"{_cell(chance_by_bench[bench]):>{width}}")
    # the offline encoders share no space, so no CLIP cosine: the labels give an attribute check
    attr = [models[c].get("mmdialog", {}).get("metrics", {}).get("attribute_consistency") for c in cols]
    if any(a is not None for a in attr):
        lines.append(f"{'MMDialog attribute consistency':<34}{'':>5}  "
                     + "".join(f"{'-' if a is None else f'{100 * a:.1f}':>{width}}" for a in attr)
                     + f"{'':>{width}}   (% of responses whose top text names an object the top image shows)")
    return "\n".join(lines)
