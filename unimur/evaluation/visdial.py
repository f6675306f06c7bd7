"""VisDial 1.0 dialogue -> image retrieval over the pool of all evaluated images (paper Table 3;
SPEC section 4). Results format: `unimur.evaluation`."""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unimur.data.visdial import CONTEXTS as VISDIAL_CONTEXTS
from unimur.data.visdial import build_visdial_query, load_visdial
from unimur.evaluation.common import EXAMPLE_TOP_K, N_EXAMPLES, check_dims, ranked_top_k, split_counts, timing_of
from unimur.inference.embedder import Embedder
from unimur.inference.rules import RET_MAX_TOKENS
from unimur.ranking import ranks_from_sim, recall_metrics

logger = logging.getLogger(__name__)

# Reader skip reasons that remove a whole VisDial dialogue (the rest count rounds).
_VISDIAL_DIALOGUE_REASONS = {"missing_image", "malformed_dialog", "dialog_with_bad_round"}


def _dedupe_images(dialogs: list, skipped: Counter) -> list:
    """Keep the first dialogue per image id: a shared image would make ground truth ambiguous."""
    seen: set[int] = set()
    kept = []
    for d in dialogs:
        if d.image_id in seen:
            skipped["duplicate_image_id"] += 1
            continue
        seen.add(d.image_id)
        kept.append(d)
    return kept


