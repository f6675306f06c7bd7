"""The cross-rank contrastive gradient: exact (2 processes == 1 process) and FROMAGe's gather
(2 processes == 1 process / 2), each checked against a single-process run on the whole batch."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unimur.config import LossConfig
from unimur.train.loss import symmetric_infonce
from unimur.utils.distributed import gather_features

N, D, E = 8, 6, 4


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g), torch.randn(D, E, generator=g)


def contrastive_grad(xa, xb, weight, mode):
    """Gradient of VM on a linear map shared by both sides (a stand-in for W_u / W_v)."""
    w = weight.clone().requires_grad_(True)
    u = torch.nn.functional.normalize(gather_features(xa @ w, mode), dim=-1)
    v = torch.nn.functional.normalize(gather_features(xb @ w, mode), dim=-1)
    symmetric_infonce(u, v, torch.tensor(10.0)).backward()
    return w.grad


def _worker(rank, world, port, mode, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        xa, xb, weight = data()
        shard = slice(rank * N // world, (rank + 1) * N // world)
        grad = contrastive_grad(xa[shard], xb[shard], weight, mode)
        dist.all_reduce(grad)  # what DDP does with parameter gradients: the mean over ranks
        if rank == 0:
            out.put((grad / world).numpy())
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_grad(mode):
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, free_port(), mode, out), nprocs=2, start_method="spawn", join=True)
    return torch.from_numpy(out.get())


@pytest.mark.parametrize("mode,factor", [("exact", 1.0), ("fromage", 0.5)])
def test_two_processes_against_one(mode, factor):
    xa, xb, weight = data()
    reference = contrastive_grad(xa, xb, weight, mode)  # one process, whole batch
    assert torch.allclose(two_process_grad(mode), factor * reference, atol=1e-6), mode


def test_fromage_method_uses_fromages_gather_and_records_it():
    from unimur.commands.train import parse_args

    _, unimur = parse_args([])
    _, fromage = parse_args(["--method", "fromage"])
    assert unimur.train.loss.gather_grad == "exact" and fromage.train.loss.gather_grad == "fromage"
    assert '"gather_grad": "fromage"' in fromage.to_json()
    _, override = parse_args(["--method", "fromage", "--gather-grad", "exact"])
    assert override.train.loss.gather_grad == "exact"
    with pytest.raises(ValueError, match="gather_grad"):
        LossConfig(gather_grad="sum")
