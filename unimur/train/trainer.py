"""The training loop: AdamW on the trainable layers, warm-up + step decay, grad accumulation
and clipping, mixed precision, validation (losses + retrieval), atomic checkpoints, exact
resume. Distributed setup lives in `launch.py`; this module only asks `distributed.py`.

Step accounting: one *step* is one optimizer update = `grad_accumulation_steps` micro
batches of `batch_size` samples (global, split over ranks). Epoch e covers steps
[e*steps_per_epoch, (e+1)*steps_per_epoch); validation runs before training and after each
epoch. The data position is a function of the step (`sampling.GlobalBatchSampler`), so a
checkpoint's step is all the sampler state there is.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from unimur.config import Config
from unimur.data.cached_dataset import build_cached_cc3m_dataset
from unimur.data.cc3m import CaptionCollator, CaptionDataset, SkipCounter, is_empty_batch
from unimur.data.cc3m_sources import read_split
from unimur.model.backbones.base import ImageFeatures
from unimur.model.backbones.hub import compile_llm, square_input_size
from unimur.model.model import UniMuR
from unimur.model.packing import CAPTIONING, concat_this_batch
from unimur.ranking import ranks_of_positives, recall_metrics
from unimur.train.checkpoint import (
    BEST,
    LATEST,
    load_checkpoint,
    remove_stale_temp_files,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from unimur.train.loss import UniMuRLoss, needs_lm
from unimur.train.metric_log import MetricLogger
from unimur.train.run_folder import write_record
from unimur.train.sampling import GlobalBatchSampler
from unimur.utils import distributed as dist_utils

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    best_score: float = -math.inf
    best_step: int = -1


def lr_lambda(cfg: Config):
    """Linear warm-up over lr_warmup_steps, then x gamma every lr_schedule_step_size epochs."""
    t = cfg.train
    decay_every = max(1, t.lr_schedule_step_size * t.steps_per_epoch)

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / t.lr_warmup_steps) if t.lr_warmup_steps > 0 else 1.0
        return warm * t.lr_schedule_gamma ** (step // decay_every)

    return f


def validation_score(metrics: dict[str, float]) -> float:
    """Best-checkpoint score: mean R@{1,5,10} of the unified embedding retrieving the image
    (u->image) and, for UniMuR, the caption text (u->text): the two uses of one query."""
    keys = [k for k in metrics if k.startswith(("u2image/R@", "u2text/R@"))]
    return sum(metrics[k] for k in keys) / max(1, len(keys))


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, resume: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = device
        self.rank, self.world = dist_utils.get_rank(), dist_utils.get_world_size()
        t = cfg.train
        if t.batch_size % self.world or t.val_batch_size % self.world:
            raise ValueError(f"batch sizes ({t.batch_size}, {t.val_batch_size}) must divide by world size {self.world}")

        torch.manual_seed(t.seed)
        self.model = UniMuR.build(cfg.model, device=device).to(device)
        _check_image_size(cfg.data.image_size, self.model)
        self.model.train()
        self.ddp = self._wrap_ddp(self.model)
        params = [p for _, p in self.model.trainable_named_parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=t.betas, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
        self.loss_fn = UniMuRLoss(t.loss)
        self.state = TrainState()
        self.with_lm = needs_lm(t.loss)
        self.with_text = cfg.model.method == "unimur" and t.loss.l_tm != 0
        self.with_caption = t.loss.l_cap != 0

        self.train_data = self._dataset("train")  # TSV-level skips are logged by the reader
        self.val_data = self._dataset("val")
        if cfg.data.feature_cache:
            # training reads the cache: CLIP (1.7 GB at ViT-L/14) has nothing left to do on the GPU
            self.model.encoders.to("cpu")
            torch.cuda.empty_cache()  # no-op without CUDA
        if t.compile:
            compile_llm(self.model.llm)
        self.collate = CaptionCollator(self.model.tokenizer, cfg.data.max_len, self.model.ret_id)
        self._metrics: MetricLogger | None = None  # opened on first use: see `metrics`
        self._stop_signal: int | None = None
        self._saved_step: dict[str, int] = {}  # checkpoint name -> step it holds

        if dist_utils.is_main_process():
            remove_stale_temp_files(self.run_dir)
        ckpt_path = resolve_resume(resume, self.run_dir)
        if ckpt_path is not None:
            self._load(ckpt_path)
        elif t.start_epoch:
            self._start_at(t.start_epoch * t.steps_per_epoch)

    def _start_at(self, step: int) -> None:
        """A new run positioned at `step` (FROMAGe's --start-epoch): data order and schedule."""
        self.state.step = step
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg), last_epoch=step - 1)
        logger.info("starting at epoch %d (step %d)", self.cfg.train.start_epoch, step)

    @property
    def metrics(self) -> MetricLogger:
        # Opened lazily: building the trainer reads every input, and the run folder is only
        # created (by launch) once that has succeeded.
        if self._metrics is None:
            self._metrics = MetricLogger(self.run_dir if dist_utils.is_main_process() else None)
        return self._metrics

    # ------------------------------------------------------------------ setup

    def _wrap_ddp(self, model: UniMuR):
        if not dist_utils.is_initialized():
            return model
        # Frozen backbones are identical on every rank (same weights / seed): don't let DDP
        # broadcast billions of parameters at start-up or track them.
        frozen = [n for n, _ in model.named_parameters() if n.startswith(("llm.", "encoders."))]
        frozen += [n for n, _ in model.named_buffers() if n.startswith(("llm.", "encoders."))]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        loss = self.cfg.train.loss
        # a zero loss weight leaves its layers without gradients: tell DDP not to wait for them
        unused = loss.l_cap == 0 or (model.text_proj is not None and loss.l_tm == 0)
        # device_ids=None on every device: DDP then leaves the inputs where they are, so the
        # token ids stay on the host for the model's checks (UniMuR.forward); the model sits on
        # one device, which is all DDP needs
        return DDP(model, device_ids=None, find_unused_parameters=unused)

    def _dataset(self, split: str):
        """CC3M split with cached frozen features (default) or with images decoded per step."""
        d = self.cfg.data
        if d.feature_cache:
            cache_dir = Path(d.cache_dir) if d.cache_dir else Path(d.dataset_dir) / ".feature_cache"
            precision = self.cfg.train.precision
            dtype = d.cache_dtype or ("bf16" if precision == "bf16" else "fp16")
            return build_cached_cc3m_dataset(
                d.dataset_dir, d.image_dir, self.model.encoders, cache_dir, split=split,
                dataset_format=d.dataset_format, dtype=dtype, verify_checksum=d.cache_verify,
                batch_size=self.cfg.train.val_batch_size, num_workers=d.workers, device=self.device,
                autocast=precision if precision in AUTOCAST_DTYPES else None)
        data = read_split(d.dataset_format, d.dataset_dir, d.image_dir, split)
        return CaptionDataset(data.rows, self.model.encoders.preprocess, read_skipped=data.skipped)

    def _sampler(self, dataset, global_batch: int, start: int, num: int | None, shuffle: bool,
                 drop_last: bool = True) -> GlobalBatchSampler:
        return GlobalBatchSampler(len(dataset), global_batch, rank=self.rank, world_size=self.world,
                                  seed=self.cfg.train.seed, start_batch=start, num_batches=num,
                                  shuffle=shuffle, drop_last=drop_last)

    def _loader(self, dataset, global_batch: int, start: int, num: int, shuffle: bool) -> DataLoader:
        return self._loader_of(dataset, self._sampler(dataset, global_batch, start, num, shuffle))

    def _loader_of(self, dataset, sampler: GlobalBatchSampler) -> DataLoader:
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=self.cfg.data.workers, pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------- batch work

    def _features(self, batch: dict[str, Any]) -> tuple[ImageFeatures, torch.Tensor | None]:
        """Frozen CLIP features: from the cache, or recomputed (FROMAGe's way)."""
        if "image_pooled" in batch:
            feats = ImageFeatures(batch["image_pooled"], batch["image_embed"]).to(self.device, non_blocking=True)
            text = batch["text_embed"].to(self.device, non_blocking=True) if self.with_text else None
            return feats, text
        feats = self.model.encode_images(batch["pixels"].to(self.device, non_blocking=True))
        text = self.model.encode_texts(batch["captions"]) if self.with_text else None
        return feats, text

    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.cfg.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, module, batch, concat_captions: bool = False):
        feats, text = self._features(batch)
        # ids and masks stay on the host: the model decides what depends on them there and
        # moves them itself (UniMuR.forward), so no step waits for the GPU on their account
        tok = {k: batch[k] for k in ("caption_ids", "caption_mask", "ret_ids", "ret_mask")}
        with self._autocast():
            out = module(feats, text, **tok, with_lm=self.with_lm, with_text=self.with_text,
                         with_caption=self.with_caption, concat_captions=concat_captions)
            terms = self.loss_fn(out)
        return out, terms

    # ------------------------------------------------------------------- loop

    def fit(self) -> TrainState:
        t = self.cfg.train
        total = t.epochs * t.steps_per_epoch
        self._install_signal_handlers()
        if self.state.step == 0:
            self.validate()
        while self.state.step < total and self._stop_signal is None:
            epoch = self.state.step // t.steps_per_epoch
            self.train_epoch(epoch)
            if self._stop_signal is not None:
                break
            score = validation_score(self.validate())
            improved = score > self.state.best_score
            if improved:
                self.state.best_score, self.state.best_step = score, self.state.step
            self._save(LATEST)  # after the update, so "latest" carries the best score too
            if improved:
                self._save(BEST)
                logger.info("new best checkpoint at step %d (score %.3f)", self.state.step, score)
        if self._stop_signal is not None:
            self._save(LATEST)
            logger.warning("stopped by signal %d at step %d; checkpoint saved, resume with --resume latest",
                           self._stop_signal, self.state.step)
        if self._metrics is not None:
            self._metrics.close()
        return self.state

    def train_epoch(self, epoch: int) -> None:
        t = self.cfg.train
        end = (epoch + 1) * t.steps_per_epoch
        accum = t.grad_accumulation_steps
        first = self.state.step * accum  # global index of the first micro-batch
        loader = self._loader(self.train_data, t.batch_size, first, (end - self.state.step) * accum, shuffle=True)
        skips = SkipCounter()
        bar = tqdm(total=end - self.state.step, desc=f"epoch {epoch}", disable=not dist_utils.is_main_process(),
                   dynamic_ncols=True, file=sys.stderr)
        self.model.train()
        t0, samples, micro = time.perf_counter(), 0, 0
        # Loss terms add up on the device and are read only every --print-freq steps: reading a
        # device value makes the host wait for the GPU, and a step should only wait when the
        # optimizer needs it (fp16's inf check).
        sums: dict[str, torch.Tensor | float] = {}
        steps_summed = 0
        for batch_idx, batch in enumerate(loader, start=first):
            skips.update(batch)
            n_local = len(batch["captions"])
            # every rank must agree to skip an empty batch, or the collectives would hang
            if dist_utils.any_rank(n_local == 0):
                micro += 1
                if micro % accum == 0:
                    self.optimizer.zero_grad(set_to_none=True)
                    self._after_step(bar)
                continue
            last_micro = (micro + 1) % accum == 0
            sync = contextlib.nullcontext() if (last_micro or self.ddp is self.model) else self.ddp.no_sync()
            with sync:
                concat = self.with_caption and concat_this_batch(t.concat_captions_prob, t.seed, batch_idx, CAPTIONING)
                _, terms = self._forward(self.ddp, batch, concat)
                self.scaler.scale(terms["loss"] / accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / accum
            sums["concat_captions"] = sums.get("concat_captions", 0.0) + float(concat) / accum
            samples += n_local
            micro += 1
            if not last_micro:
                continue
            self._optimizer_step()
            steps_summed += 1
            logs = None
            if self._logs_at(self.state.step + 1):
                # the mean over the steps since the last record (one step with --print-freq 1)
                logs = {k: v / steps_summed for k, v in self._reduce_logs(sums).items()}
                rate = samples * self.world / max(time.perf_counter() - t0, 1e-9)
                logs.update(lr=self.optimizer.param_groups[0]["lr"], samples_per_s=rate,
                            logit_scale=float(self.model.logit_scale.detach().exp()))
                sums, steps_summed = {}, 0
            self._after_step(bar, logs)
            if self._stop_signal is not None:
                break
        bar.close()
        skips.log(f"train epoch {epoch}")

    def _optimizer_step(self) -> None:
        t = self.cfg.train
        self.scaler.unscale_(self.optimizer)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.model.trainable_named_parameters()], t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.cfg.model.ret_renorm:
            self.model.renorm_ret_embedding()

    def _logs_at(self, step: int) -> bool:
        """Whether the training metrics are recorded at `step` (every --print-freq, and the first)."""
        return step % max(1, self.cfg.train.print_freq) == 0 or step == 1

    def _after_step(self, bar, logs: dict[str, float] | None = None) -> None:
        self.state.step += 1
        bar.update(1)
        t = self.cfg.train
        if logs is not None:
            bar.set_postfix(loss=f"{logs['loss']:.3f}", sps=f"{logs['samples_per_s']:.1f}")
            self.metrics.log("train", logs, self.state.step)
        if t.save_every_steps and self.state.step % t.save_every_steps == 0:
            self._save(LATEST)
        # a signal on any rank stops all ranks at the same step (host-side: no device sync)
        if dist_utils.any_rank(self._stop_signal is not None) and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM

    def _reduce_logs(self, sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Mean of each term over ranks (token losses: each rank holds its share x world); the
        one read of device values, once per record."""
        keys = sorted(sums)
        vals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys])
        vals = dist_utils.all_reduce_sum(vals) / self.world
        return dict(zip(keys, vals.tolist()))

    # ------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        loader, n_batches = self._val_loader()
        sums: dict[str, float] = {}
        us, vs, ts = [], [], []
        for batch in tqdm(loader, desc="validate", disable=not dist_utils.is_main_process(),
                          dynamic_ncols=True, file=sys.stderr):
            # all ranks skip together, or the gathers in the loss would hang
            if dist_utils.any_rank(is_empty_batch(batch)):
                continue
            out, terms = self._forward(self.model, batch)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) / n_batches
            us.append(out.u.float())
            vs.append(out.v.float())
            if out.t is not None:
                ts.append(out.t.float())
        metrics = {f"loss/{k}": v for k, v in self._reduce_logs(sums).items()}
        u, v = (dist_utils.gather_features(torch.cat(x)) for x in (us, vs))
        metrics.update(_retrieval_metrics("u2image", u, v))
        metrics.update(_retrieval_metrics("image2u", v, u))
        if ts:
            tt = dist_utils.gather_features(torch.cat(ts))
            metrics.update(_retrieval_metrics("u2text", u, tt))
            metrics.update(_retrieval_metrics("text2u", tt, u))
        metrics["score"] = validation_score(metrics)
        metrics["pairs"] = int(u.shape[0])
        self.metrics.log("val", metrics, self.state.step)
        logger.info("validation at step %d (%d pairs): %s", self.state.step, u.shape[0],
                    ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "R@1" in k or k in ("score", "loss/loss")))
        self.model.train()
        return metrics

    def _val_loader(self) -> tuple[DataLoader, int]:
        """The first `val_steps_per_epoch` validation batches, or the whole set for -1
        (FROMAGe's default: the last, smaller batch included)."""
        t = self.cfg.train
        n_rows = len(self.val_data)
        if n_rows < (t.val_batch_size if t.val_steps_per_epoch > 0 else self.world):
            raise ValueError(f"validation set ({n_rows} rows) is smaller than one "
                             f"validation batch ({t.val_batch_size})")
        if t.val_steps_per_epoch > 0:
            n_batches = min(t.val_steps_per_epoch, n_rows // t.val_batch_size)
            return self._loader(self.val_data, t.val_batch_size, 0, n_batches, shuffle=False), n_batches
        sampler = self._sampler(self.val_data, t.val_batch_size, 0, None, shuffle=False, drop_last=False)
        sampler.num_batches = sampler.batches_per_pass
        if sampler.n_used < n_rows:
            logger.warning("validation: %d of %d rows left out (fewer remainder rows than ranks)",
                           n_rows - sampler.n_used, n_rows)
        return self._loader_of(self.val_data, sampler), sampler.num_batches

    # ------------------------------------------------------------ checkpoints

    def _save(self, name: str) -> None:
        if not dist_utils.is_main_process():
            return
        ckpt = {
            "config": self.cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.trainable_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": vars(self.state).copy(),
            "rng": rng_state(),
            "world_size": self.world,
        }
        save_checkpoint(ckpt, self.run_dir / name, previous_step=self._saved_step.get(name))
        self._saved_step[name] = self.state.step

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        saved = Config.from_dict(ckpt["config"])
        if saved.model != self.cfg.model:
            diff = {k: (getattr(saved.model, k), getattr(self.cfg.model, k))
                    for k in vars(saved.model) if getattr(saved.model, k) != getattr(self.cfg.model, k)}
            raise ValueError(f"cannot resume from {path}: model config differs (saved, now): {diff}")
        self.model.load_trainable_state_dict(ckpt["model"], source=str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        if path.parent.resolve() == self.run_dir.resolve():  # what the run folder's files hold
            self._saved_step[path.name] = self.state.step
            if self.state.best_step >= 0:
                self._saved_step[BEST] = self.state.best_step
        logger.info("resumed from %s at step %d", path, self.state.step)

    # ---------------------------------------------------------------- signals

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self._stop_signal is None:
                logger.warning("received signal %d: finishing this step, then saving", signum)
            self._stop_signal = signum

        for s in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not in the main thread
                signal.signal(s, handler)


def _check_image_size(image_size: int | None, model: UniMuR) -> None:
    if image_size is None:
        return
    native = square_input_size(model.encoders.preprocess)
    if image_size != native:
        raise ValueError(f"--image-size {image_size}: the frozen encoder {model.config.visual_model} takes "
                         f"{native}x{native} inputs (its own preprocessing resizes to them); "
                         f"drop --image-size or pass {native}")


def _retrieval_metrics(name: str, queries: torch.Tensor, index: torch.Tensor) -> dict[str, float]:
    """Row i of `queries` should retrieve row i of `index`."""
    ranks = ranks_of_positives(queries, index, torch.arange(queries.shape[0], device=queries.device))
    m = recall_metrics(ranks)
    return {f"{name}/{k}": float(v) for k, v in m.items() if k in ("R@1", "R@5", "R@10", "MRR", "mean_rank")}


def write_run_info(run_dir: Path, cfg: Config, argv: list[str], model: UniMuR) -> None:
    """config.json, the command line, parameter counts (params.json, param_count.txt) and the
    code's git state (git_info.txt), in the run folder (rank 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    (run_dir / "command.txt").write_text(" ".join([sys.executable, *argv]) + "\n")
    trainable = {n: p.numel() for n, p in model.trainable_named_parameters()}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    info = {"trainable_total": sum(trainable.values()), "frozen_total": frozen, "trainable": trainable}
    (run_dir / "params.json").write_text(json.dumps(info, indent=2) + "\n")
    write_record(run_dir, model)
    logger.info("trainable parameters: %s (frozen: %s)", f"{info['trainable_total']:,}", f"{frozen:,}")
