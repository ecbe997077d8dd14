"""The trainer end to end: torchrun with 2 ranks on the CPU, SIGTERM and SIGKILL then --resume,
--init across resolutions, a run that really learns, a non-finite loss, bad input; then
evaluate and predict on the checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import child_pids
from train.cli import main as cli
from train.main import TrainSettings, get_args_parser
from train.main import main as train_main

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
# --device cpu: these tests mean the CPU (gloo, 2 ranks), also on a machine with one GPU.
FAST = ["--res", "32", "--batch-size", "4", "--log-every", "2", "--workers", "1", "--device", "cpu"]


def torchrun(shards, out, *args, **popen):
    cmd = TORCHRUN + [str(ROOT / "train" / "main.py"), "--shards", str(shards), "--out", str(out), *FAST, *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def records(out: Path, kind: str) -> list[dict]:
    path = out / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def wait_for(cond, timeout=120):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def trained(exact_shards, tmp_path_factory):
    """2 ranks × batch 4 at 32 px: 39 train samples → 4 steps an epoch, 2 epochs."""
    out = tmp_path_factory.mktemp("run") / "r32"
    proc = torchrun(exact_shards, out, "--epochs", "2", "--ckpt-every", "3")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return out, output


def test_torchrun_end_to_end(trained):
    out, output = trained
    assert "2 rank(s) on cpu" in output and "4 steps per epoch" in output
    for row in ("Mask", "Depth", "Avg"):
        assert row in output
    ckpt = torch.load(out / "last.pt")  # plain torch.load: weights only, no code
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"], ckpt["res"]) == (8, 2, 0, 32)
    assert ckpt["settings"]["batch_size"] == (4,) and ckpt["model"] == "unet" and ckpt["world_size"] == 2
    assert set(ckpt["metrics"]) >= {"loss", "mask/iou", "depth/rms", "avg/t1"} and ckpt["metrics"]["samples"] == 25
    assert len(ckpt["rng"]) == 2 and set(ckpt["rng"][1]) == {"cpu", "cuda"}
    assert "train/main.py" in ckpt["command"] and "--res 32" in ckpt["command"]
    best = torch.load(out / "best.pt")
    assert best["best_loss"] == min(r["loss"] for r in records(out, "val"))
    train = records(out, "train")
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in train)
    assert len(records(out, "val")) == 2
    assert list((out / "tb").glob("events.out.tfevents.*"))
    pic = Image.open(out / "vis" / "epoch_002.png")
    assert pic.size == (6 * 32, 28 + 4 * 32)  # title line, column names, 4 samples
    assert json.loads((out / "settings.json").read_text())["res"] == [32]


def test_torchrun_runs_progressive_stages_on_every_rank(exact_shards, tmp_path):
    """2 ranks through two stages: every rank starts the second from the first's best, which
    only rank 0 writes (the others wait for it rather than finding no file)."""
    out = tmp_path / "prog"
    proc = torchrun(exact_shards, out, "--res", "32,48", "--epochs", "1,1")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert (out / "best_32px.pt").is_file() and (out / "best_48px.pt").is_file()
    assert [r["res"] for r in records(out, "val")] == [32, 48]
    assert f"initialised from {out / 'best_32px.pt'}" in output


def test_evaluate_prints_the_table(trained, exact_shards):
    out, _ = trained
    r = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(out / "best.pt"), "--shards", str(exact_shards),
                                 "--batch-size", "8", "--loader", "torch"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()  # the progress bar is on stderr
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["rms"])
    assert [line.split()[0] for line in lines[head + 1:head + 4]] == ["Mask", "Depth", "Avg"]
    assert lines[-1].startswith("val: 25 samples at 32px")
    r = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(out / "best.pt"), "--shards", str(exact_shards), "--json"])
    m = json.loads(r.stdout)
    assert m["samples"] == 25 and 0 <= m["mask/iou"] <= 1


def test_predict_any_size_files_and_folders(trained, tmp_path):
    out, _ = trained
    rng = np.random.default_rng(0)
    (tmp_path / "bgs").mkdir()
    (tmp_path / "scenes").mkdir()
    for name, size in (("a", (50, 37)), ("b", (64, 64))):
        bg = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(bg).save(tmp_path / "bgs" / f"{name}.png")
        bg[5:20, 5:20] = 250
        Image.fromarray(bg).save(tmp_path / "scenes" / f"{name}.jpg")
    ckpt = str(out / "last.pt")
    r = CliRunner().invoke(cli, ["predict", "--checkpoint", ckpt, "--bg", str(tmp_path / "bgs" / "a.png"),
                                 "--fg-bg", str(tmp_path / "scenes" / "a.jpg"), "--out", str(tmp_path / "p1")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "p1" / "a_mask.png").size == (50, 37)
    assert Image.open(tmp_path / "p1" / "a_depth.png").mode == "L"
    assert Image.open(tmp_path / "p1" / "a_side.png").size == (200, 37)
    r = CliRunner().invoke(cli, ["predict", "--checkpoint", ckpt, "--bg", str(tmp_path / "bgs"),
                                 "--fg-bg", str(tmp_path / "scenes"), "--out", str(tmp_path / "p2")])
    assert r.exit_code == 0 and "predicted 2 pair(s)" in r.output
    assert Image.open(tmp_path / "p2" / "b_mask.png").size == (64, 64)


@pytest.mark.parametrize("case, says", [
    ("missing", "does not exist"),
    ("not_image", "is not a readable image"),
    ("mismatched", "bg is 50x37 but fg_bg is 20x20; a pair must match"),
    ("bad_ckpt", "is not a readable checkpoint: the file is damaged, cut short, or not written by torch.save."),
])
def test_predict_bad_input_is_one_sentence(trained, tmp_path, case, says):
    out, _ = trained
    bg, fg_bg, ckpt = tmp_path / "bg.png", tmp_path / "fg.png", out / "last.pt"
    Image.new("RGB", (50, 37)).save(bg)
    Image.new("RGB", (50, 37)).save(fg_bg)
    if case == "missing":
        fg_bg = tmp_path / "nope.png"
    elif case == "not_image":
        fg_bg.write_bytes(b"not an image")
    elif case == "mismatched":
        Image.new("RGB", (20, 20)).save(fg_bg)
    else:
        ckpt = tmp_path / "bad.pt"
        ckpt.write_bytes(b"nonsense")
    r = CliRunner().invoke(cli, ["predict", "--checkpoint", str(ckpt), "--bg", str(bg), "--fg-bg", str(fg_bg),
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert says in r.output and "Traceback" not in r.output and r.output.count("\n") == 1


def test_sigterm_saves_on_every_rank_and_resume_continues(exact_shards, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(exact_shards, out, "--epochs", "100")
    wait_for(lambda: len(records(out, "train")) >= 3)
    for pid in child_pids(proc.pid):  # as a scheduler does: every rank gets the signal
        os.kill(pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    stopped = torch.load(out / "last.pt")["step"]
    assert f"SIGTERM: saved {out / 'last.pt'} at step {stopped}" in output
    assert stopped >= 6 and stopped % 2 == 0  # at an agreed sync step
    proc = torchrun(exact_shards, out, "--epochs", "100", "--resume", "--max-steps", str(stopped + 4))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert f"resuming {out / 'last.pt'} at step {stopped}" in output
    ckpt = torch.load(out / "last.pt")
    assert ckpt["step"] == stopped + 4 and ckpt["epoch"] == (stopped + 4) // 4
    steps = [r["step"] for r in records(out, "train")]
    assert steps[-2:] == [stopped + 2, stopped + 4] and steps == sorted(steps)


def test_sigkill_then_resume_from_the_last_periodic_checkpoint(exact_shards, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(exact_shards, out, "--epochs", "100", "--ckpt-every", "2")
    wait_for(lambda: (out / "last.pt").exists() and torch.load(out / "last.pt")["step"] >= 6)
    for pid in child_pids(proc.pid) + [proc.pid]:  # torchrun puts its workers in their own groups
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = torch.load(out / "last.pt")
    # One process now (resume across world sizes), and the run's own settings (res 32, batch 4).
    code = train_main(["--shards", str(exact_shards), "--out", str(out), "--resume", "--max-steps", str(saved["step"] + 2),
                       "--device", "cpu"])
    assert code == 0
    resumed = torch.load(out / "last.pt")
    assert (resumed["step"], resumed["res"], resumed["settings"]["batch_size"]) == (saved["step"] + 2, 32, (4,))


def test_resume_refuses_to_change_what_the_run_is(trained, exact_shards, capsys):
    out, _ = trained
    assert train_main(["--shards", str(exact_shards), "--out", str(out), "--resume", "--res", "64"]) == 1
    err = capsys.readouterr().err
    assert "--res 64 differs from the run's 32" in err and err.count("\n") == 1


def test_init_across_resolutions(exact_shards, tmp_path):
    low = tmp_path / "r32"
    assert train_main(["--shards", str(exact_shards), "--out", str(low), *FAST, "--max-steps", "2"]) == 0
    high = tmp_path / "r48"
    args = ["--shards", str(exact_shards), "--out", str(high), "--res", "48", "--batch-size", "4", "--workers", "1",
            "--init", str(low / "last.pt"), "--lr", "0", "--max-steps", "1", "--log-every", "1", "--device", "cpu"]
    assert train_main(args) == 0
    a, b = torch.load(low / "last.pt"), torch.load(high / "last.pt")
    assert b["res"] == 48 and b["step"] == 1
    weights = [k for k in a["state_dict"] if k.endswith(".weight")]
    assert len(weights) > 50
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in weights)  # lr 0: the init's weights
    fresh = tmp_path / "fresh"
    assert train_main(args[:8] + ["--lr", "0", "--max-steps", "1", "--out", str(fresh), "--device", "cpu"]) == 0
    c = torch.load(fresh / "last.pt")
    assert not all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in weights)


def test_a_short_run_really_learns(exact_shards, tmp_path):
    out = tmp_path / "learn"
    assert train_main(["--shards", str(exact_shards), "--out", str(out), "--res", "32", "--batch-size", "8",
                       "--epochs", "15", "--lr", "2e-3", "--log-every", "4", "--workers", "2", "--device", "cpu"]) == 0
    first, last = records(out, "val")[0], records(out, "val")[-1]
    # All background would score IoU 0; the rectangles are found.
    assert last["mask_iou"] > 0.6 and last["mask_iou"] > first["mask_iou"] + 0.3
    assert last["loss"] < 0.7 * first["loss"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(exact_shards, tmp_path, capsys):
    out = tmp_path / "nan"
    code = train_main(["--shards", str(exact_shards), "--out", str(out), *FAST[:4], "--workers", "1", "--device", "cpu",
                       "--lr", "1e12", "--log-every", "1", "--ckpt-every", "1", "--epochs", "50"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: the loss became non-finite before step" in err and "the last good checkpoint is" in err
    ckpt = torch.load(out / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert f"(step {ckpt['step']})" in err


@pytest.mark.parametrize("args, says", [
    (["--resume"], "--resume: there is no"),
    (["--res", "30"], "--res must be a multiple of 4"),
    (["--loader", "nope"], "unknown loader 'nope'"),
    (["--init", "/nonexistent.pt"], "/nonexistent.pt does not exist"),
    (["--shards", "/nonexistent"], "/nonexistent does not exist"),
])
def test_bad_settings_are_one_sentence(exact_shards, tmp_path, capsys, args, says):
    base = ["--shards", str(exact_shards), "--out", str(tmp_path / "o"), "--workers", "1", "--device", "cpu"]
    assert train_main(base + args) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and err.count("\n") == 1


def test_existing_run_needs_resume(trained, exact_shards, capsys):
    out, _ = trained
    assert train_main(["--shards", str(exact_shards), "--out", str(out), "--device", "cpu"]) == 1
    assert "already holds a run; pass --resume" in capsys.readouterr().err


def test_every_setting_has_a_flag():
    parsed = vars(get_args_parser().parse_args([]))
    assert parsed == {k: v for k, v in vars(TrainSettings()).items()}
    assert "--precision {auto,bf16,float32}" in get_args_parser().format_help()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_run_bf16_channels_last(exact_shards, tmp_path):
    out = tmp_path / "gpu"
    assert train_main(["--shards", str(exact_shards), "--out", str(out), *FAST, "--device", "cuda", "--epochs", "1"]) == 0
    ckpt = torch.load(out / "last.pt")
    assert ckpt["step"] == 9 and ckpt["rng"][0]["cuda"] is not None
    assert all(r["gpu_peak_gb"] > 0 for r in records(out, "train"))


class _NotPlainData:
    pass


def test_a_checkpoint_that_holds_code_is_refused_in_one_sentence(tmp_path):
    """weights_only loading refuses pickled objects; the user gets why, not torch's page."""
    from train.checkpoint import CheckpointError, load

    torch.save({"format": "x", "thing": _NotPlainData()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c\.pt is not a readable checkpoint: it holds objects other "
                                              r"than tensors and plain data\.$"):
        load(tmp_path / "c.pt")
