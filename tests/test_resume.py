"""Elastic restarts and exact resume: torchrun --max-restarts restarts a group whose worker was
SIGKILLed and --resume auto picks up last.pt; with DALI's reader checkpoints a resumed run sees
exactly the batches, in the same order, that the uninterrupted run saw."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import child_pids, dealt_keys, read_trace, run_script
from pipeline.augment import Augment
from pipeline.loaders import build_loader
from train.main import main as train_main
from train.run import lr_factor
from train.settings import settings_from

ROOT = Path(__file__).resolve().parent.parent


def fingerprint(batch: dict) -> str:
    return hashlib.sha1(b"".join(batch[k].cpu().numpy().tobytes() for k in ("bg", "fg_bg", "mask", "depth"))).hexdigest()


@pytest.mark.parametrize("augment", [Augment.off(), Augment()], ids=["no_augment", "augment"])
def test_dali_loader_goes_on_exactly_from_its_state(exact_shards, augment):
    """Killed after 2 of an epoch's 4 batches: the loader rebuilt from its state gives the other
    2, then the next epochs, as the uninterrupted one did (reader position, shuffle and draws)."""
    kw = {"split": "train", "res": 32, "batch_size": 8, "loader": "dali", "augment": augment, "seed": 5, "workers": 1,
          "rank": 1, "world_size": 2}
    loader = build_loader(exact_shards, **kw)
    whole = [[fingerprint(b) for b in loader] for _ in range(3)]
    assert len(whole[0]) == 2 and whole[0] != whole[1]  # 19 samples of rank 1 / 8: 2 batches an epoch
    loader = build_loader(exact_shards, **kw)
    first = []
    for b in loader:
        first.append(fingerprint(b))
        state = loader.state()
        break
    resumed = build_loader(exact_shards, state=state, **kw)
    assert first + [fingerprint(b) for b in resumed] == whole[0]
    assert [fingerprint(b) for b in resumed] == whole[1]
    at_epoch_end = build_loader(exact_shards, state=resumed.state(), **kw)  # as saved after validation
    assert [fingerprint(b) for b in at_epoch_end] == whole[2]
    loader = build_loader(exact_shards, **kw)
    for i, _ in enumerate(loader):  # as saved after an epoch's last step (SIGTERM, --max-steps)
        if i == len(loader) - 1:
            state = loader.state()
            break
    assert [fingerprint(b) for b in build_loader(exact_shards, state=state, **kw)] == whole[1]


RESTORE_HEAP = """
import sys
from pipeline.loaders import build_loader


def heap_mb():
    for line in open("/proc/self/maps"):
        parts = line.split()
        if parts[-1] == "[heap]":
            start, end = (int(x, 16) for x in parts[0].split("-"))
            return (end - start) >> 20
    return 0


if __name__ == "__main__":
    kw = {"split": "train", "res": 32, "batch_size": 8, "loader": "dali", "seed": 5, "workers": 1}
    loader = build_loader(sys.argv[1], **kw)
    for _ in loader:  # a state from mid-epoch, as a trainer saves it
        state = loader.state()
        break
    before = heap_mb()
    build_loader(sys.argv[1], state=state, **kw)
    print(heap_mb() - before)
"""


def test_restoring_dali_state_keeps_the_heap_small(exact_shards, tmp_path):
    """DALI reserves several MB of heap per shuffle-buffer slot when it restores a checkpoint: with
    1,024 slots, 7 GB a restore, and a process whose heap outgrows the RAM cannot fork (CI failed
    so). The buffer is never larger than a rank's part (39 samples here). A fresh process, since
    a heap never shrinks back."""
    (tmp_path / "restore.py").write_text(RESTORE_HEAP)
    r = run_script(tmp_path / "restore.py", str(exact_shards), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) < 1000  # MB; 7,000 with the buffer at 1,024


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_trainer_resumed_mid_epoch_sees_the_same_batches(exact_shards, tmp_path):
    """One process, augmentation off, batch 8: 4 steps an epoch. Stopped at step 3 and resumed,
    steps 4-6 have exactly the losses of the uninterrupted run: the same batches in the same
    order reached the same model (the checkpoint's RNG covers dropout)."""
    args = ["--shards", str(exact_shards), "--res", "32", "--batch-size", "8", "--workers", "1", "--log-every", "1",
            "--no-augment", "--epochs", "3", "--vis-samples", "0", "--device", "cpu"]  # exact losses: CPU kernels
    assert train_main(args + ["--out", str(tmp_path / "whole"), "--max-steps", "6"]) == 0
    assert train_main(args + ["--out", str(tmp_path / "cut"), "--max-steps", "3"]) == 0
    assert train_main(args + ["--out", str(tmp_path / "cut"), "--max-steps", "6", "--resume"]) == 0
    whole, cut = records(tmp_path / "whole", "train"), records(tmp_path / "cut", "train")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in cut] == [r["loss"] for r in whole]
    assert records(tmp_path / "cut", "resume") == [{**records(tmp_path / "cut", "resume")[0], "from_step": 3,
                                                     "exact": True, "restart": 0}]


