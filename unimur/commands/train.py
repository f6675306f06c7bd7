"""Train UniMuR: ``python main.py`` (the seed README's command), ``unimur-train``,
``python -m unimur.commands.train``.

Its flags are the seed README's plus FROMAGe's that still mean something here, mapped onto the
`Config` tree. Every flag sets a config field or a launch option; none is accepted and ignored.
``--dry-run`` prints the memory plan; otherwise the process(es) are launched
(`unimur.train.launch`) and train (`unimur.train.trainer`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from unimur.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig, fromage_preset
from unimur.utils.precision import default_llm_dtype

M, D, T, L = ModelConfig(), DataConfig(), TrainConfig(), LossConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train UniMuR (or the FROMAGe baseline) on CC3M-format data.")
    _add_distributed_flags(p)
    _add_model_flags(p)
    _add_data_flags(p)
    _add_training_flags(p)
    _add_loss_flags(p)
    return p


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--gpu", type=int, default=None, help="one process on this GPU id (FROMAGe)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory plan per GPU and per node (model built on the meta device, "
                        "no weights, no hub for OPT ids) and exit; GPUs per node: --nprocs, else the "
                        "ones found, else 1")
    g.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="--dry-run: judge the plan against this much memory per GPU (default: the GPU found)")
    g.add_argument("--dist-timeout", type=float, default=120.0, metavar="MINUTES",
                   help="timeout of every collective (init_process_group); long enough for ranks that wait "
                        "while rank 0 merges the CC3M feature cache (default 120; NCCL's own is 10)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the frozen LLM's forward (off by default; see benchmarks/bench_train_step.py)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--method", choices=("unimur", "fromage"), default=M.method,
                   help="fromage: FROMAGe's objective (W_v only, 256-d, + LMret, no TM) in this code")
    g.add_argument("--opt-version", dest="llm", default=M.llm, help="frozen LLM: hub id, local folder or tiny-opt")
    g.add_argument("--visual-model", default=M.visual_model, help="frozen CLIP: open_clip NAME[:tag], alias or tiny-clip")
    g.add_argument("--text-model", default=M.text_model, help="separate frozen text encoder (default: CLIP-T)")
    g.add_argument("--llm-dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="storage dtype of the frozen LLM (default: the --precision's 16-bit type, fp32 with "
                        "--precision fp32)")
    g.add_argument("--n-visual-tokens", type=int, default=M.n_visual_tokens)
    g.add_argument("--shared-emb-dim", type=int, default=None,
                   help=f"retrieval space of W_u/W_v/W_t (default {M.shared_emb_dim}; target_proj=linear only)")
    g.add_argument("--target-proj", choices=("none", "linear"), default=None,
                   help=f"default {M.target_proj} (linear for --method fromage)")
    g.add_argument("--visual-feature", choices=("pooled", "embed"), default=M.visual_feature)
    g.add_argument("--no-ret-renorm", dest="ret_renorm", action="store_false")
    g.add_argument("--text-emb-layers", type=_int_list, default=None,
                   help="comma-separated LLM layers read at [RET], one W_u each, summed (FROMAGe; default -1)")
    g.add_argument("--image_embed_dropout_prob", "--image-embed-dropout-prob", dest="image_embed_dropout_prob",
                   type=float, default=M.image_embed_dropout_prob, help="dropout on W_cap/W_v outputs (FROMAGe)")
    g.add_argument("--text_embed_dropout_prob", "--text-embed-dropout-prob", dest="text_embed_dropout_prob",
                   type=float, default=M.text_embed_dropout_prob, help="dropout on W_u outputs (FROMAGe)")
    g.add_argument("--use_image_embed_norm", action="store_true", help="refused: see the message")
    g.add_argument("--use_text_embed_layernorm", action="store_true", help="refused: see the message")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("-d", "--dataset", choices=("cc3m",), default=D.dataset)
    g.add_argument("--val-dataset", choices=("cc3m",), default=D.val_dataset)
    g.add_argument("--dataset_dir", "--dataset-dir", dest="dataset_dir", default=D.dataset_dir)
    g.add_argument("--image-dir", default=D.image_dir)
    g.add_argument("--max-len", type=int, default=D.max_len)
    g.add_argument("--image-size", type=int, default=None,
                   help="checked against the frozen encoder's input size (FROMAGe's flag; the encoder decides)")
    g.add_argument("--concat-captions-prob", type=float, default=None,
                   help=f"per step, chance that the captioning pass packs pairs of examples into one "
                        f"sequence (default {T.concat_captions_prob}, FROMAGe's)")
    g.add_argument("--concat-for-ret", action="store_true", help="refused: see the message")
    g.add_argument("--input-prompt", default=None, help="refused: see the message")
    g.add_argument("-j", "--workers", type=int, default=D.workers)
    g.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                   help="recompute frozen CLIP features every step (FROMAGe's way)")
    g.add_argument("--cache-dir", default=D.cache_dir)
    g.add_argument("--dataset-format", choices=("tsv", "img2dataset", "wds"), default=D.dataset_format,
                   help="tsv: <dataset-dir>/cc3m_<split>.tsv + --image-dir; img2dataset: <dataset-dir>/{train,val} "
                        "as img2dataset's files output; wds: <dataset-dir>/{train,val}/*.tar or a brace pattern "
                        "with {split}")
    g.add_argument("--cache-dtype", choices=("fp16", "bf16", "fp32"), default=D.cache_dtype,
                   help="storage dtype of cached CLIP features (default: bf16 with --precision bf16, else fp16)")
    g.add_argument("--cache-verify", action="store_true",
                   help="re-hash the whole feature cache at start (default: size + mtime + header hash)")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--exp_name", "--exp-name", dest="exp_name", default=T.exp_name)
    g.add_argument("--log-base-dir", default=T.log_base_dir)
    g.add_argument("--epochs", type=int, default=T.epochs)
    g.add_argument("--steps-per-epoch", type=int, default=T.steps_per_epoch)
    g.add_argument("--val-steps-per-epoch", type=int, default=T.val_steps_per_epoch)
    g.add_argument("-b", "--batch-size", type=int, default=T.batch_size, help="global batch, split over processes")
    g.add_argument("--val-batch-size", type=int, default=None, help="default: --batch-size (FROMAGe's)")
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
    g.add_argument("-p", "--print-freq", type=int, default=T.print_freq)
    g.add_argument("--start-epoch", type=int, default=T.start_epoch,
                   help="start a new run at this epoch (a resumed run continues from its checkpoint)")
    g.add_argument("-e", "--evaluate", action="store_true",
                   help="validate the checkpoint given by --resume, write the metrics, exit")
    g.add_argument("--save-every-steps", type=int, default=T.save_every_steps)
    g.add_argument("--resume", default=None, help="checkpoint path, or 'latest' for <run>/ckpt.pth.tar")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a run folder that holds an earlier run's checkpoints, "
                        "deleting them (without it such a folder is refused)")


def _add_loss_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loss weights (L = l_cap CL + l_vm VM + l_tm TM + l_lm LMret)")
    g.add_argument("--l-cap", "--cap-loss-scale", dest="l_cap", type=float, default=None)
    g.add_argument("--l-vm", dest="l_vm", type=float, default=None)
    g.add_argument("--ret-loss-scale", type=float, default=None,
                   help="FROMAGe's retrieval weight: l_vm, and with --method fromage also l_lm "
                        "(FROMAGe scales its [RET] LM loss and contrastive loss by it); --l-* flags win")
    g.add_argument("--l-tm", dest="l_tm", type=float, default=None)
    g.add_argument("--l-lm", dest="l_lm", type=float, default=None)
    g.add_argument("--gather-grad", choices=("exact", "fromage"), default=None,
                   help="contrastive gradient across ranks: exact global gradient (default) or "
                        "FROMAGe's 1/world-size weighting (default with --method fromage)")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config tree a parsed command line describes (method presets, then explicit flags).

    A flag that cannot change anything in the configuration it is given with is refused
    (`UsageError`), never accepted and ignored.
    """
    a = vars(args)
    target_proj = args.target_proj or ("linear" if args.method == "fromage" else M.target_proj)
    check_flags_take_effect(args, target_proj)
    model = ModelConfig(
        llm=args.llm, visual_model=args.visual_model, text_model=args.text_model,
        llm_dtype=args.llm_dtype or default_llm_dtype(args.precision),
        n_visual_tokens=args.n_visual_tokens, visual_feature=args.visual_feature,
        target_proj=target_proj, shared_emb_dim=args.shared_emb_dim or M.shared_emb_dim,
        ret_renorm=args.ret_renorm, text_emb_layers=tuple(args.text_emb_layers or M.text_emb_layers),
        image_embed_dropout_prob=args.image_embed_dropout_prob, text_embed_dropout_prob=args.text_embed_dropout_prob,
    )
    loss = LossConfig()
    if args.method == "fromage":
        model, loss = fromage_preset(model, loss)
        model = dataclasses.replace(model, shared_emb_dim=args.shared_emb_dim or model.shared_emb_dim)
    if args.ret_loss_scale is not None:
        scaled = ("l_vm", "l_lm") if args.method == "fromage" else ("l_vm",)
        loss = dataclasses.replace(loss, **{k: args.ret_loss_scale for k in scaled})
    loss = dataclasses.replace(loss, **{k: a[k] for k in ("l_cap", "l_vm", "l_tm", "l_lm", "gather_grad")
                                        if a[k] is not None})
    data = DataConfig(**{f.name: a[f.name] for f in dataclasses.fields(DataConfig)})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"betas", "loss", "concat_captions_prob"}
    concat = T.concat_captions_prob if args.concat_captions_prob is None else args.concat_captions_prob
    train = TrainConfig(**{k: a[k] for k in train_fields}, betas=(args.beta1, args.beta2), loss=loss,
                        concat_captions_prob=concat)
    return Config(model=model, data=data, train=train)


