"""Process-group helpers and the one cross-rank feature gather.

Every function degrades to the single-process case when torch.distributed is not
initialised, so library code can call them unconditionally.

Host-side agreement (flags, batch sizes, a job id) goes over a gloo group on CPU tensors
(:func:`control_group`): under NCCL the tensors of a collective live on the GPU, and reading
one back makes the host wait for every kernel queued before it, once per step.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_MIN = 120.0
_control_groups: dict[int, object] = {}  # default group's id -> its gloo twin (under NCCL)


def init(backend: str, init_method: str | None, world_size: int, rank: int,
         timeout_min: float = DEFAULT_TIMEOUT_MIN) -> None:
    """init_process_group with a timeout long enough for rank 0's cache merge (NCCL's default
    of 10 minutes kills a job whose other ranks wait that long), then the control group."""
    timeout = datetime.timedelta(minutes=timeout_min)
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timeout)
    control_group(timeout)  # a collective: created here, at the same point on every rank


def control_group(timeout: datetime.timedelta | None = None):
    """A gloo group over all ranks for host-side values (None: the default group is gloo already)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _control_groups:
        _control_groups[key] = dist.new_group(backend="gloo", timeout=timeout)
    return _control_groups[key]


def _host_all_reduce(values: list[int], op) -> list[int]:
    t = torch.tensor(values, dtype=torch.long)
    dist.all_reduce(t, op=op, group=control_group())
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (the same answer on every rank; host-side)."""
    if get_world_size() == 1:
        return bool(flag)
    return bool(_host_all_reduce([int(flag)], dist.ReduceOp.MAX)[0])


def all_ranks(flag: bool) -> bool:
    """Whether `flag` holds on every rank (the same answer on every rank; host-side)."""
    if get_world_size() == 1:
        return bool(flag)
    return bool(_host_all_reduce([int(flag)], dist.ReduceOp.MIN)[0])


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (host-side)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def default_device() -> str:
    """cuda when a GPU is visible, else cpu: every command's default ``--device``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _gather_sizes(n: int) -> list[int]:
    """Every rank's local batch size (host-side: the sizes are known before any kernel runs)."""
    size = torch.tensor([n], dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size, group=control_group())
    return torch.cat(sizes).tolist()


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
        sizes = _gather_sizes(local.shape[0])
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