def test_torchrun_restarts_a_killed_worker_and_the_run_resumes(exact_shards, tmp_path):
    """2 ranks × batch 4: 4 steps an epoch, 12 planned. One worker is SIGKILLed after the
    checkpoint of step 2; torchrun restarts the group once and --resume auto continues: the trace
    of the samples trained on (each step's last) is the dealt order's, step by step and rank by rank."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "--monitor-interval", "0.2", str(ROOT / "train" / "main.py"), "--shards", str(exact_shards), "--out", str(out),
           "--device", "cpu", "--res", "32", "--batch-size", "4", "--epochs", "3", "--workers", "1", "--log-every", "1",
           "--ckpt-every", "2", "--resume", "auto", "--no-augment", "--vis-samples", "0",
           "--trace-samples", str(tmp_path / "trace")]
    # The workers' own store, not the agent's: with the shared one a restarted worker can read
    # its peer's address of the previous attempt (pytorch/pytorch#135712; seen here too).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        t0 = time.time()
        while not (out / "last.pt").exists():
            assert time.time() - t0 < 240 and proc.poll() is None, "no checkpoint was written"
            time.sleep(0.1)
        os.kill(max(child_pids(proc.pid)), signal.SIGKILL)  # rank 1, mid-epoch 1
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    resumes = records(out, "resume")
    assert len(resumes) == 1 and resumes[0]["restart"] == 1 and resumes[0]["exact"], output
    step = resumes[0]["from_step"]
    assert step in (2, 4) and f"resuming {out / 'last.pt'} at step {step}" in output and "torchrun restart 1" in output
    ckpt = torch.load(out / "last.pt")
    assert (ckpt["step"], ckpt["epoch"]) == (12, 3)  # the planned steps
    steps = [r["step"] for r in records(out, "train")]
    assert steps[-1] == 12 and sorted(set(steps)) == list(range(1, 13))
    lines = read_trace(tmp_path / "trace")
    want = [step for epoch in range(3) for step in dealt_keys(exact_shards, 4, 0, 2, epoch)]
    assert len(lines) == 24 and all(lines[(i + 1, r)]["keys"] == keys for i, step in enumerate(want) for r, keys in enumerate(step))


def test_progressive_stages_keep_each_best_and_resume_inside_a_stage_exactly(exact_shards, tmp_path, capsys):
    """--res 32,48 --epochs 1,2, batch 8: 4 steps an epoch; steps 1-4 at 32 px, then 5-12 at 48 px
    from the first stage's best weights, each stage with its own schedule. Stopped inside the
    first stage, resumed, stopped inside the second (mid-epoch) and resumed again, the run has
    exactly the uninterrupted run's losses."""
    args = ["--shards", str(exact_shards), "--res", "32,48", "--epochs", "1,2", "--lr", "2e-3,1e-3", "--batch-size", "8",
            "--workers", "1", "--log-every", "1", "--no-augment", "--device", "cpu"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train_main(args + ["--out", str(whole)]) == 0
    output = capsys.readouterr().out
    assert "at 32px (stage 1 of 2)" in output and "at 48px (stage 2 of 2)" in output
    assert f"initialised from {whole / 'best_32px.pt'}" in output
    best32, best48, best, last = (torch.load(whole / n) for n in ("best_32px.pt", "best_48px.pt", "best.pt", "last.pt"))
    assert (best32["res"], best32["stage"], best32["step"]) == (32, 0, 4)
    assert (best48["res"], best48["stage"]) == (48, 1) and best48["step"] in (8, 12) and best["step"] == best48["step"]
    assert (last["res"], last["stage"], last["step"], last["epoch"]) == (48, 1, 12, 2)
    train = records(whole, "train")
    assert [r["step"] for r in train] == list(range(1, 13)) and [r["res"] for r in train] == [32] * 4 + [48] * 8
    # Each stage has its own schedule and peak (--lr per stage, sqrt-scaled from 32 to a batch of 8):
    # a cosine over its own steps, to 0 at its last.
    s = settings_from(args)
    for r in train:
        stage_step, total, peak = (r["step"], 4, 2e-3 / 2) if r["res"] == 32 else (r["step"] - 4, 8, 1e-3 / 2)
        assert r["lr"] == pytest.approx(peak * lr_factor(stage_step, total, 4, s))
    assert train[3]["lr"] == 0 < train[4]["lr"]
    assert [r["res"] for r in records(whole, "val")] == [32, 48, 48]
    assert sorted(p.name for p in (whole / "vis").iterdir()) == ["32px_epoch_001.png", "48px_epoch_001.png", "48px_epoch_002.png"]
    for stop in ("2", "7", "0"):
        assert train_main(args + ["--out", str(cut), "--max-steps", stop] + (["--resume"] if stop != "2" else [])) == 0
    assert [(r["from_step"], r["exact"]) for r in records(cut, "resume")] == [(2, True), (7, True)]
    assert [r["step"] for r in records(cut, "train")] == list(range(1, 13))
    assert [r["loss"] for r in records(cut, "train")] == [r["loss"] for r in train]
    assert torch.equal(torch.load(cut / "best_32px.pt")["state_dict"]["mask_head.out.weight"],
                       best32["state_dict"]["mask_head.out.weight"])


def test_stages_that_do_not_fit_are_one_sentence(exact_shards, tmp_path, capsys):
    base = ["--shards", str(exact_shards), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert train_main(base + ["--res", "32,48", "--epochs", "1,2,3"]) == 1
    assert capsys.readouterr().err == ("error: --epochs 1,2,3 gives 3 values for 2 stages of --res; "
                                       "give one, or one per stage.\n")
    assert train_main(base + ["--res", "32,32"]) == 1
    assert capsys.readouterr().err == "error: --res 32,32 repeats a resolution; each stage needs its own.\n"


CPU_RUN = ["--res", "32", "--workers", "1", "--log-every", "1", "--no-augment", "--epochs", "3", "--vis-samples", "0",
           "--device", "cpu", "--precision", "float32"]


def test_a_resume_with_another_batch_goes_on_in_samples(exact_shards, tmp_path, capsys):
    """Stopped 2 steps of 8 into an epoch of 39 samples, resumed at batch 16: 16 samples in is
    one step of 16, so the epoch has one step left; the schedule goes on from the same share of
    the stage at the learning rate of the new batch; the loader's state (batches of 8) is left."""
    from train.run import peak_lr

    out, args = tmp_path / "r", ["--shards", str(exact_shards), *CPU_RUN]
    assert train_main(args + ["--out", str(out), "--batch-size", "8", "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert train_main(args + ["--out", str(out), "--batch-size", "16", "--max-steps", "3", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "(batch 8 -> 16): its random draws are drawn anew" in said and "epoch 1, step 1 of it" in said
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"], ckpt["batch"]) == (3, 1, 0, 16)
    assert ckpt["scheduler"]["last_epoch"] == 2  # 2 steps of 8 = 1 of 16, then one more
    s = settings_from(args + ["--out", str(out), "--batch-size", "16"])
    lr = records(out, "train")[-1]["lr"]  # after 2 of the stage's 3 epochs x 2 steps at batch 16
    assert lr == pytest.approx(peak_lr(s, 16, s.lr[0]) * lr_factor(2, 6, 2, s))


def test_a_loader_state_from_another_graph_is_left_with_one_line(exact_shards, tmp_path, capsys):
    """A state saved on another device (DALI's graph differs there) is not handed to DALI."""
    out, args = tmp_path / "r", ["--shards", str(exact_shards), *CPU_RUN, "--batch-size", "8", "--out", str(tmp_path / "r")]
    assert train_main(args + ["--max-steps", "2"]) == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["loader_graph"]["device"] = "cuda"
    torch.save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert train_main(args + ["--max-steps", "4", "--resume"]) == 0
    assert "the loader's saved state fits another graph (device cuda -> cpu): its random draws are drawn anew" in capsys.readouterr().out
    assert records(out, "resume")[-1]["exact"] is False and torch.load(out / "last.pt", weights_only=True)["step"] == 4


def test_a_loader_state_dali_cannot_restore_is_left_with_one_line(exact_shards, tmp_path, capsys):
    """A state whose graph DALI does not recognize (here: one made with augmentation, for a run
    without) is said in one line and the run goes on reseeded, never an error from inside DALI."""
    out, args = tmp_path / "r", ["--shards", str(exact_shards), *CPU_RUN, "--batch-size", "8", "--out", str(tmp_path / "r")]
    assert train_main(args + ["--max-steps", "2"]) == 0
    loader = build_loader(exact_shards, split="train", res=32, batch_size=8, loader="dali", augment=Augment(), workers=1)
    next(iter(loader))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["loader_states"] = [loader.state()]
    torch.save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert train_main(args + ["--max-steps", "4", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "the loader's saved state could not be restored (the DALI pipeline failed:" in said
    assert "its random draws are drawn anew" in said and torch.load(out / "last.pt", weights_only=True)["step"] == 4


def test_a_checkpoint_from_before_the_dealt_order_resumes_with_one_line(exact_shards, tmp_path, capsys):
    """A checkpoint as the commit before this order saved it (steps into the epoch, no sample
    count, a DALI state of its reader's graph) resumes on the same ranks at the same sample count
    in the new order, said in one line."""
    out, args = tmp_path / "r", ["--shards", str(exact_shards), *CPU_RUN, "--batch-size", "8", "--out", str(tmp_path / "r")]
    assert train_main(args + ["--max-steps", "2"]) == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for key in ("epoch_samples", "order"):
        del ckpt[key]
    del ckpt["loader_graph"]["order"]
    ckpt["loader_states"] = [state["dali"] for state in ckpt["loader_states"]]  # the bare DALI checkpoint it was
    torch.save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert train_main(args + ["--max-steps", "4", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "epoch 1, step 2 of it), at sample 16 of the epoch's order; the checkpoint predates the dealt order" in said
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]
