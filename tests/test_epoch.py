"""pipeline.epoch: the facts both loaders share (the seed rule, the epoch's order and its deal)."""

import itertools

import numpy as np
import pytest

from pipeline import epoch
from pipeline.epoch import Deal, Order, Plan, derive_seed


def test_seeds_never_collide_by_arithmetic():
    assert derive_seed("dali", 0, 1000) != derive_seed("dali", 1, 0)  # seed * 1000 + rank made these equal
    seeds = {derive_seed("torch-loader", s, r, e) for s, r, e in itertools.product(range(20), range(1100), range(3))}
    assert len(seeds) == 20 * 1100 * 3
    assert derive_seed("dali", 3, 1) != derive_seed("trainer", 3, 1)  # two purposes, two streams


def test_seeds_fit_every_consumer_and_repeat():
    values = [derive_seed(p, s, *k) for p in ("dali", "stream") for s in (0, -1, 2**40) for k in ((), (0,), (7, 9))]
    assert all(0 <= v < 2**63 for v in values)  # DALI, numpy, random and torch.manual_seed take it
    assert derive_seed("dali", 5, 2) == derive_seed("dali", 5, 2)


def plan(counts, rank, world, batch=1):
    return Plan(tars=[f"{k}.tar" for k in range(len(counts))], indexes=[], counts=counts, samples=sum(counts),
                rank=rank, world_size=world, batch_size=batch, train=True)


def test_an_epochs_order_is_every_sample_once_and_depends_on_seed_and_epoch_only(monkeypatch):
    monkeypatch.setattr(epoch, "GROUP_SAMPLES", 25)
    counts = [10, 7, 10, 10, 3, 10] * 2
    order = Order(counts, seed=1, train=True)
    every = sorted((k, i) for k, n in enumerate(counts) for i in range(n))
    for e in range(3):
        assert sorted(map(tuple, order.sequence(e).tolist())) == every
        assert all(sum(counts[k] for k in g.shards) >= 25 for g in order.groups(e)[:-1])  # each a shuffle of 25+
        assert np.array_equal(order.sequence(e), Order(counts, seed=1, train=True).sequence(e))
    small = Order(counts[:6], seed=1, train=True)  # 50 samples: groups of a quarter of them, for a cold cache
    assert len(small.groups(0)) >= 3 and all(sum(counts[k] for k in g.shards) >= 12 for g in small.groups(0))
    assert not np.array_equal(order.sequence(0), order.sequence(1))
    assert not np.array_equal(order.sequence(0), Order(counts, seed=2, train=True).sequence(0))
    val = Order(counts, seed=1, train=False)
    assert [tuple(r) for r in val.sequence(0).tolist()] == every == [tuple(r) for r in val.sequence(5).tolist()]


def test_groups_cut_by_bytes_keep_to_them():
    counts, sizes = [4] * 12, [100] * 12
    order = Order(counts, seed=0, train=True, sizes=sizes, group_bytes=250, min_samples=4)
    assert all(len(g.shards) == 2 for g in order.groups(0))
    order = Order(counts, seed=0, train=True, sizes=sizes, group_bytes=250, min_samples=9)  # a batch needs 3 shards
    assert all(len(g.shards) == 3 for g in order.groups(0))


def test_the_ranks_share_each_global_batch_and_a_resume_on_other_ranks_goes_on_from_its_sample():
    """39 samples, batch 4: on 2 ranks a global batch of 8, 4 steps; stopped after 2 (16 samples),
    resumed on 3 (12 a step): 1 step more, 11 samples left out of the epoch, none twice."""
    p = [plan([10, 9, 10, 10], r, 2, 4) for r in range(2)]
    order = Order(p[0].counts, seed=0, train=True)
    deals = [Deal(q, order) for q in p]
    assert [d.batches(0) for d in deals] == [4, 4]
    seen = [tuple(x) for i in range(2) for d in deals for x in d.samples(0, i).tolist()]
    assert [tuple(x) for x in order.sequence(0)[:16].tolist()] == seen  # the global batches, rank 0 then 1
    later = [Deal(plan([10, 9, 10, 10], r, 3, 4), order, first=(0, 16)) for r in range(3)]
    assert [d.batches(0) for d in later] == [1, 1, 1] and later[0].batches(1) == 3  # the next epoch from 0
    more = [tuple(x) for d in later for x in d.samples(0, 0).tolist()]
    assert len(set(seen + more)) == 28 and 39 - 28 < 12


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
