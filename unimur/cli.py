"""Command-line flags of `main.py`: the seed README's command plus FROMAGe's flags that
still mean something here, mapped onto the `Config` tree. Every flag sets a config field or
a launch option; none is accepted and ignored."""
from __future__ import annotations

import argparse
import dataclasses

from .config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig, fromage_preset

M, D, T, L = ModelConfig(), DataConfig(), TrainConfig(), LossConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train UniMuR (or the FROMAGe baseline) on CC3M-format data.")
    g = p.add_argument_group("distributed (FROMAGe / PyTorch ImageNet-example semantics)")
    g.add_argument("--dist-url", default="env://", help="init method, e.g. tcp://127.0.0.1:PORT")
    g.add_argument("--dist-backend", default="nccl", help="nccl on GPUs; falls back to gloo on CPU")
    g.add_argument("--multiprocessing-distributed", action="store_true",
                   help="spawn one process per GPU on this node (per --nprocs on CPU)")
    g.add_argument("--world-size", type=int, default=1, help="number of nodes (processes without --multiprocessing-distributed)")
    g.add_argument("--rank", type=int, default=0, help="node rank")
    g.add_argument("--nprocs", type=int, default=None,
                   help="processes per node with --multiprocessing-distributed (default: GPU count, 1 on CPU)")
    g.add_argument("--device", default=None, help="force a device (cpu, cuda); default: cuda if available")

    g = p.add_argument_group("model")
    g.add_argument("--method", choices=("unimur", "fromage"), default=M.method,
                   help="fromage: FROMAGe's objective (W_v only, 256-d, + LMret, no TM) in this code")
    g.add_argument("--opt-version", dest="llm", default=M.llm, help="frozen LLM: hub id, local folder or tiny-opt")
    g.add_argument("--visual-model", default=M.visual_model, help="frozen CLIP: open_clip NAME[:tag], alias or tiny-clip")
    g.add_argument("--text-model", default=M.text_model, help="separate frozen text encoder (default: CLIP-T)")
    g.add_argument("--llm-dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="storage dtype of the frozen LLM (default: bf16 with --precision bf16, else fp32)")
    g.add_argument("--n-visual-tokens", type=int, default=M.n_visual_tokens)
    g.add_argument("--shared-emb-dim", type=int, default=M.shared_emb_dim)
    g.add_argument("--target-proj", choices=("none", "linear"), default=None,
                   help=f"default {M.target_proj} (linear for --method fromage)")
    g.add_argument("--visual-feature", choices=("pooled", "embed"), default=M.visual_feature)
    g.add_argument("--no-ret-renorm", dest="ret_renorm", action="store_false")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("cc3m",), default=D.dataset)
    g.add_argument("--val-dataset", choices=("cc3m",), default=D.val_dataset)
    g.add_argument("--dataset_dir", "--dataset-dir", dest="dataset_dir", default=D.dataset_dir)
    g.add_argument("--image-dir", default=D.image_dir)
    g.add_argument("--max-len", type=int, default=D.max_len)
    g.add_argument("-j", "--workers", type=int, default=D.workers)
    g.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                   help="recompute frozen CLIP features every step (FROMAGe's way)")
    g.add_argument("--cache-dir", default=D.cache_dir)

    g = p.add_argument_group("training")
    g.add_argument("--exp_name", "--exp-name", dest="exp_name", default=T.exp_name)
    g.add_argument("--log-base-dir", default=T.log_base_dir)
    g.add_argument("--epochs", type=int, default=T.epochs)
    g.add_argument("--steps-per-epoch", type=int, default=T.steps_per_epoch)
    g.add_argument("--val-steps-per-epoch", type=int, default=T.val_steps_per_epoch)
    g.add_argument("-b", "--batch-size", type=int, default=T.batch_size, help="global batch, split over processes")
    g.add_argument("--val-batch-size", type=int, default=T.val_batch_size)
    g.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=T.learning_rate)
    g.add_argument("--beta1", type=float, default=T.betas[0])
    g.add_argument("--beta2", type=float, default=T.betas[1])
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=T.weight_decay)
    g.add_argument("--lr-warmup-steps", type=int, default=T.lr_warmup_steps)
    g.add_argument("--lr-schedule-step-size", type=int, default=T.lr_schedule_step_size)
    g.add_argument("--lr-schedule-gamma", type=float, default=T.lr_schedule_gamma)
    g.add_argument("--grad-clip", type=float, default=T.grad_clip)
    g.add_argument("--grad-accumulation-steps", type=int, default=T.grad_accumulation_steps)
    g.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=T.precision)
    g.add_argument("--seed", type=int, default=T.seed)
    g.add_argument("--print-freq", type=int, default=T.print_freq)
    g.add_argument("--save-every-steps", type=int, default=T.save_every_steps)
    g.add_argument("--resume", default=None, help="checkpoint path, or 'latest' for <run>/ckpt.pth.tar")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a run folder that holds an earlier run's checkpoints, "
                        "deleting them (without it such a folder is refused)")

    g = p.add_argument_group("loss weights (L = l_cap CL + l_vm VM + l_tm TM + l_lm LMret)")
    g.add_argument("--l-cap", "--cap-loss-scale", dest="l_cap", type=float, default=None)
    g.add_argument("--l-vm", "--ret-loss-scale", dest="l_vm", type=float, default=None)
    g.add_argument("--l-tm", dest="l_tm", type=float, default=None)
    g.add_argument("--l-lm", dest="l_lm", type=float, default=None)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The config tree a parsed command line describes (method presets, then explicit flags)."""
    a = vars(args)
    model = ModelConfig(
        llm=args.llm, visual_model=args.visual_model, text_model=args.text_model,
        llm_dtype=args.llm_dtype or ("bf16" if args.precision == "bf16" else "fp32"),
        n_visual_tokens=args.n_visual_tokens, visual_feature=args.visual_feature,
        target_proj=args.target_proj or ("linear" if args.method == "fromage" else M.target_proj),
        shared_emb_dim=args.shared_emb_dim, ret_renorm=args.ret_renorm,
    )
    loss = LossConfig()
    if args.method == "fromage":
        model, loss = fromage_preset(model, loss)
        model = dataclasses.replace(model, shared_emb_dim=args.shared_emb_dim)
    loss = dataclasses.replace(loss, **{k: a[k] for k in ("l_cap", "l_vm", "l_tm", "l_lm") if a[k] is not None})
    data = DataConfig(**{f.name: a[f.name] for f in dataclasses.fields(DataConfig)})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"betas", "loss"}
    train = TrainConfig(**{k: a[k] for k in train_fields}, betas=(args.beta1, args.beta2), loss=loss)
    return Config(model=model, data=data, train=train)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    args = build_parser().parse_args(argv)
    return args, config_from_args(args)
