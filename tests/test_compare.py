"""The comparison's statistics and per-query metrics (unimur/evaluation/paired_bootstrap.py, unimur/evaluation/comparison.py)."""

import os

import numpy as np
import pytest

from unimur.evaluation.comparison import claims_table, joint, summarise, visdial_per_query
from unimur.evaluation.paired_bootstrap import PerQuery, holm, paired_difference, verdict


def _pq(num, den=None):
    num = np.asarray(num, float)
    return PerQuery(num, np.ones_like(num) if den is None else np.asarray(den, float))


def _brute_force_interval(a, b, n_boot, seed):
    """The definition, one replicate at a time with explicit index lists (same random draws)."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    n_q, n_s = a[0].num.size, len(a)
    weights = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=n_boot)
    reps = []  # [B][S]
    for r in range(n_boot):
        idx = [q for q in range(n_q) for _ in range(weights[r, q])]  # the resampled queries
        reps.append([sum(a[s].num[idx]) / sum(a[s].den[idx]) - sum(b[s].num[idx]) / sum(b[s].den[idx])
                     for s in range(n_s)])
    reps = np.array(reps)
    d = [x.value() - y.value() for x, y in zip(a, b)]
    v_mean = np.var(reps.mean(1), ddof=1)
    v_seed = max(0.0, np.var(d, ddof=1) / n_s - (np.mean(np.var(reps, axis=0, ddof=1)) - v_mean) / (n_s - 1))
    var = v_mean + v_seed
    t = stats.t.ppf(0.975, n_s - 1)
    return np.mean(d) - t * np.sqrt(var), np.mean(d) + t * np.sqrt(var)


def test_interval_equals_its_definition():
    rng = np.random.default_rng(3)
    a = [_pq(rng.integers(0, 3, 40), rng.integers(1, 4, 40)) for _ in range(3)]
    b = [_pq(rng.integers(0, 3, 40), rng.integers(1, 4, 40)) for _ in range(3)]
    got = paired_difference(a, b, n_boot=300, seed=7)
    lo, hi = _brute_force_interval(a, b, 300, 7)
    assert got["lo"] == pytest.approx(lo) and got["hi"] == pytest.approx(hi)
    assert got["diff"] == pytest.approx(np.mean([x.value() - y.value() for x, y in zip(a, b)]))
    assert got["n_seeds"] == 3 and got["n_queries"] == 40 and got["undefined"] is None


def test_interval_and_verdicts_on_clear_cases():
    always, never = _pq([1] * 50), _pq([0] * 50)
    d = paired_difference([always] * 3, [never] * 3, n_boot=200, scale=100)
    assert (d["diff"], d["lo"], d["hi"]) == (100.0, 100.0, 100.0) and verdict(d) == "holds"
    d = paired_difference([never] * 3, [always] * 3, n_boot=200)
    assert verdict(d) == "does not hold"
    same = paired_difference([always, never], [always, never], n_boot=200)
    assert (same["lo"], same["hi"]) == (0.0, 0.0) and verdict(same) == "within noise"
    # a difference carried by two queries out of 200 is not separated from zero
    a = _pq([1, 1] + [0] * 198)
    assert verdict(paired_difference([a] * 3, [never.__class__(np.zeros(200), np.ones(200))] * 3)) == "within noise"


def _simulate(rng, true_diff, n_seeds=5, n_q=300):
    """Per-query hits of two methods: query difficulty shared by both, a per-seed training
    effect for each run, and ``true_diff`` added to A's hit probability."""
    difficulty = rng.uniform(0.2, 0.8, n_q)
    runs = []
    for shift in (true_diff, 0.0):
        seeds = rng.normal(0, 0.03, n_seeds)
        runs.append([_pq((rng.random(n_q) < np.clip(difficulty + shift + s, 0, 1)).astype(float)) for s in seeds])
    return runs


