"""How a system answers from a candidate pool: when it shows an image, how it ranks texts
(SPEC section 4, "Baselines run their own way"). Shared by the MMDialog evaluation, the
retrieve command and the app.

* Image rules: ``always`` (UniMuR: both modalities every time), ``threshold`` (an image only
  when the top image's cosine exceeds a threshold), ``ret-token`` (FROMAGe: an image only when
  greedy decoding after the context generates ``[RET]``, retrieved with that ``[RET]``'s state;
  `unimur.inference.generative.generate_responses`).
* Text rankings: ``embedding`` (UniMuR: cosine with u) or ``likelihood`` (FROMAGe: the summed
  log-likelihood of the candidate after the prompt; the mean per token is reported beside it).
"""
from __future__ import annotations

import torch
from torch import Tensor

IMAGE_RULES = ("always", "threshold", "ret-token")
TEXT_RANKINGS = ("embedding", "likelihood")
# FROMAGe's generation length (fromage/models.py `generate`, max_len=32).
RET_MAX_TOKENS = 32


def response_rules(method: str, image_rule: str | None = None, text_ranking: str | None = None,
                   image_threshold: float | None = None) -> tuple[str, str]:
    """(image_rule, text_ranking) with each method's own defaults: FROMAGe answers its way
    (ret-token, likelihood: it has no text space), UniMuR always outputs both modalities and
    ranks texts by embedding; a threshold implies the threshold rule, and goes only with it."""
    fromage = method == "fromage"
    image_rule = image_rule or ("threshold" if image_threshold is not None
                                else "ret-token" if fromage else "always")
    text_ranking = text_ranking or ("likelihood" if fromage else "embedding")
    if image_rule not in IMAGE_RULES or text_ranking not in TEXT_RANKINGS:
        raise ValueError(f"image_rule {image_rule!r} / text_ranking {text_ranking!r}: expected one of "
                         f"{IMAGE_RULES} / {TEXT_RANKINGS}")
    if image_rule == "threshold" and image_threshold is None:
        raise ValueError("--image-rule threshold needs --image-threshold T")
    if image_rule != "threshold" and image_threshold is not None:
        raise ValueError(f"--image-threshold applies to --image-rule threshold, not {image_rule}")
    return image_rule, text_ranking


def describe_image_rule(rule: str, threshold: float | None, ret_max_tokens: int) -> str:
    return {"always": "always both modalities",
            "threshold": f"image only when top image cosine > {threshold}",
            "ret-token": f"image only when greedy decoding of up to {ret_max_tokens} tokens, cut at the "
                         f"first newline, yields [RET]; retrieved with that [RET]'s hidden state "
                         f"(FROMAGe)"}[rule]


def image_outputs(has_pool: Tensor, top_score: Tensor, rule: str, threshold: float | None,
                  generated_ret: Tensor | None) -> Tensor:
    """[Q] bool: whether the system outputs an image (never when the pool has none)."""
    out = has_pool.clone()
    if rule == "threshold":
        out &= top_score > threshold
    elif rule == "ret-token":
        out &= generated_ret
    return out


def image_output_quality(shown: Tensor, has_image: Tensor) -> dict[str, float | None]:
    """Whether showing an image was right: precision and recall of the image outputs against
    whether the ground-truth response holds an image, and their F1 (None where undefined)."""
    shown, has_image = shown.bool(), has_image.bool()
    tp = int((shown & has_image).sum())
    n_shown, n_has = int(shown.sum()), int(has_image.sum())
    return {"precision": tp / n_shown if n_shown else None,
            "recall": tp / n_has if n_has else None,
            "f1": 2 * tp / (n_shown + n_has) if n_shown + n_has else None,
            "responses_with_image": n_has, "image_outputs": n_shown, "correct_image_outputs": tp}


def best_threshold(top_scores: Tensor, has_image: Tensor) -> float:
    """The threshold on the top image's cosine that maximises the F1 of the image outputs
    (``threshold`` rule) on a validation split; midway between neighbouring scores."""
    scores = torch.sort(top_scores.float().unique()).values
    if scores.numel() == 0:
        raise ValueError("no validation query to choose an image threshold on")
    lows = torch.cat([scores[:1] - 1.0, scores])
    highs = torch.cat([scores, scores[-1:] + 1.0])
    best, best_f1 = float(lows[0]), -1.0
    for lo, hi in zip(lows.tolist(), highs.tolist()):
        t = (lo + hi) / 2
        f1 = image_output_quality(top_scores > t, has_image)["f1"] or 0.0
        if f1 > best_f1:
            best, best_f1 = t, f1
    return best
