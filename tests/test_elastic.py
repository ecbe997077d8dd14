"""Exact and elastic resume with both loaders, checked from outside by --trace-samples: the keys
every rank trained on at every step, against the order pipeline.epoch deals (a function of the
seed and epoch only), and against what a run that was never stopped trained on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import dealt_keys, read_trace as trace
from pipeline.augment import Augment
from pipeline.loaders import build_loader
from train.main import main as train_main

ROOT = Path(__file__).resolve().parent.parent
BATCH, SEED = 4, 3


def expected(shards: Path, world: int, epoch: int, first: tuple[int, int] = (0, 0)) -> list[list[list[str]]]:
    return dealt_keys(shards, BATCH, SEED, world, epoch, first)


def args(shards: Path, out: Path, loader: str, *more: str) -> list[str]:
    return ["--shards", str(shards), "--out", str(out), "--device", "cpu", "--res", "32", "--batch-size", str(BATCH),
            "--epochs", "2", "--workers", "1", "--log-every", "1", "--no-augment", "--vis-samples", "0", "--seed", str(SEED),
            "--loader", loader, "--trace-samples", str(out.parent / f"{out.name}.trace"), *more]


def torchrun(world: int, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(ROOT / "train" / "main.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_stopped_and_resumed_on_other_ranks(exact_shards, tmp_path, loader):
    """2 ranks × batch 4 over 39 samples: 4 steps an epoch, stopped after step 2 (16 samples).
    Resumed on 2 ranks: the trace of the dealt order, step by step and rank by rank. Resumed on 3
    and on 1: the epoch ends with no sample twice and fewer than one global batch left out, and the
    next epoch is the new world's deal."""
    cut = tmp_path / "cut"
    torchrun(2, args(exact_shards, cut, loader, "--max-steps", "2"))
    for world in (1, 3):
        shutil.copytree(cut, tmp_path / f"on{world}")
        shutil.copy(tmp_path / "cut.trace", tmp_path / f"on{world}.trace")
    torchrun(2, args(exact_shards, cut, loader, "--resume", "--max-steps", "0"))
    lines = trace(tmp_path / "cut.trace")
    want = expected(exact_shards, 2, 0) + expected(exact_shards, 2, 1)
    assert len(lines) == 8 * 2 and all(lines[(i + 1, r)]["keys"] == keys for i, step in enumerate(want)
                                       for r, keys in enumerate(step))
    assert {(t["epoch"], t["world_size"]) for t in lines.values()} == {(0, 2), (1, 2)}
    resumes = [r for r in map(json.loads, (cut / "log.jsonl").read_text().splitlines()) if r["kind"] == "resume"]
    assert [(r["from_step"], r["exact"], r["world_size_before"]) for r in resumes] == [(2, True, 2)]

    for world in (1, 3):
        out = tmp_path / f"on{world}"
        if world == 1:
            assert train_main(args(exact_shards, out, loader, "--resume", "--max-steps", "0")) == 0
        else:
            torchrun(world, args(exact_shards, out, loader, "--resume", "--max-steps", "0"))
        resumes = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "resume"]
        assert [(r["from_step"], r["exact"], r["world_size_before"]) for r in resumes] == [(2, False, 2)]
        lines = trace(tmp_path / f"on{world}.trace")
        epoch0 = [k for t in lines.values() if t["epoch"] == 0 for k in t["keys"]]
        left = (39 - 16) % (BATCH * world)
        assert len(epoch0) == len(set(epoch0)) == 39 - left and left < BATCH * world
        resumed = expected(exact_shards, world, 0, first=(0, 16))
        assert [[lines[(2 + i + 1, r)]["keys"] for r in range(world)] for i in range(len(resumed))] == resumed
        nxt = expected(exact_shards, world, 1)
        first = 2 + len(resumed)
        assert [[lines[(first + i + 1, r)]["keys"] for r in range(world)] for i in range(len(nxt))] == nxt
        assert {t["world_size"] for t in lines.values() if t["step"] > 2} == {world}


def fingerprint(batch: dict) -> list[str]:
    """One hash per sample of its four augmented images."""
    return [hashlib.sha1(b"".join(batch[k][j].numpy().tobytes() for k in ("bg", "fg_bg", "mask", "depth"))).hexdigest()
            for j in range(len(batch["keys"]))]


def test_the_torch_loader_draws_augmentation_per_sample(exact_shards):
    """Full augmentation: a loader started mid-epoch, on 2 ranks or 3, with 1 worker or 2, gives
    each sample exactly the images the uninterrupted loader gave it."""
    kw = {"split": "train", "res": 32, "batch_size": 4, "loader": "torch", "augment": Augment(), "seed": SEED}
    whole = {}
    for rank in range(2):
        for b in build_loader(exact_shards, rank=rank, world_size=2, workers=1, **kw):
            whole.update(zip(b["keys"], fingerprint(b)))
    assert len(whole) == 32
    resumed = {}
    for rank in range(3):
        for b in build_loader(exact_shards, rank=rank, world_size=3, workers=2, start=(0, 16), **kw):
            resumed.update(zip(b["keys"], fingerprint(b)))
    assert len(resumed) == 12 and all(whole.get(k, v) == v for k, v in resumed.items())
    assert sum(k in whole for k in resumed) >= 8  # most of them were in the first run's batches


def test_ranks_that_would_read_different_orders_stop_with_one_sentence(monkeypatch):
    """A node whose cache budget cuts the groups by bytes deals other samples than the rest."""
    import types

    import torch.distributed as dist

    from train import main as trainer
    from train.settings import TrainingError

    ours, theirs = {"group_bytes": 0, "min_samples": 1}, {"group_bytes": 4_000_000, "min_samples": 16}
    loader = types.SimpleNamespace(deal=types.SimpleNamespace(order=types.SimpleNamespace(params=ours)))
    ctx = types.SimpleNamespace(world_size=2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, mine]))
    trainer.same_order(ctx, loader)  # the same everywhere: nothing to say
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, theirs]))
    with pytest.raises(TrainingError, match=r"^the ranks would read different orders of the samples .*: give every node "
                                            r"the same --cache-limit, large enough for the set or not\.$"):
        trainer.same_order(ctx, loader)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_loader_started_after_an_epochs_last_step_gives_the_next_epoch(exact_shards, loader):
    """A SIGTERM after the last step of an epoch saves its position there (32 of 39 samples at a
    global batch of 8): the loader resumed at it goes on with the next epoch, whole."""
    kw = {"split": "train", "res": 32, "batch_size": 8, "loader": loader, "workers": 1, "seed": SEED, "augment": Augment.off()}
    whole = build_loader(exact_shards, **kw)
    next_epoch = [[b["keys"] for b in whole] for _ in range(2)][1]
    assert [b["keys"] for b in build_loader(exact_shards, start=(0, 32), **kw)] == next_epoch
