"""The average of the weights (--ema): its arithmetic, and in the trainer what it changes: the
weights validation scores and best.pt gives (evaluate reads them back to the same figures),
the live weights beside them for --resume, which goes on exactly."""

import json

import pytest
import torch
from click.testing import CliRunner

from train.cli import main as cli
from train.ema import WeightEMA
from train.main import main as train_main


def test_average_warms_up_then_follows_the_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # d = min(0.5, 1 / 10): the live weights count 0.9, not the random start's 0.5
    assert ema.model.weight.item() == pytest.approx(0.9)
    ema.update(model)  # d = min(0.5, 2 / 11)
    assert ema.model.weight.item() == pytest.approx(1 - 0.1 * 2 / 11)
    for _ in range(8):
        ema.update(model)  # from update 9 on (d = 10/18 > 0.5) the decay itself
    before = ema.model.weight.item()
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(1 - 0.5 * (1 - before))
    assert ema.updates == 11 and not ema.model.weight.requires_grad
    ema.reset(model)
    assert ema.updates == 0 and ema.model.weight.item() == 1.0


def test_batchnorm_statistics_are_copied_not_averaged():
    model = torch.nn.BatchNorm1d(1)
    ema = WeightEMA(model, decay=0.9)
    model.running_mean.fill_(7.0)
    ema.update(model)
    assert ema.model.running_mean.item() == 0.0  # update() leaves buffers alone ...
    ema.copy_buffers(model)
    assert ema.model.running_mean.item() == 7.0  # ... until they are used or saved


ARGS = ["--res", "32", "--batch-size", "8", "--workers", "1", "--log-every", "1", "--no-augment", "--epochs", "2",
        "--vis-samples", "0", "--device", "cpu", "--ema", "0.9"]


def test_ema_is_validated_saved_resumed_and_evaluated(exact_shards, tmp_path):
    """4 steps an epoch, 8 in all: best.pt's weights are the average, scored by `evaluate` as the
    run scored them; cut at step 3 and resumed, the run ends with the very same weights."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train_main(ARGS + ["--shards", str(exact_shards), "--out", str(whole)]) == 0
    ckpt = torch.load(whole / "last.pt")
    assert ckpt["ema_updates"] == 8 and ckpt["settings"]["ema"] == 0.9
    averaged = [k for k in ckpt["state_dict"] if k.endswith(".weight")]
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["live_state_dict"][k]) for k in averaged)
    # BatchNorm statistics are the live model's, not averaged
    stats = [k for k in ckpt["state_dict"] if k.endswith("running_mean")]
    assert stats and all(torch.equal(ckpt["state_dict"][k], ckpt["live_state_dict"][k]) for k in stats)
    val = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines() if '"val"' in line]
    r = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(whole / "last.pt"), "--shards", str(exact_shards),
                                 "--res", "32", "--batch-size", "8", "--json"])
    assert r.exit_code == 0, r.output
    scored = json.loads(r.stdout)
    assert (scored["loss"], scored["depth/rms"]) == pytest.approx((val[-1]["loss"], val[-1]["depth_rms"]), abs=1e-5)
    assert train_main(ARGS + ["--shards", str(exact_shards), "--out", str(cut), "--max-steps", "3"]) == 0
    assert train_main(ARGS + ["--shards", str(exact_shards), "--out", str(cut), "--resume", "--max-steps", "0"]) == 0
    resumed = torch.load(cut / "last.pt")
    assert resumed["ema_updates"] == 8
    for key in ("state_dict", "live_state_dict"):
        assert all(torch.equal(resumed[key][k], ckpt[key][k]) for k in ckpt[key]), key


def test_decay_follows_the_global_batch():
    """--ema is the decay a step at --lr-batch: at 4x the batch a step counts 4 of those."""
    from test_recipe import first_stage

    small = first_stage(["--res", "32", "--batch-size", "8", "--lr-batch", "8", "--ema", "0.99"])
    large = first_stage(["--res", "32", "--batch-size", "32", "--lr-batch", "8", "--ema", "0.99"])
    assert small.ema.decay == pytest.approx(0.99) and large.ema.decay == pytest.approx(0.99 ** 4)
    assert first_stage(["--res", "32", "--batch-size", "8", "--ema", "0"]).ema is None


def test_without_ema_the_checkpoint_holds_the_live_weights_only(exact_shards, tmp_path):
    out = tmp_path / "plain"
    assert train_main(ARGS[:-2] + ["--shards", str(exact_shards), "--out", str(out), "--max-steps", "2"]) == 0
    ckpt = torch.load(out / "last.pt")
    assert "live_state_dict" not in ckpt and "ema_updates" not in ckpt
