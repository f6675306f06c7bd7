"""UniMuR vs FROMAGe (and UniMuR's ablations) under one protocol, over several seeds.

    python benchmarks/compare_methods.py [--out compare_run] [--quick] [--seeds 0 1 2 3 4]

On the demo's synthetic data and pretrained offline backbones (SmolLM2-135M, EfficientNet-Lite0,
all-MiniLM-L6-v2; see ``unimur_demo/pipeline.py``), with one feature cache for all runs, this:

1. trains, per seed, UniMuR and FROMAGe (``--method fromage``: CL + LMret + VM), and with
   ``--variants unimur fromage no_tm no_vm [no_cl]`` on the first ``--ablation-seeds`` seeds
   UniMuR without TM (``--l-tm 0``), without VM (``--l-vm 0``), without CL, all with ``main.py``, the
   demo's recipe plus the captioning pass (CL with FROMAGe's concatenated captions), and the
   last step's weights (one selection rule for every method);
2. evaluates each model on VisDial (dialogue->image; both methods force [RET], as both papers
   do) and MMDialog, every context laid out as FROMAGe prompts a dialogue (``Q:``/``A:``
   lines ending in ``\nA:``), each method answering its own way: UniMuR outputs both
   modalities and ranks texts by its embedding; FROMAGe ranks texts by their summed
   log-likelihood after ``A:`` and shows an image only when it generates [RET] within 32 greedy
   tokens (cut at the first newline), retrieved with that [RET]'s state. UniMuR is also
   evaluated with an image threshold chosen on a validation split, and under FROMAGe's rules;
3. reports every metric as mean +- std over the seeds, and UniMuR - FROMAGe as a paired
   difference with a 95% interval over seeds and queries (``unimur.evaluation.paired_bootstrap``), each claim
   of the paper's abstract marked holds / does not hold / within noise after Holm's correction;
4. writes ``<out>/results/comparison.json`` and ``comparison.png`` (bars: mean, error bars: std).

Every model of the comparison shares the frozen backbones, so their frozen passes (image
features, the LLM over text-only contexts) are computed once (``unimur.inference.frozen_pass_memo``).
A finished run's results are kept under ``<out>/results/runs`` and reused when the command is
run again with the same code (a hash of ``unimur/`` and ``main.py``) and settings (an
interrupted comparison resumes where it stopped); ``provenance`` in the JSON says which.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from unimur.evaluation.comparison import (  # noqa: E402
    EVALUATIONS,
    JOINT_METRICS,
    METRICS,
    VARIANTS,
    claims_table,
    fmt_interval,
    joint,
    mmdialog_per_query,
    summarise,
    visdial_per_query,
)
from unimur.evaluation.paired_bootstrap import PerQuery, paired_difference  # noqa: E402
from unimur_demo import pipeline as demo  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)

logger = logging.getLogger("compare_methods")

# The demo's recipe (unimur_demo/pipeline.py DEFAULT) on evaluation sets large enough for intervals to
# mean something: 300 VisDial dialogues (pool of 300 images) and 300 MMDialog dialogues (19
# negatives per modality, a pool of 20; the demo's 49 would more than double the cost of
# FROMAGe's likelihood ranking, which scores every candidate text with the LLM). Training:
# 30 steps of 32 instead of the demo's 90, as 16 trainings with the captioning pass (a backward
# through the whole LLM: ~6 s a step here) must fit in the time budget.
# Every variant trains with the captioning pass (l_cap=1, FROMAGe's concatenated captions with
# probability 0.5, main.py's default), so that W_cap is trained and the images inside MMDialog
# contexts mean something to the LLM: FROMAGe's generative rules read them.
FULL = dataclasses.replace(demo.DEFAULT, n_visdial=300, n_mmdialog=300, n_negatives=19,
                           epochs=3, steps_per_epoch=10, l_cap=1.0)
QUICK = dataclasses.replace(demo.QUICK, n_visdial=40, n_mmdialog=40, n_negatives=19, l_cap=1.0)
EVERY = 10**9  # keep one example per query: the per-query arrays come from them
# The MMDialog validation split on which UniMuR's image threshold is chosen: other dialogues,
# from another data seed (never the test queries).
N_VALIDATION = {"full": 100, "quick": 30}
# How every evaluation reads and answers (part of each result's key, so that a change recomputes).
EVAL_SETTINGS = {"prompt_style": "dialogue", "ret_max_tokens": 32, "checkpoint": "last step",
                 "threshold": "max image-output F1 on the validation split"}


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """A hash of the code a result depends on: every .py file of the library, of the demo package
    (its recipe trains every variant) and main.py (a commit would miss uncommitted edits). This script's recipe and evaluation settings are keyed
    by value (FULL/QUICK, EVAL_SETTINGS), so that a change to its reporting reuses the runs."""
    h = hashlib.sha256()
    files = [*(REPO / "unimur").rglob("*.py"), *(REPO / "unimur_demo").rglob("*.py"), REPO / "main.py"]
    for path in sorted(files):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class Runs:
    """Trained models and finished evaluations under ``out``, reused when their settings match."""

    def __init__(self, out: Path, cfg: demo.DemoConfig, data_meta: dict[str, Any]):
        self.out, self.cfg = out, cfg
        self.code = code_version()
        self.recipe = _fingerprint(dataclasses.asdict(cfg), data_meta.get("sizes"), data_meta.get("seed"),
                                   data_meta.get("generator_version"), self.code)
        self.provenance: dict[str, str] = {}  # run -> "reused" | "computed"
        (out / "results" / "runs").mkdir(parents=True, exist_ok=True)

    def model(self, variant: str, seed: int, data: dict[str, Path]) -> Path:
        """The pruned model of (variant, seed): trained now unless an earlier run left it."""
        from unimur.train.export import prune

        name = f"{variant}_s{seed}"
        model_dir = self.out / "models" / name
        stamp = _fingerprint(self.recipe, VARIANTS[variant].flags, seed)
        stamp_file = model_dir / "compare_fingerprint.txt"
        if stamp_file.is_file() and stamp_file.read_text() == stamp:
            logger.info("reusing %s (same code, recipe, variant and seed)", model_dir)
            self.provenance[f"model {name}"] = "reused"
            return model_dir
        run_dir, _, _ = demo.train(demo.PRETRAINED, self.cfg, data, self.out, seed, name=name,
                                   extra_flags=VARIANTS[variant].flags)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        # one selection rule for every variant: the last step (the validation score that picks
        # ckpt_best differs by method: UniMuR's looks at text, FROMAGe's cannot)
        prune(run_dir / "ckpt.pth.tar", model_dir)
        stamp_file.write_text(stamp)
        self.provenance[f"model {name}"] = "computed"
        return model_dir

    def result_path(self, evaluation: str, seed: int) -> tuple[Path, str]:
        e = EVALUATIONS[evaluation]
        stamp = _fingerprint(self.recipe, VARIANTS[e.variant].flags, seed, dataclasses.asdict(e), EVAL_SETTINGS)
        return self.out / "results" / "runs" / f"{evaluation}_s{seed}.json", stamp

    def cached_result(self, evaluation: str, seed: int) -> dict[str, Any] | None:
        path, stamp = self.result_path(evaluation, seed)
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == stamp:
                self.provenance[f"{evaluation} s{seed}"] = "reused"
                return saved
            logger.info("%s: other code or settings than now: recomputing", path)
        self.provenance[f"{evaluation} s{seed}"] = "computed"
        return None

    def save_result(self, evaluation: str, seed: int, result: dict[str, Any]) -> None:
        path, stamp = self.result_path(evaluation, seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**result, "fingerprint": stamp}) + "\n")
        tmp.replace(path)  # atomic: a killed run leaves the old file or none


def evaluate(model, evaluation: str, data: dict[str, Path], labels, cfg: demo.DemoConfig, memo,
             validation: dict[str, Any] | None = None) -> dict:
    """One model under one evaluation's rules: the evaluations' metrics and per-query arrays
    (``validation``: the split and labels a threshold rule is chosen on)."""
    from unimur.evaluation.mmdialog.protocol import evaluate_mmdialog
    from unimur.evaluation.visdial import evaluate_visdial
    from unimur.inference.rules import best_threshold

    e = EVALUATIONS[evaluation]
    embedder = demo._embedder(model, cfg.eval_batch_size, memo)
    out: dict[str, Any] = {"metrics": {}, "keys": {}, "per_query": {}, "seconds": {}, "settings": {}}
    rules = dict(prompt_style=EVAL_SETTINGS["prompt_style"], ret_max_tokens=EVAL_SETTINGS["ret_max_tokens"],
                 n_negatives=cfg.n_negatives, n_examples=EVERY, attribute_labels=labels)
    threshold = None
    if e.image_rule == "threshold":
        t0 = time.perf_counter()
        val = evaluate_mmdialog(embedder, validation["mmdialog_dir"], image_rule="always", **{
            **rules, "attribute_labels": validation["labels"]})
        import torch

        threshold = best_threshold(torch.tensor([ex["top_image_score"] for ex in val["examples"]]),
                                   torch.tensor([ex["gt_has_image"] for ex in val["examples"]]))
        out["seconds"]["validation"] = round(time.perf_counter() - t0, 1)
        out["threshold"] = {"value": threshold, "chosen_on": f"{len(val['examples'])} validation queries",
                            "validation_image_output": val["metrics"]["image_output"]}
    benches = (["visdial"] if e.visdial else []) + ["mmdialog"]
    for bench in benches:
        t0 = time.perf_counter()
        if bench == "visdial":
            results = evaluate_visdial(embedder, data["visdial_dir"], n_examples=EVERY)
            keys, per_query = visdial_per_query(results)
        else:
            results = evaluate_mmdialog(embedder, data["mmdialog_dir"], image_rule=e.image_rule,
                                        text_ranking=e.text_ranking, image_threshold=threshold, **rules)
            keys, per_query = mmdialog_per_query(results, labels)
            out["examples"] = [{k: ex.get(k) for k in ("conversation_id", "prompt", "generated_text",
                                                       "image_output", "gt_has_image")}
                               for ex in results["examples"][:3]]
            out["contexts_cut"] = results["counts"]["contexts_cut"]
        out["seconds"][bench] = round(time.perf_counter() - t0, 1)
        out["metrics"][bench] = results["metrics"]
        out["settings"][bench] = {k: results["settings"].get(k) for k in (
            "image_rule", "text_ranking", "pool_size", "n_negatives", "rounds", "prompt_style", "ret_max_tokens",
            "image_threshold")}
        out["keys"][bench] = [list(k) if isinstance(k, tuple) else k for k in keys]
        out["per_query"].update({m: {"num": pq.num.tolist(), "den": pq.den.tolist()} for m, pq in per_query.items()})
        logger.info("[%s] %s done in %.1f s", evaluation, bench, out["seconds"][bench])
    return out


def _per_query(result: dict[str, Any]) -> dict[str, PerQuery]:
    import numpy as np

    return {m: PerQuery(np.asarray(v["num"], float), np.asarray(v["den"], float))
            for m, v in result["per_query"].items()}


def differences(per_run: dict[str, dict[int, dict[str, PerQuery]]], a: str, b: str, n_boot: int
                ) -> dict[str, dict[str, Any]]:
    """Paired A - B per metric over the seeds both have, in points of %. Consistency is paired
    on the responses where both runs output both modalities (``n_joint``: their mean count)."""
    seeds = sorted(set(per_run.get(a, {})) & set(per_run.get(b, {})))
    out = {}
    for metric, _ in METRICS:
        if not seeds or not all(metric in per_run[x][s] for x in (a, b) for s in seeds):
            continue
        pairs = [(per_run[a][s][metric], per_run[b][s][metric]) for s in seeds]
        if metric in JOINT_METRICS:
            pairs = [joint(x, y) for x, y in pairs]
        d = paired_difference([x for x, _ in pairs], [y for _, y in pairs], n_boot=n_boot, scale=100.0)
        if metric in JOINT_METRICS:
            d["n_joint"] = round(float(np.mean([x.den.sum() for x, _ in pairs])), 1)
        out[metric] = d
    return out


def analyse(per_run: dict[str, dict[int, dict[str, PerQuery]]], order: list[str], n_boot: int):
    """(summary, differences, claims, printed table) of the finished runs."""
    summary = summarise({e: [per_run[e][s] for s in sorted(per_run[e])] for e in order})
    diffs = {"unimur - fromage": differences(per_run, "unimur", "fromage", n_boot)}
    for e in order:  # the rules' effect, and each ablation's cost, on the same footing
        if e in ("unimur@fromage_rules", "unimur@threshold"):
            diffs[f"{e} - fromage"] = differences(per_run, e, "fromage", n_boot)
        elif e not in ("unimur", "fromage"):
            diffs[f"{e} - unimur"] = differences(per_run, e, "unimur", n_boot)
    return summary, diffs, claims_table(diffs), format_table(summary, diffs["unimur - fromage"], order)


def format_claims(claims: list[dict[str, str]]) -> str:
    lines = ["Claims of the abstract (UniMuR - FROMAGe, points of %; p Holm-adjusted over the rows):"]
    for row in claims:
        n = f" (n={row['n']})" if row["n"] else ""
        lines.append(f"  {row['unimur']:<22} {row['claim'][:60]:<60} {row['difference']:>24}  "
                     f"p_holm {row['p_holm']:>7}  {row['verdict']}{n}")
    return "\n".join(lines)


def format_table(summary: dict, diff: dict, order: list[str]) -> str:
    width = 17
    head = f"{'metric (%)':<40}" + "".join(f"{EVALUATIONS[e].label[:width - 1]:>{width}}" for e in order)
    head += f"{'UniMuR - FROMAGe [95% CI]':>30}"
    lines = [head, "-" * len(head)]
    for metric, label in METRICS:
        cells = []
        for e in order:
            m = summary.get(e, {}).get(metric)
            cells.append("-" if not m or m["mean"] != m["mean"] else f"{m['mean']:.1f} ± {m['std']:.1f}")
        if all(c == "-" for c in cells):
            continue
        d = diff.get(metric)
        cell = fmt_interval(d) if d and not d.get("undefined") else ("undefined" if d else "-")
        lines.append(f"{label:<40}" + "".join(f"{c:>{width}}" for c in cells) + f"{cell:>30}")
    return "\n".join(lines)


def plot(summary: dict, order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [(m, label) for m, label in METRICS if any(m in summary.get(e, {}) for e in order)]
    x = np.arange(len(metrics))
    w = 0.8 / len(order)
    fig, ax = plt.subplots(figsize=(max(10, 0.9 * len(metrics)), 5))
    for i, e in enumerate(order):
        means = [summary.get(e, {}).get(m, {}).get("mean", np.nan) for m, _ in metrics]
        stds = [summary.get(e, {}).get(m, {}).get("std", 0.0) for m, _ in metrics]
        ax.bar(x + (i - (len(order) - 1) / 2) * w, means, w, yerr=stds, capsize=2, label=EVALUATIONS[e].label)
    ax.set_xticks(x, [label for _, label in metrics], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("% (mean over seeds, error bar: std)")
    ax.set_title("UniMuR vs FROMAGe on the demo's synthetic VisDial / MMDialog")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from unimur.data.synthetic.generator import mmdialog_attribute_labels
    from unimur.inference.frozen_pass_memo import FrozenPassMemo
    from unimur.model.backbones import offline as offline_backbones

    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    stages = demo.Stages()
    demo.check_packages(random_init=False)
    with stages("setup: SmolLM2 safetensors cache (first run only)"):
        offline_backbones.smollm2_dir()
    with stages("synthetic data"):
        data = demo.ensure_data(out / "data", args.data_seed, cfg.data_sizes())
        val_sizes = {**cfg.data_sizes(), "n_train": 0, "n_val": 0, "n_visdial": 0,
                     "n_mmdialog": N_VALIDATION["quick" if args.quick else "full"]}
        val_data = demo.ensure_data(out / "data_validation", args.data_seed + 1000, val_sizes)
    meta = json.loads(data["meta"].read_text())
    labels = mmdialog_attribute_labels(data["meta"])
    validation = {"mmdialog_dir": val_data["mmdialog_dir"], "labels": mmdialog_attribute_labels(val_data["meta"])}
    runs, memo = Runs(out, cfg, meta), FrozenPassMemo()
    variants = list(args.variants)
    evaluations = [e for e in EVALUATIONS.values() if e.variant in variants]
    rules_seeds = set(args.seeds[: args.rules_seeds]) if args.rules_seeds is not None else set(args.seeds)
    ablation_seeds = set(args.seeds[: args.ablation_seeds])
    per_run: dict[str, dict[int, dict[str, PerQuery]]] = {}
    raw: dict[str, dict[int, dict[str, Any]]] = {}
    keys: dict[str, Any] = {}
    # UniMuR and FROMAGe on every seed first, then the ablations: an interrupted comparison has
    # what the claims need before the rest
    main_runs = [(v, s) for s in args.seeds for v in variants if v in ("unimur", "fromage")]
    ablation_runs = [(v, s) for s in args.seeds for v in variants if v not in ("unimur", "fromage")
                     and s in ablation_seeds]
    for variant, seed in main_runs + ablation_runs:
        wanted = [e.name for e in evaluations if e.variant == variant
                  and (e.name != "unimur@fromage_rules" or seed in rules_seeds)]
        cached = {e: runs.cached_result(e, seed) for e in wanted}
        model = None
        if any(r is None for r in cached.values()):
            with stages(f"train {variant} seed {seed}"):
                model_dir = runs.model(variant, seed, data)
            model = demo._load(model_dir)
        for e in wanted:
            result = cached[e]
            if result is None:
                with stages(f"evaluate {e} seed {seed}"):
                    result = evaluate(model, e, data, labels, cfg, memo, validation)
                runs.save_result(e, seed, result)
            for bench, k in result["keys"].items():  # every run must rank the same queries
                if keys.setdefault(bench, k) != k:
                    raise RuntimeError(f"{e} seed {seed} evaluated other {bench} queries than earlier runs")
            per_run.setdefault(e, {})[seed] = _per_query(result)
            raw.setdefault(e, {})[seed] = {k: result[k] for k in ("metrics", "seconds", "settings", "threshold",
                                                                   "examples", "contexts_cut") if k in result}
        del model
        logger.info("frozen passes shared so far: %s (prefix memo %.0f MiB)", dict(memo.stats),
                    memo.prefix_bytes / 2**20)

    order = [e.name for e in evaluations if e.name in per_run]
    summary, diffs, claims, table = analyse(per_run, order, args.n_boot)
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n_queries = {bench: len(k) for bench, k in keys.items()}
    report = {
        "config": dataclasses.asdict(cfg), "seeds": list(args.seeds), "data_seed": args.data_seed,
        "variants": variants, "rules_seeds": sorted(rules_seeds), "ablation_seeds": sorted(ablation_seeds),
        "n_boot": args.n_boot, "code_version": runs.code, "eval_settings": EVAL_SETTINGS,
        "provenance": runs.provenance,
        "queries": n_queries, "summary": summary, "differences": diffs, "claims": claims,
        "runs": raw, "stage_seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
        "total_seconds": round(stages.total(), 1), "peak_rss_gib": round(peak_rss_gib, 2),
        "memo": {**dict(memo.stats), "prefix_mib": round(memo.prefix_bytes / 2**20, 1)},
        "torch_threads": torch.get_num_threads(), "table": table,
        "notes": [
            "recipe: unimur_demo/pipeline.py's (frozen SmolLM2-135M + EfficientNet-Lite0 + all-MiniLM-L6-v2, "
            f"l_vm=2) with the captioning pass (l_cap={cfg.l_cap}, concatenated captions p=0.5) and "
            f"{cfg.epochs * cfg.steps_per_epoch} steps of {cfg.batch_size}; the last step's weights",
            "VisDial R@k forces [RET] after the dialogue for both methods (as both papers evaluate it)",
            "MMDialog consistency is the attribute consistency (the offline encoders share no "
            "image-text space, so no CLIP cosine)",
            "intervals: seed variance + query-bootstrap variance, Student's t over seeds "
            "(unimur/evaluation/paired_bootstrap.py), in points of %; verdicts Holm-adjusted over the claims table",
        ],
    }
    results_dir = out / "results"
    (results_dir / "comparison.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(summary, order, results_dir / "comparison.png")
    print("\n" + "=" * 110)
    print(f"UniMuR vs FROMAGe on the demo's synthetic data: seeds {list(args.seeds)}, "
          f"{n_queries.get('visdial', 0)} VisDial dialogues, {n_queries.get('mmdialog', 0)} MMDialog queries "
          f"(pool {cfg.n_negatives + 1})")
    print("mean ± std over seeds; 'UniMuR (F rules)': UniMuR's models answering with FROMAGe's rules "
          "(summed-likelihood text ranking, image only after a generated [RET]); 'UniMuR (threshold)': an "
          "image only above a threshold chosen on validation; last column: paired difference, 95% interval "
          "over seeds and queries")
    print(table)
    print("\n" + format_claims(claims))
    print(f"\nwall time {stages.total() / 60:.1f} min, peak RSS {peak_rss_gib:.2f} GiB, "
          f"{torch.get_num_threads()} torch threads; results: {results_dir}/comparison.json, comparison.png")
    print("=" * 110)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/compare_methods.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="compare_run", help="output folder; default: %(default)s")
    p.add_argument("--quick", action="store_true", help="small sets and 2 seeds: checks the pipeline, not the claims")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds of UniMuR and FROMAGe; default 0 1 2 3 4 (quick: 0 1)")
    p.add_argument("--ablation-seeds", type=int, default=3, metavar="N",
                   help="train the ablations on the first N seeds only; default: %(default)s")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic data seed; default: %(default)s")
    p.add_argument("--variants", nargs="+", default=["unimur", "fromage"], choices=sorted(VARIANTS),
                   help="default: %(default)s; the ablations no_tm no_vm (no_cl) add ~5 min per seed "
                        "each, on the first --ablation-seeds seeds")
    p.add_argument("--rules-seeds", type=int, default=1, metavar="N",
                   help="evaluate UniMuR under FROMAGe's rules (a diagnostic: the rules' effect apart "
                        "from training) on the first N seeds only; default: %(default)s")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates; default: %(default)s")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    for needed in ("unimur", "fromage"):
        if needed not in args.variants:
            p.error(f"--variants must include {needed}: the comparison is UniMuR - FROMAGe")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    demo.setup_logging()
    try:
        run(args)
    except demo.SetupError as e:
        sys.stderr.write(f"\nerror: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
