"""train/precision.py: bf16 autocast or float32 as asked, or as measured on this machine (auto),
cached and agreed by the ranks; channels_last everywhere; the bf16 path gives finite losses close
to float32's; training, evaluation and predict all use it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from train.cli import main as cli
from train import precision
from train.evaluate import evaluate
from train.losses import LossWeights, total_loss
from train.model import build_model
from train.precision import Probe
from train.settings import settings_from

ROOT = Path(__file__).resolve().parent.parent
PROBE = Probe("unet", res=32, batch=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "precision.json"
    monkeypatch.setenv("DEPTHSEG_PRECISION_CACHE", str(path))
    return path


def timed(monkeypatch, float32: float, bf16: float) -> list:
    """time_steps replaced: the seconds a step takes in each precision; returns the calls made."""
    calls = []
    monkeypatch.setattr(precision, "time_steps", lambda probe, cl: calls.append(probe) or (float32, bf16))
    return calls


def test_bf16_and_float32_are_what_they_say_on_any_device():
    for device in ("cpu", "cuda"):
        assert precision.choose(device, "bf16").bf16 and not precision.choose(device, "float32").bf16
    assert str(precision.choose("cpu", "float32")) == "float32, channels_last"
    assert not precision.choose("cpu", "bf16", channels_last=False).channels_last
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, float32, got 'fp8'"):
        precision.choose("cpu", "fp8")


@pytest.mark.parametrize("float32, bf16, want", [(1.0, 0.6, True), (0.6, 1.0, False)])
def test_auto_takes_the_faster_one_measured_here_and_says_so(cache, monkeypatch, float32, bf16, want):
    calls = timed(monkeypatch, float32, bf16)
    p = precision.choose("cpu", "auto", probe=PROBE)
    assert p.bf16 is want and calls == [PROBE]
    assert p.why == f"bf16 at {float32 / bf16:.2f}x float32's speed on this CPU, timed just now"
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["float32"] == float32 and entry["bf16"] == bf16


def test_a_second_run_reads_the_cache_and_times_nothing(cache, monkeypatch):
    timed(monkeypatch, 1.0, 0.5)
    assert precision.choose("cpu", "auto", probe=PROBE).bf16
    calls = timed(monkeypatch, 0.1, 9.9)  # would say float32, if it were asked
    again = precision.choose("cpu", "auto", probe=PROBE)
    assert again.bf16 and calls == [] and f"cached in {cache}" in again.why


def test_the_cache_keeps_each_model_resolution_batch_and_cpu_apart(cache, monkeypatch):
    calls = timed(monkeypatch, 1.0, 0.5)
    for probe in (PROBE, Probe("unet", 64, 2), Probe("unet", 32, 4), Probe("diff", 32, 2), Probe("unet", 32, 2, train=False)):
        precision.choose("cpu", "auto", probe=probe)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN made to act as another CPU
    precision.choose("cpu", "auto", probe=PROBE)
    assert len(calls) == 6 and len(json.loads(cache.read_text())) == 6


def test_a_damaged_cache_is_measured_again(cache, monkeypatch):
    cache.write_text("{not json")
    calls = timed(monkeypatch, 1.0, 0.5)
    assert precision.choose("cpu", "auto", probe=PROBE).bf16 and len(calls) == 1
    assert len(json.loads(cache.read_text())) == 1


def test_auto_on_a_gpu_is_bf16_where_native(monkeypatch):
    monkeypatch.setattr(precision, "cuda_bf16_is_native", lambda device: True)
    assert precision.choose("cuda", "auto").bf16
    monkeypatch.setattr(precision, "cuda_bf16_is_native", lambda device: False)
    assert not precision.choose("cuda", "auto").bf16


def test_timing_is_real_and_leaves_the_random_state_alone():
    state = torch.get_rng_state()
    for train in (True, False):
        f32, bf16 = precision.time_steps(Probe("unet", 32, 2, train=train), True, steps=1)
        assert 0 < f32 < 60 and 0 < bf16 < 60
    assert torch.equal(torch.get_rng_state(), state)


AGREE = """
import os, sys, torch.distributed as dist
sys.path.insert(0, {root!r})
from train import precision
dist.init_process_group("gloo")
rank = dist.get_rank()
# rank 0 finds bf16 much faster, rank 1 float32 a little: the sum of their seconds decides, for both
precision.time_steps = lambda probe, cl: (1.0, 0.5) if rank == 0 else (0.9, 1.0)
p = precision.choose("cpu", "auto", probe=precision.Probe("unet", 32, 2))
print(f"rank {{rank}}: {{p.bf16}}", flush=True)
dist.destroy_process_group()
"""


def test_the_ranks_measure_together_and_agree(cache, tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    # The ranks share one pipe: their lines may interleave, so each answer is found, not each line.
    assert sorted(re.findall(r"rank \d: (?:True|False)", done.stdout)) == ["rank 0: True", "rank 1: True"]
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["float32"] == pytest.approx(1.9) and entry["bf16"] == pytest.approx(1.5)


@pytest.mark.parametrize("flag, want", [("--precision=bf16", "bf16 autocast"), ("--no-bf16", "float32")])
def test_the_trainer_runs_and_says_the_precision_asked_for(tmp_path, flag, want):
    cmd = [sys.executable, str(ROOT / "train" / "main.py"), "--loader", "synthetic", "--res", "32", "--batch-size", "2",
           "--max-steps", "1", "--log-every", "1", "--vis-samples", "0", "--device", "cpu", "--out", str(tmp_path / "r"), flag]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"on cpu in {want}, channels_last (asked for)" in done.stdout


def test_the_old_bf16_flags_still_work():
    assert settings_from(["--no-bf16"]).precision == "float32" and settings_from(["--bf16"]).precision == "auto"
    assert settings_from([]).precision == "auto"


def tiny_batch(res: int = 32, b: int = 4):
    g = torch.Generator().manual_seed(0)
    bg = torch.rand(b, 3, res, res, generator=g)
    fg_bg = bg.clone()
    fg_bg[:, :, 8:20, 10:18] = torch.rand(b, 3, 1, 1, generator=g)
    mask = torch.zeros(b, 1, res, res)
    mask[:, :, 8:20, 10:18] = 1
    depth = torch.linspace(0, 1, res).view(1, 1, res, 1).expand(b, 1, res, res).contiguous()
    return {"bg": bg, "fg_bg": fg_bg, "mask": mask, "depth": depth, "valid": torch.ones(b, dtype=torch.bool)}


@pytest.mark.parametrize("name", ["unet", "diff"])
def test_bf16_losses_and_gradients_are_finite_and_close_to_float32(name):
    torch.manual_seed(0)
    model = build_model(name, dropout=0).train()
    batch = tiny_batch(64, 8)  # at 32 px the unet's bottleneck is 1x1 and its BatchNorm's gradients ill-conditioned
    x = torch.cat([batch["bg"], batch["fg_bg"]], 1)
    results = {}
    for p in (precision.Precision("cpu", False, False), precision.Precision("cpu", True, True)):
        model.zero_grad()
        m = p.prepare(model)
        with p.autocast():
            mask, depth = m(p.input(x))
        assert mask.dtype == depth.dtype == torch.float32  # the heads' sigmoids stay float32
        loss, _ = total_loss(mask, depth, batch["mask"], batch["depth"], LossWeights(w_dice=1, mask_image_terms=False))
        loss.backward()
        grads = torch.cat([q.grad.flatten() for q in model.parameters()])
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(grads).all()
        results[p.bf16] = loss.item(), grads
    (l32, g32), (l16, g16) = results[False], results[True]
    assert l16 == pytest.approx(l32, rel=0.03)
    # bf16 keeps 8 bits of mantissa: at init the unet's gradient is 0.94 aligned with float32's
    # (its first BatchNorms' 0.72), the reference's closer; a broken cast lands far below.
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.9


def test_evaluate_runs_the_model_in_the_precision_it_is_given():
    torch.manual_seed(0)
    model, batch = build_model("unet", dropout=0).eval(), tiny_batch()
    m32, _ = evaluate(model, [batch], torch.device("cpu"), precision=precision.Precision("cpu", False, False))
    m16, _ = evaluate(model, [batch], torch.device("cpu"), precision=precision.Precision("cpu", True, True))
    assert m32["samples"] == m16["samples"] == 4
    assert m16["loss"] == pytest.approx(m32["loss"], rel=0.03) and m16["loss"] != m32["loss"]


def test_predict_and_evaluate_run_in_the_precision_asked_for(tmp_path, cache, monkeypatch):
    from train import checkpoint
    from train.predict import TorchRunner

    torch.manual_seed(0)
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": "unet", "model_args": {}, "res": 32, "state_dict": build_model("unet").state_dict(),
                           "step": 0, "epoch": 0})
    slow = TorchRunner(str(path), mode="float32")
    assert slow.name == "torch on cpu, float32, channels_last"
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    want = slow(x, x)
    calls = timed(monkeypatch, 1.0, 0.5)
    fast = TorchRunner(str(path), mode="auto", batch=2)  # auto times forward passes of this batch
    assert fast.name == "torch on cpu, bf16 autocast, channels_last" and calls == [Probe("unet", 32, 2, train=False)]
    got = fast(x, x)
    assert all(g.dtype == np.float32 and g.shape == (2, 1, 32, 32) for g in got)
    assert all(0 < abs(g - w).max() < 0.05 for g, w in zip(got, want))


def test_the_cli_takes_precision_and_the_old_flags(tmp_path, cache, monkeypatch):
    """`depthcli predict --no-bf16` (the old flag) is --precision float32, --bf16 is auto."""
    from PIL import Image
    from train import checkpoint

    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": "unet", "model_args": {}, "res": 32, "state_dict": build_model("unet").state_dict(),
                           "step": 0, "epoch": 0})
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(img)
    timed(monkeypatch, 1.0, 0.5)  # a machine where bf16 is fast: --bf16 (auto) takes it
    for flags, want in ((["--no-bf16"], "float32"), (["--precision", "bf16"], "bf16 autocast"), (["--bf16"], "bf16 autocast")):
        r = CliRunner().invoke(cli, ["predict", "--checkpoint", str(path), "--bg", str(img), "--fg-bg", str(img),
                                     "--out", str(tmp_path / "o"), "--device", "cpu", *flags])
        assert r.exit_code == 0 and f"torch on cpu, {want}, channels_last" in r.output, (flags, r.output)
