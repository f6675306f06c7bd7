"""Process-group helpers and the one cross-rank feature gather.

Every function degrades to the single-process case when torch.distributed is not
initialised, so library code can call them unconditionally.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def local_rank() -> int:
    """Rank on this node (torchrun's LOCAL_RANK, else the global rank)."""
    return int(os.environ.get("LOCAL_RANK", get_rank()))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks (in place copy semantics: returns a new tensor)."""
    if get_world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the gradient.

    Every rank computes the *same* global contrastive loss L from the gathered features.

    sum_grads=True (exact): d L / d(local shard) receives contributions from every rank's copy
    of L, so the backward sums the incoming gradients over ranks (all_reduce) before slicing
    out the local rows. DDP later averages parameter grads over ranks, which turns the W-fold
    sum back into exactly dL/dtheta of the single-process loss on the concatenated batch.

    sum_grads=False (FROMAGe's gather: all_gather without grad, local shard put back): only
    this rank's copy of L reaches its shard, so after DDP's averaging the contrastive gradient
    is dL/dtheta / W. Kept to reproduce FROMAGe's multi-GPU runs.

    Local batch sizes may differ between ranks (skipped bad rows): shards are padded to the
    largest size for the collective and trimmed again.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, sum_grads: bool) -> torch.Tensor:  # local: (n_r, D)
        sizes = _gather_sizes(local.shape[0], local.device)
        max_n = max(sizes)
        padded = local.new_zeros((max_n, *local.shape[1:]))
        padded[: local.shape[0]] = local
        shards = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(shards, padded.contiguous())
        ctx.sizes, ctx.rank, ctx.sum_grads = sizes, get_rank(), sum_grads
        return torch.cat([s[:n] for s, n in zip(shards, sizes)], dim=0)  # (sum n_r, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.sum_grads:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


GATHER_GRADS = ("exact", "fromage")


def gather_features(local: torch.Tensor, grad: str = "exact") -> torch.Tensor:
    """Concatenate `local` (n_r, D) from all ranks in rank order, keeping the local gradient.

    grad="exact": the gradient of the global loss (1 process == W processes);
    grad="fromage": FROMAGe's 1/W-weighted contrastive gradient (see `_GatherWithGrad`).
    Single process: returns `local` unchanged.
    """
    if grad not in GATHER_GRADS:
        raise ValueError(f"grad={grad!r}: expected one of {GATHER_GRADS}")
    if get_world_size() == 1:
        return local
    return _GatherWithGrad.apply(local, grad == "exact")