def _visdial_queries(dialogs: list, context: str, rounds: int, skipped: Counter
                     ) -> tuple[list, list[str]]:
    """(dialogues, query strings); dialogues whose query would be empty are counted and dropped."""
    # Bad settings fail here, so the ValueError below can only mean "this dialogue is empty".
    if context not in VISDIAL_CONTEXTS:
        raise ValueError(f"context must be one of {VISDIAL_CONTEXTS}, got {context!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    kept, texts = [], []
    for d in dialogs:
        try:
            texts.append(build_visdial_query(d, context=context, rounds=rounds))
        except ValueError as e:
            logger.debug("dropping dialogue: %s", e)
            skipped["empty_query"] += 1
            continue
        kept.append(d)
    return kept, texts


def evaluate_visdial(embedder: Embedder, visdial_dir: str | Path, *, context: str = "rounds",
                     rounds: int = 10, split: str = "val", n_examples: int = N_EXAMPLES,
                     data: tuple[list, Counter] | None = None, image_rule: str = "always",
                     ret_max_tokens: int = RET_MAX_TOKENS) -> dict[str, Any]:
    """VisDial dialogue-to-image retrieval (and image-to-dialogue), SPEC section 4.

    The pool is the images of all evaluated dialogues; dialogue ``i``'s positive is image ``i``.
    Dialogues the reader drops, duplicates and dialogues whose image cannot be decoded are
    removed from both queries and pool and counted by reason. ``data`` is what
    ``load_visdial(visdial_dir, split)`` returned, when the caller read it already (the scripts
    check their data before loading the model). ``image_rule="ret-token"`` (FROMAGe's) outputs
    an image only for dialogues after which greedy decoding of up to ``ret_max_tokens`` tokens
    (cut at the first newline) yields [RET], retrieved with that [RET]'s hidden state:
    ``image_retrieval_rate`` and ``dialogue_to_image_output`` (a dialogue without an image
    output is a miss: never a hit, and rank pool size + 1 in the mean rank) are then reported
    too; R@k itself forces [RET] after the dialogue, as both papers evaluate it.

    Returns the results dict described in the module docstring.
    """
    t0 = time.perf_counter()
    if image_rule not in ("always", "ret-token"):
        raise ValueError(f"image_rule must be 'always' or 'ret-token' for VisDial, got {image_rule!r}")
    dialogs, queries, skipped = _visdial_dialogues(visdial_dir, split, data, context, rounds)
    images, image_skips = embedder.embed_images([d.image_path for d in dialogs],
                                                ids=[str(d.image_id) for d in dialogs])
    dialogs, queries = _readable_only(dialogs, queries, images.ids, skipped)

    contexts = [[q] for q in queries]
    u = embedder.embed_queries(contexts).float().cpu()                   # [D, E]
    v = images.embeds.float().cpu()                                      # [D, E]
    check_dims(u, v, "VisDial images")
    sim = u @ v.T                                                        # [D dialogues, D images]
    positives = torch.arange(len(dialogs))
    d2i = ranks_from_sim(sim, positives)
    i2d = ranks_from_sim(sim.T, positives)
    metrics = {"dialogue_to_image": recall_metrics(d2i), "image_to_dialogue": recall_metrics(i2d)}
    if image_rule == "ret-token":
        metrics.update(_ret_token_metrics(embedder, contexts, u, v, ret_max_tokens))

    counts = split_counts(skipped, {"skipped_dialogues": _VISDIAL_DIALOGUE_REASONS
                                     | {"duplicate_image_id", "empty_query", "unreadable_image"}},
                           rest="dropped_elements")
    logger.info("VisDial: %d dialogues evaluated, skipped %s", len(dialogs), dict(skipped))
    return {
        "benchmark": "visdial",
        "settings": _visdial_settings(split, context, rounds, visdial_dir, len(dialogs), image_rule,
                                      ret_max_tokens),
        "metrics": metrics,
        "counts": {"dialogues_evaluated": len(dialogs),
                   "dialogues_skipped": sum(counts["skipped_dialogues"].values()),
                   **counts, "unreadable_images": dict(sorted(image_skips.items()))},
        "timing": timing_of(t0, len(dialogs)),
        "examples": _visdial_examples(dialogs, queries, sim, d2i, i2d, n_examples),
        "notes": [],
    }


def _visdial_dialogues(visdial_dir: str | Path, split: str, data: tuple[list, Counter] | None,
                       context: str, rounds: int) -> tuple[list, list[str], Counter]:
    """The dialogues to evaluate (read unless ``data`` has them), their query strings, and the
    skipped ones counted by reason; an error when none is left."""
    dialogs, skipped = data if data is not None else load_visdial(visdial_dir, split)
    dialogs, skipped = list(dialogs), Counter(skipped)
    dialogs = _dedupe_images(dialogs, skipped)
    dialogs, queries = _visdial_queries(dialogs, context, rounds, skipped)
    if not dialogs:
        raise ValueError(f"{visdial_dir}: no dialogue left to evaluate (skipped: {dict(skipped)})")
    return dialogs, queries, skipped


def _readable_only(dialogs: list, queries: list[str], image_ids: list[str], skipped: Counter
                   ) -> tuple[list, list[str]]:
    """The dialogues (and queries) whose image the embedder could read (``image_ids``, in input
    order); the others counted as ``unreadable_image``."""
    readable = set(image_ids)
    keep = [i for i, d in enumerate(dialogs) if str(d.image_id) in readable]
    if len(keep) < len(dialogs):
        skipped["unreadable_image"] += len(dialogs) - len(keep)
        dialogs, queries = [dialogs[i] for i in keep], [queries[i] for i in keep]
    if [str(d.image_id) for d in dialogs] != image_ids:  # the Embedder contract; check, never assume
        raise RuntimeError("embed_images returned ids out of input order")
    return dialogs, queries


def _ret_token_metrics(embedder: Embedder, contexts: list[list[str]], u: Tensor, v: Tensor,
                       ret_max_tokens: int) -> dict[str, Any]:
    """FROMAGe's image rule: the share of dialogues after which greedy decoding yields [RET], and
    dialogue->image recall with the image retrieved by that [RET]'s state (a dialogue without an
    image output is a miss, ranked pool size + 1)."""
    positives = torch.arange(len(contexts))
    generations = embedder.generate_responses(contexts, ret_max_tokens)
    shown = generations.ret.bool()
    d2i_gen = ranks_from_sim(torch.where(shown[:, None], generations.u.float(), u) @ v.T, positives)
    return {"image_retrieval_rate": float(shown.float().mean()),
            "dialogue_to_image_output": recall_metrics(
                torch.where(shown, d2i_gen, torch.full_like(d2i_gen, len(contexts) + 1)), missed=~shown)}


def _visdial_settings(split: str, context: str, rounds: int, visdial_dir: str | Path, pool_size: int,
                      image_rule: str, ret_max_tokens: int) -> dict[str, Any]:
    """The results' ``settings``: what was evaluated, and how."""
    return {
        "split": split, "context": context, "rounds": rounds,
        "visdial_dir": str(visdial_dir),
        "pool": "the images of all evaluated dialogues", "pool_size": pool_size,
        "score": "cosine (dot product of L2-normalised embeddings)",
        "ties": "lower pool index (file order) ranks first", "ranks": "1-based",
        "image_rule": image_rule, "ret_max_tokens": ret_max_tokens,
        "directions": {"dialogue_to_image": "intended direction (SPEC)",
                       "image_to_dialogue": "FROMAGe's released script's direction"},
    }


def _visdial_examples(dialogs: list, queries: list[str], sim: Tensor, ranks: Tensor,
                      i2d_ranks: Tensor, n: int) -> list[dict[str, Any]]:
    """The first ``n`` dialogues with their top retrieved images (sim: [D, D]); ``gt_rank`` is
    the dialogue->image rank, ``image_to_dialogue_rank`` that of the dialogue for its image."""
    values, indices = ranked_top_k(sim[:n], EXAMPLE_TOP_K)
    return [{
        "query": queries[q],
        "gt_images": [str(dialogs[q].image_path)],
        "gt_rank": int(ranks[q]),
        "image_to_dialogue_rank": int(i2d_ranks[q]),
        "retrieved_images": [{"id": str(dialogs[j].image_id), "path": str(dialogs[j].image_path),
                              "score": float(s), "is_gt": int(j) == q}
                             for s, j in zip(values[q].tolist(), indices[q].tolist())],
    } for q in range(min(n, len(dialogs)))]


