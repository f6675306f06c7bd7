"""Host syncs per training step, counted on the CPU (where CUDA's sync debug mode does not exist).

On a GPU the host waits for the device whenever it reads a device tensor's value: ``.item()``,
``.tolist()``, ``bool/int/float(tensor)``, ``nonzero`` and boolean-mask indexing (their output
size depends on the data). This script runs `main.py` itself (tiny backbones, synthetic set,
cached features) and counts those reads while `Trainer.train_epoch` runs, by call site.

Which tensors would be on the GPU? A torch-function mode follows every tensor through the
step: the model's parameters and buffers, and anything moved with ``.to(device)`` / ``.cuda()``
(on the CPU that move is a no-op, so the mode gives back a marked alias) or created with
``device=`` the training device (or the device of a device tensor), are device tensors, and so
is every result of an op with a device tensor among its inputs. Everything else (the data
loader's batches, host-side bookkeeping such as AdamW's step counters or the concat coin, and
what is computed from them only) is a host tensor, whose reads cost no sync. Limits: gradients
made by autograd are not followed (the optimizer's own reads, e.g. fp16's inf check, are
allowed anyway), and a device-to-host ``.to`` cannot be told from a host-to-device one on a CPU.

    python benchmarks/count_host_syncs.py                               # 1 process
    torchrun --nproc-per-node 2 benchmarks/count_host_syncs.py          # 2 ranks (gloo)
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402

counts: collections.Counter = collections.Counter()
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select"}
_MOVES = {"to", "cuda"}


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_on_device", False)


def _mark(t):
    if isinstance(t, torch.Tensor):
        t._on_device = True
    return t


# torch.device objects read off a tensor (`x.device`): whether that tensor was a device tensor.
# A device object made any other way (the trainer's own) counts as the training device.
_device_from: dict[int, bool] = {}
_keep_alive: list = []  # so that ids of recorded device objects are not reused


def _targets_device(a) -> bool:
    if isinstance(a, torch.device):
        return _device_from.get(id(a), True)
    return isinstance(a, str) and a.startswith("cuda")  # "cpu" spelled out: the host, on purpose


def _site() -> str:
    """The first caller outside torch and this mode."""
    frame = sys._getframe(1)
    while frame.f_back is not None and ("/torch/" in frame.f_code.co_filename.replace(os.sep, "/")
                                        or frame.f_code.co_name in ("_site", "__torch_function__")):
        frame = frame.f_back
    name = frame.f_code.co_filename.replace(os.sep, "/")
    short = name.split("site-packages/")[-1] if "site-packages/" in name else os.path.relpath(name, ROOT)
    return f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"


class DeviceReads(TorchFunctionMode):
    """Counts reads of device tensors' values (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        device_in = any(_on_device(a) for a in inputs)
        is_bool_index = name == "__getitem__" and any(
            isinstance(k, torch.Tensor) and k.dtype == torch.bool
            for k in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if device_in and (name in _READS or is_bool_index or (name == "nonzero")):
            counts[f"{'bool-mask' if is_bool_index else name.strip('_'):9s} {_site()}"] += 1
        out = func(*args, **kwargs)
        if getattr(func, "__self__", None) is torch.Tensor.device:  # `x.device`: remember where it came from
            _device_from[id(out)] = _on_device(args[0])
            _keep_alive.append(out)
            return out
        if not inputs and _targets_device(kwargs.get("device")):  # torch.zeros(..., device=the training device)
            return tree_map(_mark, out)
        moved = name in _MOVES and (name == "cuda" or any(_targets_device(a) for a in (*args[1:], *kwargs.values())))
        if moved:
            if isinstance(out, torch.Tensor) and out is args[0]:
                out = out.view_as(out)  # a no-op move on the CPU: mark an alias, not the host tensor
            return _mark(out)
        if device_in:
            # results that are host inputs given back (the optimizer grouping its host-side step
            # counters with the parameters, in-place ops) stay host tensors
            host_in = {id(a) for a in inputs if not _on_device(a)}
            tree_map(lambda t: t if id(t) in host_in else _mark(t), out)
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--print-freq", type=int, default=100)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further main.py flags")
    args = ap.parse_args(argv)
    import main as main_module
    from unimur.data.synthetic.generator import generate
    from unimur.train import trainer as trainer_module

    # one folder for all ranks (torchrun: a fixed one under the temp dir, per master port)
    default = (Path(tempfile.gettempdir()) / f"syncs-{os.environ['MASTER_PORT']}" if "MASTER_PORT" in os.environ
               else Path(tempfile.mkdtemp(prefix="syncs-")))
    tmp = Path(os.environ.get("COUNT_SYNCS_DIR") or default)
    rank = int(os.environ.get("RANK", "0"))
    ready = tmp / "syn" / "ready"
    if rank == 0 and not ready.exists():
        generate(tmp / "syn", seed=0, n_train=96, n_val=32, n_visdial=2, n_mmdialog=2, image_size=32, n_negatives=4)
        ready.touch()
    while not ready.exists():
        import time
        time.sleep(0.2)
    original = trainer_module.Trainer.train_epoch

    def train_epoch(self, epoch):
        for t in (*self.model.parameters(), *self.model.buffers()):
            _mark(t)
        with DeviceReads():
            return original(self, epoch)

    counts.clear()
    trainer_module.Trainer.train_epoch = train_epoch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    flags = ["--opt-version=tiny-opt", "--visual-model=tiny-clip", f"--dataset_dir={tmp / 'syn' / 'dataset'}",
             f"--image-dir={tmp / 'syn' / 'images'}", f"--log-base-dir={tmp / 'runs'}", f"--exp_name=w{world}",
             "--epochs=1", f"--steps-per-epoch={args.steps}", "--val-steps-per-epoch=1", "--batch-size=8",
             "--val-batch-size=8", "--precision=bf16", f"--print-freq={args.print_freq}", "-j", "0",
             "--overwrite", "--dist-backend=gloo", *args.extra]
    try:
        main_module.main(flags)
    finally:
        trainer_module.Trainer.train_epoch = original
    if rank == 0:
        total = sum(counts.values())
        print(f"host syncs per training step (rank 0 of {world}; {args.steps} steps, print-freq "
              f"{args.print_freq}, precision bf16): {total / args.steps:.2f}")
        for site, n in counts.most_common():
            print(f"  {n / args.steps:6.2f}  {site}")


if __name__ == "__main__":
    main()
