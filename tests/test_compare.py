"""The comparison's statistics and per-query metrics (unimur/compare_stats.py, unimur/comparison.py)."""

import math
import os

import numpy as np
import pytest

from unimur.compare_stats import PerQuery, mean_std, paired_difference, verdict
from unimur.comparison import claims_table, mmdialog_per_query, summarise, visdial_per_query
from unimur.synthetic import AttributeLabels


def _pq(num, den=None):
    num = np.asarray(num, float)
    return PerQuery(num, np.ones_like(num) if den is None else np.asarray(den, float))


def _brute_force_bootstrap(a, b, n_boot, seed):
    """The definition, one replicate at a time with explicit index lists (same random draws)."""
    rng = np.random.default_rng(seed)
    n_q, n_s = a[0].num.size, len(a)
    weights = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=n_boot)
    picks = rng.integers(0, n_s, size=(n_boot, n_s))
    reps = []
    for r in range(n_boot):
        idx = [q for q in range(n_q) for _ in range(weights[r, q])]  # the resampled queries
        diffs = []
        for s in picks[r]:
            ma = sum(a[s].num[idx]) / sum(a[s].den[idx])
            mb = sum(b[s].num[idx]) / sum(b[s].den[idx])
            diffs.append(ma - mb)
        reps.append(sum(diffs) / len(diffs))
    return np.percentile(reps, [2.5, 97.5])


def test_paired_bootstrap_equals_its_definition():
    rng = np.random.default_rng(3)
    a = [_pq(rng.integers(0, 3, 40), rng.integers(1, 4, 40)) for _ in range(3)]
    b = [_pq(rng.integers(0, 3, 40), rng.integers(1, 4, 40)) for _ in range(3)]
    got = paired_difference(a, b, n_boot=300, seed=7)
    lo, hi = _brute_force_bootstrap(a, b, 300, 7)
    assert got["lo"] == pytest.approx(lo) and got["hi"] == pytest.approx(hi)
    assert got["diff"] == pytest.approx(np.mean([x.value() - y.value() for x, y in zip(a, b)]))
    assert got["n_seeds"] == 3 and got["n_queries"] == 40


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
    assert verdict({"lo": -2.0, "hi": -1.0}, higher_is_better=False) == "holds"


def test_paired_difference_refuses_unpaired_runs():
    with pytest.raises(ValueError, match="same number"):
        paired_difference([_pq([1, 0])], [_pq([1, 0])] * 2)
    with pytest.raises(ValueError, match="same queries"):
        paired_difference([_pq([1, 0])], [_pq([1, 0, 1])])


def test_mean_std_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(x) for x in mean_std([float("nan")]))


def _mmdialog_results(examples, metrics):
    return {"examples": examples, "metrics": metrics, "counts": {"queries_evaluated": len(examples)}}


def _ex(cid, image_ranks, text_ranks, shown, top_image, top_text):
    return {"conversation_id": cid, "turn_index": 3, "image_ranks": image_ranks, "text_ranks": text_ranks,
            "image_output": shown, "retrieved_images": [{"id": top_image}],
            "retrieved_texts": [{"text": top_text}]}


LABELS = AttributeLabels(media={"red_star": frozenset({("red", "star")}), "blue_circle": frozenset({("blue", "circle")})},
                         texts={"a red star": ("red", "star"), "a blue circle": ("blue", "circle")})


def test_mmdialog_per_query_by_hand():
    examples = [
        _ex(1, [1], [1], True, "red_star", "a red star"),       # both hit, consistent
        _ex(2, [1], [4], False, "red_star", "a red star"),      # image hit but not output: overall miss
        _ex(3, [2, 12], [1], True, "blue_circle", "a red star"),  # inconsistent
    ]
    # by hand, overall over 7 elements: R@1 q1 2 hits, q2 0 (image not output), q3 1 (the text);
    # R@5 adds q2's text (rank 4) and q3's first image (rank 2)
    metrics = {"image": {"R@1": 50.0, "R@5": 75.0, "R@10": 75.0},
               "text": {"R@1": 200 / 3, "R@5": 100.0, "R@10": 100.0},
               "overall": {"R@1": 300 / 7, "R@5": 500 / 7, "R@10": 500 / 7},
               "image_retrieval_rate": 2 / 3, "attribute_consistency": 0.5}
    keys, pq = mmdialog_per_query(_mmdialog_results(examples, metrics), LABELS)
    assert keys == [(1, 3), (2, 3), (3, 3)]
    assert pq["mmdialog/overall/R@1"].num.tolist() == [2, 0, 1]
    assert pq["mmdialog/overall/R@1"].den.tolist() == [2, 2, 3]
    assert pq["mmdialog/overall/R@5"].num.tolist() == [2, 1, 2]
    assert pq["mmdialog/attribute_consistency"].num.tolist() == [1, 0, 0]
    assert pq["mmdialog/attribute_consistency"].den.tolist() == [1, 0, 1]
    # a per-query reading that disagrees with what the evaluation reported is an error
    metrics["overall"]["R@1"] = 40.0
    with pytest.raises(RuntimeError, match="overall R@1"):
        mmdialog_per_query(_mmdialog_results(examples, metrics), LABELS)


def test_results_without_every_query_are_refused():
    res = _mmdialog_results([_ex(1, [1], [1], True, "red_star", "a red star")], {})
    res["counts"]["queries_evaluated"] = 2
    with pytest.raises(ValueError, match="one example per query"):
        mmdialog_per_query(res)


def test_visdial_per_query_and_summary():
    res = {"examples": [{"gt_images": [f"img{i}"], "gt_rank": r} for i, r in enumerate([1, 3, 7, 20])],
           "counts": {"dialogues_evaluated": 4},
           "metrics": {"dialogue_to_image": {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}}}
    keys, pq = visdial_per_query(res)
    assert keys == ["img0", "img1", "img2", "img3"]
    summary = summarise({"m": [pq, pq]})
    assert summary["m"]["visdial/dialogue_to_image/R@10"] == {"mean": 75.0, "std": 0.0, "values": [75.0, 75.0]}
    rows = claims_table({"visdial/dialogue_to_image/R@1": {"diff": 1.0, "lo": 0.5, "hi": 2.0}})
    assert rows[-1]["verdict"] == "holds" and rows[0]["verdict"] == "not measured"


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

    from unimur import synthetic
    from unimur.shared_passes import FrozenPassMemo

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


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("UNIMUR_SLOW_TESTS"), reason="set UNIMUR_SLOW_TESTS=1 (~4 min)")
def test_quick_comparison_end_to_end(tmp_path):
    """`python benchmarks/compare_methods.py --quick`: every run trained, evaluated and summarised,
    then a second invocation reuses every finished run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from unimur.demo import DEMO_MODULES, missing_modules

    if missing_modules(DEMO_MODULES):
        pytest.skip("the demo weight packages are not installed")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"
    cmd = [sys.executable, str(script), "--quick", "--out", str(tmp_path / "cmp"), "--n-boot", "200"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "cmp" / "results" / "comparison.json").read_text())
    assert [row["verdict"] in ("holds", "does not hold", "within noise") for row in report["claims"]] == [True] * 5
    assert set(report["summary"]) == {"unimur", "fromage", "unimur@fromage_rules", "no_tm", "no_vm"}
    assert (tmp_path / "cmp" / "results" / "comparison.png").stat().st_size > 10_000
    again = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    assert "=== train" not in again.stderr  # resumed: nothing trained twice
