"""What a GPU run decides at start-up, checked without a GPU (issue 26): the precision against
the GPU's capability, the LLM's storage dtype, the plan --dry-run prints, the collective
timeout, the shared cache folder, autocast in the cache key, and a hot loop that reads no
device value between metric records."""
import datetime
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_gather_grad import free_port

from unimur.commands.train import parse_args
from unimur.errors import UniMuRError, run_cli
from unimur.utils import distributed as dist_utils
from unimur.utils.precision import GPUInfo, check_precision

ROOT = Path(__file__).resolve().parents[1]
V100 = GPUInfo("Tesla V100-SXM2-32GB", (7, 0), 31.7)
A100 = GPUInfo("NVIDIA A100-SXM4-40GB", (8, 0), 39.4)


def test_bf16_on_a_gpu_without_bf16_stops_in_one_line_naming_the_fix():
    with pytest.raises(UniMuRError) as e:
        check_precision("bf16", V100)
    assert "\n" not in str(e.value) and "sm_70" in str(e.value) and "--precision fp16" in str(e.value)
    for precision, gpu in (("fp16", V100), ("fp32", V100), ("bf16", A100), ("bf16", None)):
        check_precision(precision, gpu)  # nothing to refuse


@pytest.mark.parametrize("flags,dtype", [(["--precision", "fp16"], "fp16"), (["--precision", "bf16"], "bf16"),
                                         (["--precision", "fp32"], "fp32"),
                                         (["--precision", "fp16", "--llm-dtype", "fp32"], "fp32")])
def test_the_frozen_llm_follows_the_precision_unless_told(flags, dtype):
    assert parse_args(flags)[1].model.llm_dtype == dtype


def test_dry_run_on_v100s(tmp_path, monkeypatch, capsys):
    from test_trainer import SEED_COMMAND

    import main as main_module
    import unimur.utils.precision

    monkeypatch.setattr(unimur.utils.precision, "detected_gpu", lambda index=0: V100)
    argv = [a.replace("exp_log/", f"{tmp_path}/exp_log/") for a in SEED_COMMAND] + ["--dry-run", "--nprocs", "4"]
    assert run_cli(main_module.main, argv) == 1  # the seed's bf16
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --precision bf16: Tesla V100") and "--precision fp16" in err[0]
    plan = main_module.main([a.replace("bf16", "fp16") for a in argv])
    out = capsys.readouterr().out
    assert "frozen LLM stored in fp16" in out and "Tesla V100-SXM2-32GB, sm_70" in out and "timeout 120 min" in out
    assert "fits" in out and "NOT" not in out
    assert plan["frozen_clip_while_training"] == 0 and plan["frozen_llm"] == pytest.approx(6.658e9 * 2, rel=1e-3)
    assert not (tmp_path / "exp_log").exists()


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    real = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    dist_utils.init("gloo", f"tcp://127.0.0.1:{free_port()}", 1, 0, timeout_min=7)
    try:
        assert seen["timeout"] == datetime.timedelta(minutes=7)
    finally:
        dist.destroy_process_group()
    assert parse_args([])[0].dist_timeout == 120
    with pytest.raises(SystemExit):
        parse_args(["--dist-timeout", "0"])


def _shared_worker(rank, world, port, folders, out):
    from unimur.data.feature_cache import check_shared_folder

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        folder = Path(folders[rank])
        folder.mkdir(parents=True, exist_ok=True)
        check_shared_folder(folder)
        out.put((rank, "ok"))
    except UniMuRError as e:
        out.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def _check_folders(folders) -> dict[int, str]:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_shared_worker, args=(2, free_port(), folders, out), nprocs=2, start_method="spawn", join=True)
    return dict(out.get() for _ in range(2))


def test_a_cache_folder_not_shared_between_ranks_ends_in_one_line(tmp_path):
    assert _check_folders([str(tmp_path / "shared")] * 2) == {0: "ok", 1: "ok"}
    assert not list((tmp_path / "shared").iterdir())  # the probe file is gone
    # two "nodes", each with a local folder of the same name
    results = _check_folders([str(tmp_path / "node0" / "cache"), str(tmp_path / "node1" / "cache")])
    assert all("is not shared by all ranks" in m and "--cache-dir" in m and "\n" not in m for m in results.values())
    assert "rank 1 cannot see" in results[1]


def test_the_encoding_autocast_is_part_of_the_cache_key(tmp_path, caplog):
    from unimur.data.cc3m_sources import read_split
    from unimur.data.feature_cache import load_or_build_feature_cache
    from unimur.data.synthetic.generator import generate
    from unimur.model.backbones.registry import load_encoders

    paths = generate(tmp_path / "syn", seed=0, n_train=6, n_val=2, n_visdial=1, n_mmdialog=1, image_size=32,
                     n_negatives=2)
    rows = read_split("tsv", paths["train_tsv"].parent, paths["image_dir"], "train").rows
    enc = load_encoders("tiny-clip")
    plain = load_or_build_feature_cache(rows, enc, tmp_path / "c", dtype="fp32")
    with caplog.at_level("INFO"):
        mixed = load_or_build_feature_cache(rows, enc, tmp_path / "c", dtype="fp32", autocast="bf16")
    assert "encoding autocast changed" in caplog.text and mixed.metadata["parts"]["autocast"] == "bf16"
    assert plain.key != mixed.key
    # bf16 matmuls: close to the fp32 features, not equal to them
    assert torch.allclose(mixed.image_embed, plain.image_embed, atol=0.05, rtol=0.05)
    assert not torch.equal(mixed.image_embed, plain.image_embed)


def test_the_hot_loop_reads_no_device_value_between_records(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import count_host_syncs

    monkeypatch.setenv("COUNT_SYNCS_DIR", str(tmp_path))
    count_host_syncs.main(["--steps", "4", "--print-freq", "100"])
    # four steps, one record (step 1): its two reads (the summed terms, the logit scale) are the
    # only reads of device values outside transformers' own mask check
    reads = {site: n for site, n in count_host_syncs.counts.items() if "transformers/" not in site}
    assert sorted(reads.values()) == [1, 1], reads
    assert all("trainer.py" in site for site in reads) and any("_reduce_logs" in site for site in reads), reads
