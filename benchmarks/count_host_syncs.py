"""Host syncs per training step, counted on the CPU (where CUDA's sync debug mode does not exist).

On a GPU the host waits for the device whenever it reads a device tensor's value: ``.item()``,
``.tolist()``, ``bool/int/float(tensor)``, ``nonzero`` and boolean-mask indexing (their output
size depends on the data). This script runs `main.py` itself (tiny backbones, synthetic set,
cached features) with those Tensor methods patched to count calls made while
`Trainer.train_epoch` runs, by call site; calls from the data loader's host-side preparation
(collator, sampler, dataset, DataLoader), AdamW's host-side step counters and the
concat-captions coin are not counted, since on a GPU those tensors are host tensors too. The figure is calls per optimizer step. Reads of tensors created on the host on purpose
(the control-plane flags of `distributed.py`, on a gloo group) are counted too but listed by
site, so they can be told apart.

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

# Host tensors on a GPU run too, so not syncs: the data loader's preparation (collator, sampler,
# dataset), AdamW's `step` counters (kept on the host unless capturable=True) and the
# concat-captions coin (a host generator).
_NOT_COUNTED = ("unimur/data.py", "unimur/sampling.py", "unimur/feature_cache.py", "torch/utils/data/",
                "tqdm/", "unimur/tokenizer.py", "torch/optim/")
_NOT_COUNTED_FUNCTIONS = ("concat_this_batch",)
counts: collections.Counter = collections.Counter()
_active = [False]


def _site() -> str | None:
    frame = sys._getframe(2)
    name = frame.f_code.co_filename.replace(os.sep, "/")
    if any(part in name for part in _NOT_COUNTED) or name == __file__ or frame.f_code.co_name in _NOT_COUNTED_FUNCTIONS:
        return None
    short = name.split("site-packages/")[-1] if "site-packages/" in name else os.path.relpath(name, ROOT)
    return f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"


def _counting(kind: str, original):
    def wrapper(self, *args, **kwargs):
        if _active[0]:
            site = _site()
            if site is not None:
                counts[f"{kind:9s} {site}"] += 1
        return original(self, *args, **kwargs)
    return wrapper


def _counting_getitem(original):
    def wrapper(self, index):
        if _active[0]:
            keys = index if isinstance(index, tuple) else (index,)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                site = _site()
                if site is not None:
                    counts[f"{'bool-mask':9s} {site}"] += 1
        return original(self, index)
    return wrapper


def install() -> None:
    T = torch.Tensor
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select"):
        setattr(T, name, _counting(name.strip("_"), getattr(T, name)))
    T.__getitem__ = _counting_getitem(T.__getitem__)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--print-freq", type=int, default=100)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further main.py flags")
    args = ap.parse_args(argv)
    import main as main_module
    from unimur import trainer as trainer_module
    from unimur.synthetic import generate

    tmp = Path(os.environ.get("COUNT_SYNCS_DIR") or tempfile.mkdtemp(prefix="syncs-"))
    rank = int(os.environ.get("RANK", "0"))
    paths_file = tmp / "syn" / "dataset" / "cc3m_val.tsv"
    if rank == 0 and not paths_file.exists():
        generate(tmp / "syn", seed=0, n_train=96, n_val=32, n_visdial=2, n_mmdialog=2, image_size=32, n_negatives=4)
    elif not paths_file.exists():
        import time
        while not paths_file.exists():
            time.sleep(0.2)
        time.sleep(1.0)
    original = trainer_module.Trainer.train_epoch

    def train_epoch(self, epoch):
        _active[0] = True
        try:
            return original(self, epoch)
        finally:
            _active[0] = False

    trainer_module.Trainer.train_epoch = train_epoch
    install()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    flags = ["--opt-version=tiny-opt", "--visual-model=tiny-clip", f"--dataset_dir={tmp / 'syn' / 'dataset'}",
             f"--image-dir={tmp / 'syn' / 'images'}", f"--log-base-dir={tmp / 'runs'}", f"--exp_name=w{world}",
             "--epochs=1", f"--steps-per-epoch={args.steps}", "--val-steps-per-epoch=1", "--batch-size=8",
             "--val-batch-size=8", "--precision=bf16", f"--print-freq={args.print_freq}", "-j", "0",
             "--overwrite", "--dist-backend=gloo", *args.extra]
    main_module.main(flags)
    if rank == 0:
        total = sum(counts.values())
        print(f"host syncs per training step (rank 0 of {world}; {args.steps} steps, print-freq "
              f"{args.print_freq}, precision bf16): {total / args.steps:.2f}")
        for site, n in counts.most_common():
            print(f"  {n / args.steps:6.2f}  {site}")


if __name__ == "__main__":
    main()
