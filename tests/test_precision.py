"""train/precision.py: bf16 autocast only where the CPU runs it fast (AMX), float32 elsewhere,
channels_last everywhere; the bf16 path gives finite losses close to float32's; training,
evaluation and predict all use it."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train import precision
from train.evaluate import evaluate
from train.losses import LossWeights, total_loss
from train.model import build_model

ROOT = Path(__file__).resolve().parent.parent
AMX = precision.cpu_bf16_is_fast()
needs_amx = pytest.mark.skipif(not AMX, reason="this CPU has no AMX: bf16 is not its fast path")


@pytest.mark.parametrize("cap", ["AVX2", "AVX512_CORE", "AVX512_CORE_BF16"])
def test_a_cpu_without_amx_gets_float32(monkeypatch, cap):
    """oneDNN's ISA cap makes this CPU act like an older one: AVX2 (bf16 emulated, 0.1x float32),
    AVX512 (emulated, 0.46x) and AVX512-BF16 without AMX (0.85x) all keep float32."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    p = precision.choose(torch.device("cpu"))
    assert not p.bf16 and p.channels_last and str(p) == "float32, channels_last"
    assert isinstance(p.autocast(), type(precision.Precision("cpu", False, True).autocast()))


@needs_amx
def test_an_amx_cpu_gets_bf16_unless_told_otherwise(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert precision.choose("cpu").bf16 and str(precision.choose("cpu")) == "bf16 autocast, channels_last"
    assert not precision.choose("cpu", bf16=False).bf16
    assert not precision.choose("cpu", channels_last=False).channels_last


def test_without_amx_the_trainer_runs_float32(tmp_path):
    """A whole run on a CPU made to act without AMX (a fresh process: oneDNN reads its cap once)
    says, and saves, float32."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    cmd = [sys.executable, str(ROOT / "train" / "main.py"), "--loader", "synthetic", "--res", "32", "--batch-size", "2",
           "--max-steps", "1", "--log-every", "1", "--vis-samples", "0", "--device", "cpu", "--out", str(tmp_path / "r")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "on cpu in float32, channels_last" in done.stdout


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


def test_predict_runs_in_the_devices_precision(tmp_path, monkeypatch):
    from train import checkpoint
    from train.predict import TorchRunner

    torch.manual_seed(0)
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": "unet", "model_args": {}, "res": 32, "state_dict": build_model("unet").state_dict(),
                           "step": 0, "epoch": 0})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    slow = TorchRunner(str(path))
    assert slow.name == "torch on cpu, float32, channels_last"
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    want = slow(x, x)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    fast = TorchRunner(str(path))
    got = fast(x, x)
    assert all(g.dtype == np.float32 and g.shape == (2, 1, 32, 32) for g in got)
    if AMX:
        assert fast.name == "torch on cpu, bf16 autocast, channels_last"
        assert all(0 < abs(g - w).max() < 0.05 for g, w in zip(got, want))
