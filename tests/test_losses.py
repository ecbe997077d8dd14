"""train/losses.py: each term against hand- or numpy-computed values, the weights, the total."""

import contextlib

import numpy as np
import math

import pytest
import torch
from train.losses import LossWeights, edge_loss, head_loss, sobel, ssim, total_loss


def step_image(size: int = 12, at: int = 6) -> torch.Tensor:
    """1×1×size×size: 0 left of column `at`, 1 from it on (a vertical edge)."""
    img = torch.zeros(1, 1, size, size)
    img[..., at:] = 1.0
    return img


def numpy_sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent Sobel: edge-replicated padding, explicit neighbour differences, /8."""
    p = np.pad(img, 1, mode="edge")
    gx = ((p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])) / 8
    gy = ((p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])) / 8
    return gx, gy


def test_sobel_of_a_step_by_hand():
    gx, gy = sobel(step_image())
    expected = torch.zeros(12, 12)
    expected[:, 5:7] = 0.5  # (1 + 2 + 1) / 8 on the two columns beside the step, positive rightwards
    assert torch.equal(gx[0, 0], expected)
    assert torch.equal(gy, torch.zeros_like(gy))


def test_sobel_matches_numpy_on_random_image():
    img = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    gx, gy = sobel(img)
    ngx, ngy = numpy_sobel(img[0, 0].double().numpy())
    np.testing.assert_allclose(gx[0, 0].numpy(), ngx, atol=1e-6)
    np.testing.assert_allclose(gy[0, 0].numpy(), ngy, atol=1e-6)


def test_edge_term_by_hand():
    # Target has a vertical unit step, prediction is flat: |gx| = 0.5 on 2 of 12 columns, gy = 0.
    assert edge_loss(torch.zeros(1, 1, 12, 12), step_image()).item() == pytest.approx(2 * 12 * 0.5 / 144)
    # A horizontal step instead: now only the y term is non-zero, by the same amount.
    assert edge_loss(torch.zeros(1, 1, 12, 12), step_image().transpose(2, 3)).item() == pytest.approx(1 / 12)


def test_edge_term_matches_numpy():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.rand(1, 1, 12, 12, generator=g), torch.rand(1, 1, 12, 12, generator=g)
    (px, py), (tx, ty) = numpy_sobel(pred[0, 0].double().numpy()), numpy_sobel(target[0, 0].double().numpy())
    expected = np.abs(px - tx).mean() + np.abs(py - ty).mean()
    assert edge_loss(pred, target).item() == pytest.approx(expected, abs=1e-6)


def test_l1_term_by_hand():
    pred = torch.full((1, 1, 12, 12), 0.25)
    target = step_image()
    # Half the pixels off by 0.25, half by 0.75.
    w = LossWeights(w_ssim=0.0, w_l1=1.0, w_edge=0.0)
    assert head_loss(pred, target, w).item() == pytest.approx(0.5)


def test_perfect_prediction_has_zero_loss():
    target = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    assert abs(head_loss(target.clone(), target, LossWeights()).item()) < 1e-6


def test_weights_weight_each_term():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.rand(2, 1, 64, 64, generator=g), torch.rand(2, 1, 64, 64, generator=g)
    l1 = (pred - target).abs().mean()
    s = 1 - ssim(pred, target)
    e = edge_loss(pred, target)
    assert torch.equal(head_loss(pred, target, LossWeights(0.0, 1.0, 0.0)), l1)
    assert head_loss(pred, target, LossWeights(1.0, 0.0, 0.0)).item() == pytest.approx(s.item(), abs=1e-6)
    assert head_loss(pred, target, LossWeights(0.0, 0.0, 1.0)).item() == pytest.approx(e.item(), abs=1e-6)
    mixed = head_loss(pred, target, LossWeights(0.3, 2.0, 0.7)).item()
    assert mixed == pytest.approx((0.3 * s + 2.0 * l1 + 0.7 * e).item(), abs=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (3, 1, 11, 30), (1, 1, 224, 224)])
def test_ssim_is_pytorch_msssims_value_and_gradient(shape):
    """The five blurred maps made in one pair of matmuls give pytorch-msssim's SSIM (window 11,
    σ 1.5, valid padding) and its gradient."""
    reference = pytest.importorskip("pytorch_msssim").ssim
    g = torch.Generator().manual_seed(8)
    target = torch.rand(shape, generator=g)
    ours, theirs = (torch.rand(shape, generator=g) * 0.5 + target * 0.5).requires_grad_(), None
    theirs = ours.detach().clone().requires_grad_()
    a, b = ssim(ours, target), reference(theirs, target, data_range=1.0, size_average=True)
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-8, rtol=1e-4)


def test_ssim_needs_the_window_to_fit():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 1, 10, 40), torch.rand(1, 1, 10, 40))


def test_total_is_mask_plus_depth():
    g = torch.Generator().manual_seed(5)
    mp, dp, m, d = (torch.rand(2, 1, 64, 64, generator=g) for _ in range(4))
    w = LossWeights()
    total, parts = total_loss(mp, dp, m, d, w)
    assert parts["mask"].item() == pytest.approx(head_loss(mp, m, w, bce=True).item(), abs=1e-6)
    assert parts["depth"].item() == pytest.approx(head_loss(dp, d, w).item(), abs=1e-6)
    assert total.item() == pytest.approx((parts["mask"] + parts["depth"]).item(), abs=1e-6)
    assert parts["mask"].item() != pytest.approx(parts["depth"].item())


def test_bce_term_is_kl_on_the_mask_head_only():
    """w_bce·(BCE − H(target)): by hand on 1×1×1×2 maps, zero for a perfect soft mask."""
    only_bce = LossWeights(0.0, 0.0, 0.0, 1.0)
    pred, target = torch.tensor([[[[0.8, 0.2]]]]), torch.tensor([[[[1.0, 0.0]]]])
    assert head_loss(pred, target, only_bce, bce=True).item() == pytest.approx(-math.log(0.8), abs=1e-6)
    assert head_loss(pred, target, only_bce).item() == 0.0  # depth: no BCE
    soft = torch.tensor([[[[0.3, 0.7]]]])
    assert head_loss(soft, soft, only_bce, bce=True).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.full((1, 1, 1, 2), 0.5)
    expected = 0.5 * (-0.3 * math.log(0.5 / 0.3) - 0.7 * math.log(0.5 / 0.7)) * 2  # KL(0.3 ‖ 0.5) both pixels
    assert head_loss(half, soft, only_bce, bce=True).item() == pytest.approx(expected, abs=1e-6)
    _, parts = total_loss(pred, pred, target, target, only_bce)
    assert parts["mask"].item() > 0 and parts["depth"].item() == 0.0


def test_gradient_reaches_predictions():
    g = torch.Generator().manual_seed(6)
    mp, dp = (torch.rand(1, 1, 64, 64, generator=g).requires_grad_() for _ in range(2))
    total, _ = total_loss(mp, dp, torch.rand(1, 1, 64, 64, generator=g), torch.rand(1, 1, 64, 64, generator=g), LossWeights())
    total.backward()
    for x in (mp, dp):
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_loss_is_float32_under_bf16_autocast():
    """Under autocast the loss must be computed as in float32, not with bf16 convolutions."""
    g = torch.Generator().manual_seed(7)
    pred = torch.rand(2, 1, 64, 64, generator=g).bfloat16()
    target = torch.rand(2, 1, 64, 64, generator=g).bfloat16()
    expected = head_loss(pred.float(), target.float(), LossWeights())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_loss(pred, target, LossWeights())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


class EmulatedTF32(torch.utils._python_dispatch.TorchDispatchMode):
    """What a GPU does with its TF32 flags on, on the CPU: while torch.get_float32_matmul_precision()
    is not "highest" (the TF32 flags on), each float32 operand of a matmul or convolution is
    rounded to TF32's 10 mantissa bits. A dispatch mode, so backward's matmuls are seen too."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.convolution.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS and torch.get_float32_matmul_precision() != "highest":
            args = tuple(self.tf32(a) for a in args)
        return func(*args, **(kwargs or {}))

    @staticmethod
    def tf32(t):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return t
        bits = t.contiguous().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(t.shape)  # round to nearest, 13 bits dropped


