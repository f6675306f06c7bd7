"""UniMuR's training objective (SPEC section 2) as named terms.

  L = l_cap * CL + l_vm * VM + l_tm * TM + l_lm * LMret

Contrastive terms use the global batch: features are gathered across ranks
(`distributed.gather_features`, local shard keeps its gradient; `gather_grad` picks the
exact global gradient or FROMAGe's 1/W weighting). Token losses are
normalised by the global token count, so N ranks give the same loss and gradient as one
process on the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unimur.config import LossConfig
from unimur.model.model import UniMuROutput
from unimur.utils.distributed import all_reduce_sum, gather_features, get_world_size


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """1/2 [CE(s A B^T, I) + CE(s B A^T, I)] for row-aligned, normalised (N, E) features."""
    logits = scale * a.float() @ b.float().t()  # (N, N)
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def global_token_mean(nll_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Local contribution to the global-batch mean NLL.

    Returns world * local_sum / global_count: DDP averages gradients over ranks, so this
    yields exactly the gradient of global_sum / global_count; its mean over ranks is the
    global mean token NLL.
    """
    total = all_reduce_sum(n_tokens.detach().float()).clamp(min=1.0)
    return nll_sum * get_world_size() / total


class UniMuRLoss(torch.nn.Module):
    def __init__(self, weights: LossConfig):
        super().__init__()
        self.weights = weights

    def forward(self, out: UniMuROutput) -> dict[str, torch.Tensor]:
        """Named terms plus `loss` (the weighted total). Values are this rank's share."""
        w = self.weights
        u = gather_features(out.u, w.gather_grad)
        v = gather_features(out.v, w.gather_grad)
        terms = {"vm": symmetric_infonce(u, v, out.logit_scale)}
        total = w.l_vm * terms["vm"]
        if w.l_cap:
            terms["cap"] = global_token_mean(out.caption_nll, out.caption_tokens)
            total = total + w.l_cap * terms["cap"]
        if out.t is not None and w.l_tm:
            terms["tm"] = symmetric_infonce(u, gather_features(out.t, w.gather_grad), out.logit_scale)
            total = total + w.l_tm * terms["tm"]
        if out.lm_nll is not None and w.l_lm:
            terms["lm"] = global_token_mean(out.lm_nll, out.lm_tokens)
            total = total + w.l_lm * terms["lm"]
        terms["loss"] = total
        return terms


def needs_lm(weights: LossConfig) -> bool:
    return weights.l_lm != 0