def test_interval_covers_a_zero_difference_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered = []
    for i in range(300):
        a, b = _simulate(rng, 0.0)
        d = paired_difference(a, b, n_boot=200, seed=i)
        covered.append(d["lo"] <= 0 <= d["hi"])
    rate = float(np.mean(covered))
    # 95% nominal; 300 simulations: a binomial sd of 1.3 points. t with S-1 degrees of freedom
    # is conservative here (98.4% over 1000 simulations); Welch-Satterthwaite's gave 92.3%
    assert 0.93 <= rate <= 0.997, rate


def test_a_known_difference_is_found():
    rng = np.random.default_rng(1)
    found = [verdict(paired_difference(*_simulate(rng, 0.1), n_boot=200, seed=i)) == "holds" for i in range(100)]
    assert np.mean(found) >= 0.8


def test_no_verdict_when_a_metric_is_undefined():
    ok, none = _pq([1, 0, 1]), _pq([0, 0, 0], [0, 0, 0])  # no query counts: undefined
    d = paired_difference([ok, none, ok], [ok, ok, ok], n_boot=100)
    assert d["undefined"].startswith("the metric is undefined") and verdict(d).startswith("no verdict")
    # a ratio defined on 2 queries of 300: most query draws miss both, so no interval is given
    rare = _pq(np.r_[[1.0, 0.0], np.zeros(298)], np.r_[[1.0, 1.0], np.zeros(298)])
    d = paired_difference([rare] * 3, [rare] * 3, n_boot=200)
    assert d["n_undefined"] > 2 and "replicates" in d["undefined"]
    assert verdict(paired_difference([ok], [ok])).startswith("no verdict: one seed")


def test_holm_adjusts_in_order_and_keeps_nan_out():
    adjusted = holm([0.01, 0.04, float("nan"), 0.03])
    assert adjusted[0] == pytest.approx(0.03) and adjusted[3] == pytest.approx(0.06)
    assert adjusted[1] == pytest.approx(0.06) and np.isnan(adjusted[2])
    assert verdict({"diff": 1.0, "p": 0.01, "p_holm": 0.06}, p_key="p_holm") == "within noise"
    assert verdict({"diff": -1.0, "p": 0.01}) == "does not hold"


def test_consistency_is_paired_on_the_responses_where_both_output_both():
    a = _pq([1, 0, 1, 0], [1, 1, 1, 0])
    b = _pq([0, 0, 0, 1], [0, 1, 1, 1])
    ja, jb = joint(a, b)
    assert ja.den.tolist() == jb.den.tolist() == [0, 1, 1, 0]
    assert (ja.value(), jb.value()) == (0.5, 0.0)


def test_visdial_per_query_and_summary():
    res = {"examples": [{"gt_images": [f"img{i}"], "gt_rank": r} for i, r in enumerate([1, 3, 7, 20])],
           "counts": {"dialogues_evaluated": 4},
           "metrics": {"dialogue_to_image": {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}}}
    keys, pq = visdial_per_query(res)
    assert keys == ["img0", "img1", "img2", "img3"]
    summary = summarise({"m": [pq, pq]})
    assert summary["m"]["visdial/dialogue_to_image/R@10"] == {"mean": 75.0, "std": 0.0, "values": [75.0, 75.0]}
    d = {"diff": 1.0, "lo": 0.5, "hi": 2.0, "p": 0.001}
    rows = claims_table({"unimur - fromage": {"visdial/dialogue_to_image/R@1": d}})
    assert rows[4]["verdict"] == "holds" and rows[0]["verdict"] == "not measured"
    assert len(rows) == 8 and rows[5]["unimur"] == "UniMuR (threshold)"


