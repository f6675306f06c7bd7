"""Training's clear failures and its run folder: one `error: ...` line (also in train.log when the
folder exists), no run folder before the inputs are checked, nothing of an earlier run lost, one
trainer per folder, and the run's record (param_count.txt, git_info.txt). CPU, offline."""
import argparse
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as main_module
from unimur.commands.prune import main as prune_main
from unimur.errors import BackboneLoadError, CheckpointWriteError, RunFolderError, explain_backbone_errors, run_cli
from unimur.train import checkpoint as ckpt_module
from unimur.train.checkpoint import CheckpointFormatError, load_checkpoint, save_checkpoint
from unimur.train.run_folder import RunLock, check_not_locked, git_info, param_count_table

ROOT = Path(__file__).resolve().parents[1]
FIXES = {"llm": "pass --opt-version /path", "visual": "pass --visual-model NAME:/path"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from unimur.data.synthetic.generator import generate

    out = tmp_path_factory.mktemp("syn")
    return generate(out, seed=0, n_train=16, n_val=8, n_visdial=0, n_mmdialog=0, image_size=32,
                    n_negatives=1)


def args_for(data, run_root, name, *extra, dataset_dir=None):
    return ["--opt-version=tiny-opt", "--visual-model=tiny-clip",
            f"--dataset_dir={dataset_dir or data['train_tsv'].parent}", f"--image-dir={data['image_dir']}",
            f"--log-base-dir={run_root}", f"--exp_name={name}", "--epochs=1", "--steps-per-epoch=2",
            "--val-steps-per-epoch=1", "--batch-size=4", "--val-batch-size=4", "--precision=fp32",
            "-j", "0", "--seed=1", "--cache-dir", str(run_root / "cache"), *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err
    return errors[0]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Training inputs: one line, no run folder
# ----------------------------------------------------------------------------------------------


def test_bad_training_inputs_are_one_line_and_create_no_run_folder(data, tmp_path, capsys, monkeypatch):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for split in ("train", "val"):
        rows = data[f"{split}_tsv"].read_text().splitlines()
        flipped = ["\t".join(reversed(r.split("\t"))) for r in rows]  # header: image<TAB>caption
        (swapped / f"cc3m_{split}.tsv").write_text("\n".join(flipped) + "\n")
    runs = tmp_path / "runs"
    assert run_cli(main_module.main, args_for(data, runs, "a", dataset_dir=swapped)) == 1
    line = one_error_line(capsys)
    assert "cc3m_train.tsv: first line must be the header 'caption\\timage'" in line
    assert "found 'image\\tcaption'" in line
    assert run_cli(main_module.main, args_for(data, runs, "b", dataset_dir=tmp_path / "nowhere")) == 1
    assert one_error_line(capsys).startswith("error: caption TSV not found: ")
    assert not runs.exists()  # no run folder, not even the log base

    monkeypatch.setenv("UNIMUR_TRACEBACK", "1")  # the traceback on request
    with pytest.raises(FileNotFoundError):
        run_cli(main_module.main, args_for(data, runs, "b", dataset_dir=tmp_path / "nowhere"))


def test_error_goes_to_the_train_log_of_an_existing_run_folder(data, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "train.log").write_text("earlier line\n")
    (run / "ckpt.pth.tar").write_bytes(b"PK\x03\x04 truncated")
    assert run_cli(main_module.main, args_for(data, tmp_path / "runs", "r", "--resume=latest")) == 1
    line = one_error_line(capsys)
    assert "is truncated or corrupt" in line and "ckpt.pth.tar" in line
    log = (run / "train.log").read_text().splitlines()
    assert log[0] == "earlier line" and log[-1].endswith(line)  # appended, nothing else touched


def test_hub_id_neither_cached_nor_reachable_is_one_line(data, tmp_path, capsys):
    # conftest switches the hub off (HF_HUB_OFFLINE=1); the id is not in any cache
    runs = tmp_path / "runs"
    argv = args_for(data, runs, "hub", "--opt-version=unimur-tests/no-such-llm")
    assert run_cli(main_module.main, argv) == 1
    line = one_error_line(capsys)
    assert "cannot load the frozen LLM (and its tokenizer) 'unimur-tests/no-such-llm'" in line
    assert "HF_HUB_OFFLINE=1" in line and "--opt-version /path/to/folder" in line
    assert not runs.exists()
    assert run_cli(main_module.main, [*argv[:-1], "--opt-version=/no/such/folder"]) == 1
    assert "no such local folder (/no/such/folder)" in one_error_line(capsys)


def test_clip_download_failure_names_the_model_and_the_fix(monkeypatch):
    import open_clip

    from unimur.model.backbones.registry import load_encoders

    def offline(*a, **k):  # what open_clip raises when the weights are neither cached nor reachable
        raise RuntimeError("Failed to download weights for tag 'openai': Failed to download file. More text")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(BackboneLoadError) as e, explain_backbone_errors("tiny-opt", "ViT-B-32:openai", FIXES):
        load_encoders("ViT-B-32:openai")
    msg = str(e.value)
    assert msg.startswith("cannot load the frozen CLIP model 'ViT-B-32:openai': it is not in the local cache")
    assert "[RuntimeError: Failed to download weights for tag 'openai': Failed to download file]" in msg
    assert msg.endswith("pass --visual-model NAME:/path") and "\n" not in msg
    # errors from elsewhere pass through untouched
    with pytest.raises(FileNotFoundError), explain_backbone_errors("a", "b", FIXES):
        open(Path("/no/such/file"))


def test_spawned_workers_report_one_line(data, tmp_path, capsys):
    argv = args_for(data, tmp_path / "runs", "mp", "--opt-version=unimur-tests/no-such-llm",
                    "--multiprocessing-distributed", "--nprocs=1", "--dist-backend=gloo",
                    "--dist-url=tcp://127.0.0.1:29541")
    assert run_cli(main_module.main, argv) == 1
    assert "cannot load the frozen LLM (and its tokenizer) 'unimur-tests/no-such-llm'" in one_error_line(capsys)


# ----------------------------------------------------------------------------------------------
# Checkpoints that are not UniMuR training checkpoints: named, never unpickled
# ----------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this would create a marker file: proof of whether a loader ran code."""

    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def fromage_state():
    return {"module.model.visual_embeddings.weight": torch.zeros(4, 4),
            "module.model.text_hidden_fcs.0.0.weight": torch.zeros(2, 4),
            "module.model.logit_scale": torch.tensor(2.0)}


@pytest.fixture
def odd_checkpoints(tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    RunsCode.marker = str(tmp_path / "code_ran")
    torch.save({"args": argparse.Namespace(lr=1), "hook": RunsCode(), "state_dict": {}}, d / "pickled.pth.tar")
    torch.save({"epoch": 3, "best_acc1": 0.5, "state_dict": fromage_state(), "optimizer": {},
                "scheduler": {}}, d / "fromage.pth.tar")  # FROMAGe main.py's layout
    torch.save({"args": argparse.Namespace(lr=1), "state_dict": fromage_state()}, d / "fromage_pickled.pth.tar")
    whole = (d / "fromage.pth.tar").read_bytes()
    (d / "truncated.pth.tar").write_bytes(whole[: len(whole) // 2])
    (d / "empty.pth.tar").write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, d / "plain_state_dict.pth.tar")
    return d


EXPECTED_MESSAGES = {
    "pickled": r"holds pickled Python objects \(argparse.Namespace\), not only tensors.*not loaded",
    "fromage": r"is a FROMAGe checkpoint .*convert it with `python unimur/commands/convert_fromage.py",
    "fromage_pickled": r"is a FROMAGe checkpoint that also holds pickled Python objects \(argparse.Namespace\)"
                       r".*convert_fromage.py",
    "truncated": r"is truncated or corrupt \(\d+ bytes; PytorchStreamReader failed reading zip archive",
    "empty": r"is empty \(0 bytes\)",
    "plain_state_dict": r"is not a UniMuR training checkpoint \(a dict with keys \['w'\]",
}


def test_odd_checkpoints_are_named_and_never_unpickled(odd_checkpoints, tmp_path, capsys):
    for name, pattern in EXPECTED_MESSAGES.items():
        path = odd_checkpoints / f"{name}.pth.tar"
        with pytest.raises(CheckpointFormatError, match=pattern):
            load_checkpoint(path)
        assert run_cli(prune_main, ["--ckpt", str(path), "--output", str(tmp_path / "out")]) == 1
        line = one_error_line(capsys)
        assert line.startswith(f"error: {path} ") and "\n" not in line
    assert not (tmp_path / "code_ran").exists() and not (tmp_path / "out").exists()


def test_resume_from_a_fromage_checkpoint_is_one_line(data, odd_checkpoints, tmp_path, capsys):
    argv = args_for(data, tmp_path / "runs", "r", f"--resume={odd_checkpoints / 'fromage.pth.tar'}")
    assert run_cli(main_module.main, argv) == 1
    assert "is a FROMAGe checkpoint" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# A checkpoint that cannot be written (full disk)
# ----------------------------------------------------------------------------------------------


def full_disk_after(monkeypatch, n_ok: int):
    """torch.save in checkpoint.py writes ``n_ok`` files, then fails half-way like a full disk."""
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) > n_ok:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_module.torch, "save", save)


def test_checkpoint_write_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint({"config": {}, "model": {"w": torch.ones(2)}}, path)
    before = sha(path)
    full_disk_after(monkeypatch, 0)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint({"config": {}, "model": {"w": torch.zeros(2)}}, path, previous_step=6)
    assert str(e.value) == (f"could not write checkpoint {path}: No space left on device; the last good "
                            f"checkpoint ckpt.pth.tar (step 6) is intact; free space on that disk and "
                            f"continue with --resume latest")
    assert sha(path) == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pth.tar"]
    with pytest.raises(CheckpointWriteError, match="no earlier ckpt_best.pth.tar existed"):
        save_checkpoint({}, tmp_path / "ckpt_best.pth.tar")


def test_full_disk_during_training_is_one_line_in_console_and_train_log(data, tmp_path, capsys, monkeypatch):
    # epoch 1 writes ckpt.pth.tar and ckpt_best.pth.tar; epoch 2's ckpt.pth.tar hits a full disk
    full_disk_after(monkeypatch, 2)
    argv = args_for(data, tmp_path / "runs", "full", "--epochs=2", "--steps-per-epoch=1")
    assert run_cli(main_module.main, argv) == 1
    line = one_error_line(capsys)
    run = tmp_path / "runs" / "full"
    assert line == (f"error: could not write checkpoint {run / 'ckpt.pth.tar'}: No space left on device; "
                    f"the last good checkpoint ckpt.pth.tar (step 1) is intact; free space on that disk "
                    f"and continue with --resume latest")
    assert torch.load(run / "ckpt.pth.tar", weights_only=True)["state"]["step"] == 1
    assert (run / "train.log").read_text().splitlines()[-1].endswith(line)
    assert not list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------
# The run folder: refusal, --overwrite, the lock, the record
# ----------------------------------------------------------------------------------------------


def test_new_run_refuses_a_folder_with_checkpoints_unless_overwrite(data, tmp_path, capsys):
    runs = tmp_path / "runs"
    main_module.main(args_for(data, runs, "exp"))
    run = runs / "exp"
    for f in ("config.json", "command.txt", "params.json", "param_count.txt", "git_info.txt",
              "ckpt.pth.tar", "ckpt_best.pth.tar", "metrics.jsonl", "train.log", "run.lock"):
        assert (run / f).is_file(), f
    best, log = sha(run / "ckpt_best.pth.tar"), (run / "train.log").read_text()
    assert "trainable" in (run / "param_count.txt").read_text()

    assert run_cli(main_module.main, args_for(data, runs, "exp", "--seed=2")) == 1
    assert one_error_line(capsys) == (
        f"error: {run} already holds checkpoints of an earlier run (ckpt.pth.tar, ckpt_best.pth.tar); "
        f"pass --resume latest to continue it, another --exp_name to start a new run, or --overwrite "
        f"to replace it")
    assert sha(run / "ckpt_best.pth.tar") == best and (run / "train.log").read_text() == log

    assert run_cli(main_module.main, args_for(data, runs, "exp", "--overwrite", "--resume=latest")) == 1
    assert "pass one of them" in one_error_line(capsys)

    with open(run / "train.log", "a") as f:
        f.write("a line of the earlier run\n")
    main_module.main(args_for(data, runs, "exp", "--seed=2", "--overwrite"))
    assert sha(run / "ckpt_best.pth.tar") != best
    new_log = (run / "train.log").read_text()
    assert "a line of the earlier run" not in new_log and "--overwrite: removed the earlier run's" in new_log
    assert len([line for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"val"' in line]) == 2  # the new run's validations only


def hold_lock_in_subprocess(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from unimur.train.run_folder import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = hold_lock_in_subprocess(run)
    try:
        with pytest.raises(RunFolderError, match=rf"in use by another trainer \(pid {proc.pid} on "):
            RunLock(run).acquire()
        with pytest.raises(RunFolderError, match=rf"pid {proc.pid}"):
            check_not_locked(run)
    finally:
        proc.kill()  # SIGKILL: no chance to release anything
        proc.wait()
    check_not_locked(run)  # the kernel dropped the lock with the process
    lock = RunLock(run)
    lock.acquire()
    assert f"pid {os.getpid()} " in (run / "run.lock").read_text()
    with pytest.raises(RunFolderError, match=rf"pid {os.getpid()}"):
        RunLock(run).acquire()  # a second trainer in the same process is refused as well
    lock.release()
    check_not_locked(run)


def test_second_trainer_on_a_locked_run_folder_refuses(data, tmp_path, capsys):
    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    proc = hold_lock_in_subprocess(run)
    try:
        for extra in ([], ["--resume=latest"]):
            assert run_cli(main_module.main, args_for(data, tmp_path / "runs", "busy", *extra)) == 1
            line = one_error_line(capsys)
            assert f"is in use by another trainer (pid {proc.pid} on " in line and "another --exp_name" in line
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # nothing written, no log line
    finally:
        proc.kill()
        proc.wait()


def test_param_count_table(tiny_model):
    table = param_count_table(tiny_model)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:-1]}
    n = lambda s: int(s.replace(",", ""))  # noqa: E731
    trainable = sum(p.numel() for _, p in tiny_model.trainable_named_parameters())
    frozen = sum(p.numel() for p in tiny_model.parameters() if not p.requires_grad)
    assert n(rows["total"][1]) == trainable and n(rows["total"][2]) == frozen
    assert n(rows["cap_mapping"][1]) == tiny_model.cap_mapping.weight.numel() + tiny_model.cap_mapping.bias.numel()
    assert n(rows["llm"][1]) == 0 and n(rows["llm"][2]) == sum(p.numel() for p in tiny_model.llm.parameters())
    assert list(rows)[:2] != ["encoders", "llm"]  # trainable modules first


def test_git_info(tmp_path):
    assert git_info(tmp_path) == f"not a git checkout ({tmp_path})\n"
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q", "-b", "main")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    clean = git_info(repo)
    assert f"commit: {commit}\nbranch: main\nstate: clean\n" in clean and "diff stat" not in clean
    (repo / "a.py").write_text("x = 2\ny = 3\n")
    (repo / "new.txt").write_text("?")
    dirty = git_info(repo)
    assert "state: dirty" in dirty and "untracked files: 1" in dirty
    assert "a.py | 3 ++-" in dirty and "1 file changed, 2 insertions(+), 1 deletion(-)" in dirty
