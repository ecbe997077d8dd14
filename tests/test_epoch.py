"""pipeline.epoch: the facts both loaders share (the seed rule, the rank's shards)."""

import itertools

import pytest

from pipeline.epoch import Plan, derive_seed


def test_seeds_never_collide_by_arithmetic():
    assert derive_seed("dali", 0, 1000) != derive_seed("dali", 1, 0)  # seed * 1000 + rank made these equal
    seeds = {derive_seed("torch-loader", s, r, e) for s, r, e in itertools.product(range(20), range(1100), range(3))}
    assert len(seeds) == 20 * 1100 * 3
    assert derive_seed("dali", 3, 1) != derive_seed("trainer", 3, 1)  # two purposes, two streams


def test_seeds_fit_every_consumer_and_repeat():
    values = [derive_seed(p, s, *k) for p in ("dali", "stream") for s in (0, -1, 2**40) for k in ((), (0,), (7, 9))]
    assert all(0 <= v < 2**63 for v in values)  # DALI, numpy, random and torch.manual_seed take it
    assert derive_seed("dali", 5, 2) == derive_seed("dali", 5, 2)


def plan(counts, rank, world):
    return Plan(tars=[f"{k}.tar" for k in range(len(counts))], indexes=[], counts=counts, samples=sum(counts),
                rank=rank, world_size=world, batch_size=1, train=True)


def test_a_rank_reads_the_shards_that_hold_its_part():
    assert [plan([10, 10, 10], r, 3).part_shards for r in range(3)] == [[0], [1], [2]]
    assert [plan([10, 10, 10], r, 2).part_shards for r in range(2)] == [[0, 1], [1, 2]]
    assert plan([10, 0, 10], 1, 2).part_shards == [2]  # an empty shard holds nothing of anyone's


def test_res_is_checked_by_one_rule():
    from pipeline.epoch import ResolutionError, check_res

    assert check_res(64) == 64
    for bad in (30, 12, 0):
        with pytest.raises(ResolutionError, match="--res must be a multiple of 4 and at least 16"):
            check_res(bad)


def test_the_trainer_says_a_bad_res_before_it_writes_settings(tmp_path, capsys):
    from train.main import main as train_main

    out = tmp_path / "run"
    assert train_main(["--shards", str(tmp_path), "--out", str(out), "--device", "cpu", "--res", "64,30"]) == 1
    assert capsys.readouterr().err == "error: --res must be a multiple of 4 and at least 16, got 30.\n"
    assert not out.exists()
