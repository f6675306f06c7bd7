"""FROMAGe's flags as FROMAGe means them; flags that would do nothing are refused."""
import pytest
from test_trainer import read_metrics, tiny_args

import main as main_module
from unimur.commands.train import parse_args
from unimur.train.sampling import GlobalBatchSampler


def test_ret_loss_scale_scales_lm_and_contrastive_in_fromage_mode():
    _, fromage = parse_args(["--method", "fromage", "--ret-loss-scale", "0.5"])
    assert (fromage.train.loss.l_vm, fromage.train.loss.l_lm) == (0.5, 0.5)
    _, unimur = parse_args(["--ret-loss-scale", "0.5"])
    assert (unimur.train.loss.l_vm, unimur.train.loss.l_tm, unimur.train.loss.l_lm) == (0.5, 1.0, 0.0)
    _, explicit = parse_args(["--method", "fromage", "--ret-loss-scale", "0.5", "--l-lm", "2"])
    assert (explicit.train.loss.l_vm, explicit.train.loss.l_lm) == (0.5, 2.0)


@pytest.mark.parametrize("argv,reason", [
    (["--shared-emb-dim", "128"], "--shared-emb-dim 128 has no effect with --target-proj none"),
    (["--method", "fromage", "--l-tm", "1"], "no text"),
    (["--no-feature-cache", "--cache-dir", "x"], "--cache-dir has no effect"),
    (["--no-feature-cache", "--cache-dtype", "fp32"], "--cache-dtype has no effect"),
    (["--no-feature-cache", "--cache-verify"], "--cache-verify has no effect"),
    (["--nprocs", "2"], "--nprocs has no effect"),
    (["--val-steps-per-epoch", "0"], "val_steps_per_epoch=0"),
])
def test_flags_without_effect_are_refused_in_one_line(argv, reason, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last and reason in last


def test_dataset_format_and_cache_flags_reach_the_config():
    _, cfg = parse_args([])
    assert (cfg.data.dataset_format, cfg.data.cache_dtype, cfg.data.cache_verify) == ("tsv", None, False)
    _, cfg = parse_args(["--dataset-format", "wds", "--cache-dtype", "fp32", "--cache-verify"])
    assert (cfg.data.dataset_format, cfg.data.cache_dtype, cfg.data.cache_verify) == ("wds", "fp32", True)


def test_shared_emb_dim_is_accepted_where_it_acts():
    _, cfg = parse_args(["--target-proj", "linear", "--shared-emb-dim", "128"])
    assert cfg.model.shared_emb_dim == 128
    _, fromage = parse_args(["--method", "fromage", "--shared-emb-dim", "64"])
    assert fromage.model.shared_emb_dim == 64
    _, default = parse_args(["--method", "fromage"])
    assert default.model.shared_emb_dim == 256


@pytest.mark.parametrize("n,gb,world", [(7, 4, 2), (10, 4, 2), (9, 3, 3), (13, 6, 3)])
def test_whole_set_sampler_covers_every_row_once_in_rank_order(n, gb, world):
    ranks = [GlobalBatchSampler(n, gb, rank=r, world_size=world, shuffle=False, drop_last=False)
             for r in range(world)]
    batches = ranks[0].batches_per_pass
    seen = [i for b in range(batches) for s in ranks for i in s.local_indices(b)]
    kept = ranks[0].n_used
    assert seen == list(range(kept))  # rank-order concatenation = the global batch
    assert n - kept == (n % gb if 0 < n % gb < world else 0)  # only rows some rank cannot share
    for b in range(batches):
        assert all(len(s.local_indices(b)) > 0 for s in ranks)
    full = GlobalBatchSampler(n, gb, rank=0, world_size=world, shuffle=False)
    assert [full.local_indices(b) for b in range(full.batches_per_pass)] == \
        [ranks[0].local_indices(b) for b in range(full.batches_per_pass)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from unimur.data.synthetic.generator import generate

    return generate(tmp_path_factory.mktemp("syn"), seed=0, n_train=96, n_val=32, n_visdial=4, n_mmdialog=4,
                    image_size=32, n_negatives=8)


def test_val_steps_minus_one_validates_the_whole_set(synthetic, tmp_path):
    # 32 validation rows, batches of 12: 12 + 12 + the last 8
    main_module.main(tiny_args(synthetic, tmp_path, "all", "--epochs=1", "--steps-per-epoch=1",
                               "--val-steps-per-epoch=-1", "--val-batch-size=12"))
    assert [r["pairs"] for r in read_metrics(tmp_path / "all", "val")] == [32, 32]
