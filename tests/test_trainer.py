"""main.py end to end on tiny backbones and synthetic data (CPU, offline)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main as main_module
from unimur.commands.train import parse_args

ROOT = Path(__file__).resolve().parents[1]

SEED_COMMAND = [
    "--dist-url", "tcp://127.0.0.1:8765", "--dist-backend", "nccl",
    "--multiprocessing-distributed", "--world-size", "1", "--rank", "0",
    "--dataset=cc3m", "--val-dataset=cc3m",
    "--opt-version=facebook/opt-6.7b", "--visual-model=openai/clip-vit-large-patch14",
    "--exp_name=unimur_exp", "--image-dir=image_data/", "--log-base-dir=exp_log/",
    "--batch-size=120", "--val-batch-size=80", "--learning-rate=0.0003", "--precision=bf16", "--print-freq=100",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from unimur.data.synthetic.generator import generate

    out = tmp_path_factory.mktemp("syn")
    return generate(out, seed=0, n_train=96, n_val=32, n_visdial=4, n_mmdialog=4, image_size=32, n_negatives=8)


def tiny_args(paths, run_root, name, *extra):
    return [
        "--opt-version=tiny-opt", "--visual-model=tiny-clip", f"--dataset_dir={paths['train_tsv'].parent}",
        f"--image-dir={paths['image_dir']}", f"--log-base-dir={run_root}", f"--exp_name={name}",
        "--epochs=2", "--steps-per-epoch=3", "--val-steps-per-epoch=1", "--batch-size=8",
        "--val-batch-size=16", "--precision=fp32", "--print-freq=1", "-j", "0", "--seed=3",
        "--lr-warmup-steps=2", "--learning-rate=0.01", *extra,
    ]


def read_metrics(run_dir, split="train"):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def trainable(run_dir, name="ckpt.pth.tar"):
    return torch.load(Path(run_dir) / name, map_location="cpu", weights_only=True)["model"]


def test_seed_command_parses():
    args, cfg = parse_args(SEED_COMMAND)
    assert args.multiprocessing_distributed and args.dist_url == "tcp://127.0.0.1:8765"
    assert (cfg.model.llm, cfg.model.visual_model) == ("facebook/opt-6.7b", "openai/clip-vit-large-patch14")
    assert (cfg.train.batch_size, cfg.train.val_batch_size, cfg.train.learning_rate) == (120, 80, 3e-4)
    assert cfg.train.precision == "bf16" and cfg.model.llm_dtype == "bf16"
    assert cfg.data.image_dir == "image_data/" and cfg.train.exp_name == "unimur_exp"
    _, fromage = parse_args(["--method", "fromage"])
    assert fromage.model.target_proj == "linear" and fromage.train.loss.l_tm == 0


def test_run_folder_and_exact_resume_after_kill(synthetic, tmp_path):
    # uninterrupted reference run, in process
    state = main_module.main(tiny_args(synthetic, tmp_path, "full", "--epochs=3"))
    run = tmp_path / "full"
    assert state.step == 9
    for f in ("config.json", "command.txt", "params.json", "param_count.txt", "git_info.txt",
              "ckpt.pth.tar", "ckpt_best.pth.tar", "metrics.jsonl", "train.log", "run.lock"):
        assert (run / f).is_file(), f
    assert list(run.glob("events.out.tfevents.*"))
    assert json.loads((run / "params.json").read_text())["trainable_total"] > 0
    train = read_metrics(run)
    assert [r["step"] for r in train] == list(range(1, 10))
    assert len(read_metrics(run, "val")) == 4  # before training + after each epoch

    # the same run killed with SIGKILL part-way (checkpoints every step), then resumed
    args = tiny_args(synthetic, tmp_path, "killed", "--epochs=3", "--save-every-steps=1")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_dir = tmp_path / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (killed_dir / "metrics.jsonl").exists() and len(read_metrics(killed_dir)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(killed_dir / "ckpt.pth.tar", weights_only=True)["state"]["step"]
    assert 0 < done < 9, f"kill landed at step {done}: not mid-run"
    # the killed run's lock is left behind, naming it; the kernel released it, so resuming works
    assert (killed_dir / "run.lock").read_text().startswith(f"pid {proc.pid} ")
    state = main_module.main([*args, "--resume=latest"])
    assert state.step == 9
    ref, got = trainable(run), trainable(killed_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert not list(killed_dir.glob(".ckpt*.tmp"))  # no half-written temp files left behind


def test_two_processes_match_one_process_on_the_concatenated_batch(synthetic, tmp_path):
    one = main_module.main(tiny_args(synthetic, tmp_path, "one", "--epochs=1"))
    two = main_module.main(tiny_args(synthetic, tmp_path, "two", "--epochs=1", "--multiprocessing-distributed",
                                     "--nprocs=2", "--dist-backend=gloo", "--dist-url=tcp://127.0.0.1:29533"))
    assert one.step == two.step == 3
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for a, b in zip(m1, m2):
        for k in ("loss", "cap", "vm", "tm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k)
    v1, v2 = read_metrics(tmp_path / "one", "val")[-1], read_metrics(tmp_path / "two", "val")[-1]
    assert v1["loss/loss"] == pytest.approx(v2["loss/loss"], rel=1e-4)
    w1, w2 = trainable(tmp_path / "one"), trainable(tmp_path / "two")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k


def test_torchrun_two_processes_match_one_process(synthetic, tmp_path):
    """The torchrun (env://) launch path: same losses and weights as one process."""
    one = main_module.main(tiny_args(synthetic, tmp_path, "one", "--epochs=1"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "main.py"), *tiny_args(synthetic, tmp_path, "torchrun", "--epochs=1",
                                              "--dist-backend=gloo")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert one.step == 3 and len(read_metrics(tmp_path / "torchrun")) == 3
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "torchrun"), strict=True):
        for k in ("loss", "cap", "vm", "tm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k)
    w1, w2 = trainable(tmp_path / "one"), trainable(tmp_path / "torchrun")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k
    assert "rank 0 of world size 2 (env://" in (tmp_path / "torchrun" / "train.log").read_text()


def test_training_without_the_feature_cache_gives_the_same_losses(synthetic, tmp_path):
    """Cached CLIP features versus CLIP recomputed from the images every step (FROMAGe's way)."""
    cached = main_module.main(tiny_args(synthetic, tmp_path, "cached", "--epochs=1", "--cache-dtype=fp32"))
    fresh = main_module.main(tiny_args(synthetic, tmp_path, "fresh", "--epochs=1", "--no-feature-cache"))
    assert cached.step == fresh.step == 3
    for a, b in zip(read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "fresh")):
        for k in ("loss", "cap", "vm", "tm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    w1, w2 = trainable(tmp_path / "cached"), trainable(tmp_path / "fresh")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6), k