class UsageError(ValueError):
    """A command line that is well-formed but asks for something that cannot take effect."""


# FROMAGe flags that FROMAGe itself accepts but that change nothing there (or crash): refused
# with the reason, so a FROMAGe command line never silently means something else here.
REFUSED_FROMAGE_FLAGS = {
    "use_image_embed_norm": "--use_image_embed_norm: FROMAGe's main.py accepts it but its model never "
                            "reads it (no norm is applied), so it has nothing to reproduce",
    "use_text_embed_layernorm": "--use_text_embed_layernorm: FROMAGe's main.py accepts it but its model "
                                "never reads it (no layer norm is applied), so it has nothing to reproduce",
    "input_prompt": "--input-prompt: FROMAGe parses it but its training loop never passes it to the "
                    "model, so FROMAGe's runs trained without a prompt",
    "concat_for_ret": "--concat-for-ret: FROMAGe's model raises NotImplementedError for a concatenated "
                      "retrieval batch, so no FROMAGe run trained that way; --concat-captions-prob "
                      "packs the captioning pass",
}


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def check_flags_take_effect(args: argparse.Namespace, target_proj: str) -> None:
    for name, reason in REFUSED_FROMAGE_FLAGS.items():
        if getattr(args, name):
            raise UsageError(reason)
    if args.concat_captions_prob is not None and args.l_cap == 0:
        raise UsageError("--concat-captions-prob has no effect with --l-cap 0 (no captioning pass)")
    if args.evaluate and not args.resume:
        raise UsageError("-e/--evaluate validates a checkpoint: give it with --resume PATH (or latest)")
    if args.start_epoch and args.resume:
        raise UsageError("--start-epoch has no effect with --resume (the checkpoint holds the step)")
    if args.gpu is not None:
        if args.multiprocessing_distributed:
            raise UsageError("--gpu has no effect with --multiprocessing-distributed (one process per GPU)")
        if args.device is not None:
            raise UsageError("give --gpu N or --device, not both")
        import torch

        if args.gpu >= torch.cuda.device_count():
            raise UsageError(f"--gpu {args.gpu}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        args.device = f"cuda:{args.gpu}"
    if args.shared_emb_dim is not None and target_proj == "none":
        raise UsageError(f"--shared-emb-dim {args.shared_emb_dim} has no effect with --target-proj none "
                         "(u is aligned to CLIP's own joint space); add --target-proj linear or drop it")
    if args.method == "fromage" and args.l_tm:
        raise UsageError(f"--l-tm {args.l_tm} has no effect with --method fromage (FROMAGe has no text "
                         "retrieval space, so no TM term)")
    for flag, value in (("--cache-dir", args.cache_dir), ("--cache-dtype", args.cache_dtype),
                        ("--cache-verify", args.cache_verify)):
        if value and not args.feature_cache:
            raise UsageError(f"{flag} has no effect with --no-feature-cache (nothing is cached)")
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout {args.dist_timeout:g}: give a positive number of minutes")
    if args.gpu_memory is not None and not args.dry_run:
        raise UsageError("--gpu-memory has no effect without --dry-run")
    if args.nprocs is not None and not args.multiprocessing_distributed and not args.dry_run:
        raise UsageError("--nprocs has no effect without --multiprocessing-distributed "
                         "(use torchrun's --nproc-per-node for env:// launches)")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args, config_from_args(args)
    except ValueError as e:  # UsageError, or a value the config refuses
        parser.error(str(e))  # one line after the usage, exit status 2


def train(argv: Sequence[str] | None = None, prog: str = "unimur-train"):
    """Parse the training flags, then print the memory plan (``--dry-run``) or launch the
    process(es) and train. Returns rank 0's train state (or the plan)."""
    from unimur.train.launch import launch

    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse_args(argv)
    if args.dry_run:
        return dry_run(args, cfg)
    return launch(args, cfg, [prog, *argv])


def dry_run(args, cfg) -> dict:
    """Print what the run would do and need per GPU and per node; start nothing. A precision
    the GPU found here cannot run ends in the same one-line error the run would give."""
    import torch

    from unimur.train.memory_plan import format_plan, format_run, memory_plan
    from unimur.utils.precision import check_precision, detected_gpu

    gpu = detected_gpu()
    check_precision(cfg.train.precision, gpu)
    per_node = args.nprocs or torch.cuda.device_count() or 1
    nodes = max(1, args.world_size) if args.multiprocessing_distributed else 1
    plan = memory_plan(cfg, per_node, nodes)
    backend = args.dist_backend if gpu is not None or args.dist_backend != "nccl" else "gloo (nccl needs GPUs)"
    print(format_run(cfg, gpu, per_node, nodes, backend, args.dist_timeout))
    print(format_plan(plan, cfg, per_node, nodes, args.gpu_memory or (gpu.total_gib if gpu else None)))
    return plan


def cli() -> int:
    """The ``unimur-train`` console script."""
    from unimur.errors import run_cli

    return run_cli(train)


if __name__ == "__main__":
    sys.exit(cli())