def _compare_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"
    spec = importlib.util.spec_from_file_location("compare_methods", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluations_give_per_query_arrays_that_match_their_results(tmp_path, tiny_model):
    """The driver's evaluation on a real (tiny) model: UniMuR's rules and FROMAGe's on one set;
    `evaluate` itself raises if a per-query array disagrees with the evaluation's figure."""
    import dataclasses

    from unimur.data.synthetic import generator as synthetic
    from unimur.inference.frozen_pass_memo import FrozenPassMemo

    cm = _compare_module()
    data = synthetic.generate(tmp_path / "d", 0, n_train=0, n_val=0, n_visdial=5, n_mmdialog=6,
                              n_negatives=4, image_size=32)
    labels = synthetic.mmdialog_attribute_labels(data["meta"])
    cfg = dataclasses.replace(cm.QUICK, n_negatives=4, eval_batch_size=4)
    memo = FrozenPassMemo()
    mine = cm.evaluate(tiny_model, "unimur", data, labels, cfg, memo)
    rules = cm.evaluate(tiny_model, "unimur@fromage_rules", data, labels, cfg, memo)
    assert memo.stats["images_hit"] >= 1  # the second evaluation reused the frozen image features
    assert "visdial" in mine["metrics"] and "visdial" not in rules["metrics"]
    assert mine["keys"]["mmdialog"] == rules["keys"]["mmdialog"]
    assert rules["settings"]["mmdialog"]["image_rule"] == "ret-token"
    n = len(mine["keys"]["mmdialog"])
    assert n == 6 and sum(mine["per_query"]["mmdialog/image_retrieval_rate"]["num"]) == n  # always both
    per_run = {"unimur": {0: cm._per_query(mine)}, "fromage": {0: cm._per_query(rules)}}
    diffs = cm.differences(per_run, "unimur", "fromage", n_boot=50)
    assert diffs["mmdialog/image_retrieval_rate"]["diff"] == pytest.approx(
        100.0 * (1 - sum(rules["per_query"]["mmdialog/image_retrieval_rate"]["num"]) / n))
    assert "visdial/dialogue_to_image/R@1" not in diffs  # only where both runs have it
    # the whole summary on two "seeds" of each: every claim row judged or refused with a reason
    per_run = {e: {s: cm._per_query(r) for s in (0, 1)} for e, r in (("unimur", mine), ("fromage", rules))}
    summary, diffs, claims, table = cm.analyse(per_run, ["unimur", "fromage"], n_boot=50)
    assert len(claims) == 8 and "MMDialog image output F1" in table
    assert all(row["verdict"].startswith(("holds", "does not hold", "within noise", "no verdict", "not measured"))
               for row in claims)
    assert "p_holm" in cm.format_claims(claims)
    cm.plot(summary, ["unimur", "fromage"], tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("UNIMUR_SLOW_TESTS"), reason="set UNIMUR_SLOW_TESTS=1 (~4 min)")
def test_quick_comparison_end_to_end(tmp_path):
    """`python benchmarks/compare_methods.py --quick`: every run trained, evaluated and summarised,
    then a second invocation reuses every finished run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from unimur_demo.pipeline import DEMO_MODULES, missing_modules

    if missing_modules(DEMO_MODULES):
        pytest.skip("the demo weight packages are not installed")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"
    cmd = [sys.executable, str(script), "--quick", "--out", str(tmp_path / "cmp"), "--n-boot", "200"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "cmp" / "results" / "comparison.json").read_text())
    assert len(report["claims"]) == 8 and all(
        row["verdict"].startswith(("holds", "does not hold", "within noise", "no verdict")) for row in report["claims"])
    assert set(report["summary"]) == {"unimur", "unimur@threshold", "fromage", "unimur@fromage_rules"}
    assert set(report["provenance"].values()) == {"computed"}
    assert (tmp_path / "cmp" / "results" / "comparison.png").stat().st_size > 10_000
    again = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    assert "=== train" not in again.stderr  # resumed: nothing trained twice
    again_report = json.loads((tmp_path / "cmp" / "results" / "comparison.json").read_text())
    assert set(again_report["provenance"].values()) == {"reused"}