@pytest.fixture
def tf32_flags_on():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what train/main.py's TF32 flags amount to on CUDA
    yield
    torch.set_float32_matmul_precision(before)


def test_emulated_tf32_really_rounds_matmuls(tf32_flags_on):
    a = torch.full((1, 2), 1 + 2 ** -20)
    with EmulatedTF32():
        assert (a @ torch.ones(2, 1)).item() == 2.0  # the 2^-20 is below TF32's 10 bits
    assert (a @ torch.ones(2, 1)).item() > 2.0


def test_a_near_perfect_depth_keeps_its_ieee_loss_and_gradient_under_tf32(tf32_flags_on):
    """A prediction within half a grey level of its target: with SSIM's blur in TF32 its loss
    was -0.0033 where IEEE float32 gives +0.0017 (a negative loss near convergence, and a
    validation loss `depthcli evaluate` did not reproduce)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    target = (0.2 + 0.6 * yy + 0.1 * (xx > 0.5)).expand(4, 1, 64, 64).contiguous()
    pred0 = (target + (torch.rand(target.shape, generator=g) - 0.5) / 255).clamp(0, 1)
    results = []
    for mode in (EmulatedTF32, contextlib.nullcontext):
        pred = pred0.clone().requires_grad_()
        with mode():
            loss = head_loss(pred, target, LossWeights())
            loss.backward()
        results.append((loss.item(), pred.grad.flatten()))
    (tf32_loss, tf32_grad), (ieee_loss, ieee_grad) = results
    assert ieee_loss > 0
    assert tf32_loss >= 0 and tf32_loss == pytest.approx(ieee_loss, rel=0.1)
    assert torch.nn.functional.cosine_similarity(tf32_grad, ieee_grad, dim=0) > 0.99
