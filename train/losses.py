"""Training loss: per head w_ssim·(1 − SSIM) + w_l1·L1 + w_edge·edge, plus w_bce·BCE,
w_dice·Dice and w_lovasz·Lovász on the mask head (whose SSIM/L1/edge terms `mask_image_terms`
can switch off); total = mask + depth.

    from train.losses import LossWeights, total_loss
    loss, parts = total_loss(mask_pred, depth_pred, batch["mask"], batch["depth"], LossWeights())
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

SSIM_WIN, SSIM_SIGMA, SSIM_K = 11, 1.5, (0.01, 0.03)  # pytorch-msssim's defaults


@lru_cache(maxsize=16)
def _blur_matrix(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n − 10)×n, each row SSIM's 1-D Gaussian window at one valid offset: M_h @ x @ M_wᵀ blurs
    x exactly as pytorch-msssim's two valid-padded 1-D convolutions do, in two matmuls, which
    on the CPU cost a quarter to a half of a one-channel convolution's time. Made once per size,
    device and dtype (a host-to-device copy each call would be a stream synchronization)."""
    coords = torch.arange(SSIM_WIN, dtype=torch.float64) - SSIM_WIN // 2
    g = torch.exp(-(coords ** 2) / (2 * SSIM_SIGMA ** 2)).float()
    g = g / g.sum()
    rows = [F.pad(g, (i, n - SSIM_WIN - i)) for i in range(n - SSIM_WIN + 1)]
    return torch.stack(rows).to(device, dtype)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of B×1×H×W maps, H and W at least 11, as pytorch_msssim.ssim computes it
    (Gaussian window 11, σ 1.5, valid padding, K = 0.01, 0.03), with the five blurred maps (x, y,
    x², y², xy) made in one pair of matmuls instead of ten convolutions."""
    if min(x.shape[-2:]) < SSIM_WIN:
        raise ValueError(f"SSIM needs maps of at least {SSIM_WIN}x{SSIM_WIN} pixels, got {tuple(x.shape[-2:])}")
    c1, c2 = (SSIM_K[0] * data_range) ** 2, (SSIM_K[1] * data_range) ** 2
    rows, cols = (_blur_matrix(n, x.device, x.dtype) for n in x.shape[-2:])
    mu_x, mu_y, xx, yy, xy = _Blur.apply(torch.cat([x, y, x * x, y * y, x * y], 1), rows, cols).unbind(1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    cs = (2 * (xy - mu_xy) + c2) / ((xx - mu_xx) + (yy - mu_yy) + c2)
    return ((2 * mu_xy + c1) / (mu_xx + mu_yy + c1) * cs).mean()


@contextmanager
def ieee_float32():
    """float32 matmuls in IEEE float32 inside, whatever TF32 (the trainer turns it on for CUDA) or
    torch.set_float32_matmul_precision("medium") (bf16 matmuls on some CPUs) say outside: SSIM's
    blur is two matmuls, and with 10-bit mantissas a near-perfect prediction's loss turned
    negative. The setting is a flag read at each call, so flipping it costs nothing (float64
    instead made the loss 2-3x slower on the CPU)."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class _Blur(torch.autograd.Function):
    """rows @ x @ colsᵀ, and its gradient rowsᵀ @ g @ cols, each in IEEE float32: backward runs
    after the loss returns, under whatever precision flags the caller has set by then."""

    @staticmethod
    def forward(ctx, x, rows, cols):
        ctx.save_for_backward(rows, cols)
        with ieee_float32():
            return rows @ x @ cols.mT

    @staticmethod
    def backward(ctx, grad):
        rows, cols = ctx.saved_tensors
        with ieee_float32():
            return rows.mT @ grad @ cols, None, None


@dataclass
class LossWeights:
    """Weights of the three terms, the same for both heads.

    0.84 / 0.16 is the SSIM/L1 mix of Zhao et al., "Loss Functions for Image Restoration with
    Neural Networks" (2017): SSIM keeps structure and contrast, L1 keeps absolute level, which
    SSIM ignores. The edge term at 1.0 sharpens object and depth boundaries, where both maps err
    most; with normalised Sobel kernels it is on L1's scale.
    """

    w_ssim: float = 0.84
    w_l1: float = 0.16
    w_edge: float = 1.0
    # Mask head only. With a sigmoid output, L1's gradient has the same size however close a
    # background pixel already is to 0, so on masks that are 95 % background the whole head is
    # pushed to saturation (logits near -40) and never recovers: the demo's mask IoU stayed 0.
    # BCE's gradient in logit space is p - y, which fades as background is right and stays large
    # where the object is missed. Taken minus the target's entropy (so, the KL divergence): the
    # same gradient, and a perfect prediction of a soft (JPEG) mask still scores 0.
    w_bce: float = 1.0
    # Mask head only: soft Dice over the batch (1 − 2|P∩G| / (|P| + |G|)), which weighs the
    # object as a whole however small it is.
    w_dice: float = 0.0
    # Mask head only: the Lovász extension of 1 − IoU over the batch (Berman et al., "The
    # Lovász-Softmax loss", CVPR 2018): equal to 1 − IoU on hard masks, convex between them, so
    # it optimises the metric itself, pixels at the object's boundary first (where the errors are).
    w_lovasz: float = 0.0
    # Whether the mask head also gets the image terms above (SSIM, L1, edge), as the reference did.
    mask_image_terms: bool = True


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical Sobel gradients of B×1×H×W maps, divided by 8 so that a ramp
    rising by s per pixel has gradient exactly s (the edge term is then in L1's units).
    Separable, as slices: a central difference one way, [1, 2, 1] / 4 the other. Replicate
    padding: a map that is flat at its border has zero gradient there, instead of a false edge
    against zero padding."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx, dy = (p[..., 2:] - p[..., :-2]) / 2, (p[..., 2:, :] - p[..., :-2, :]) / 2
    return ((dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]) / 4,
            (dy[..., :-2] + 2 * dy[..., 1:-1] + dy[..., 2:]) / 4)


def edge_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean |∂x pred − ∂x target| + mean |∂y pred − ∂y target|, as the gradients of the
    difference: Sobel and replicate padding are linear, so one pass instead of two."""
    gx, gy = sobel(pred - target)
    return gx.abs().mean() + gy.abs().mean()


def kl_bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean KL(target ‖ pred) per pixel = BCE − H(target). The prediction is clamped to
    [1e-7, 1 − 1e-7] before the logs: a float32 sigmoid saturates to exactly 0 or 1, where
    clamping log's output instead (as F.binary_cross_entropy's −100) leaves a 0 · ∞ = NaN
    gradient that turned the weights NaN under a finite loss. A NaN prediction still gives a
    NaN loss (which the trainer reports) instead of an exception."""
    p = pred.clamp(1e-7, 1 - 1e-7)
    log_p, log_q = p.log(), (1 - p).log()
    return (torch.xlogy(target, target) - target * log_p
            + torch.xlogy(1 - target, 1 - target) - (1 - target) * log_q).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice of the whole batch; eps keeps an empty target and prediction at 0."""
    inter = (pred * target).sum()
    return 1 - (2 * inter + eps) / (pred.sum() + target.sum() + eps)


def lovasz_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovász-softmax's foreground term on probabilities over the whole batch (the metric's IoU
    is the set's, not a mean of images'): the errors |y − p| sorted, each weighted by how much
    1 − IoU grows when its pixel joins the wrong set (targets > 0.5 are the object)."""
    errors = (target - pred).abs().flatten()
    errors, order = errors.sort(descending=True)
    gt = (target.flatten()[order] > 0.5).float()
    total = gt.sum()
    jaccard = 1 - (total - gt.cumsum(0)) / (total + (1 - gt).cumsum(0))
    jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return (errors * jaccard).sum()  # not a dot product: TF32 and bf16 matmul settings never reach it


def head_loss(pred: torch.Tensor, target: torch.Tensor, weights: LossWeights, bce: bool = False) -> torch.Tensor:
    """Loss of one head; pred and target are B×1×H×W in [0, 1], H and W at least 11 (the SSIM
    window). Computed in float32 with autocast off, SSIM's blur in IEEE float32 (_Blur): its
    small constants (1e-4, 9e-4) and the differences of nearly equal means are lost in bf16 and
    in TF32."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        image_terms = not bce or weights.mask_image_terms  # bce: this is the mask head
        loss = pred.new_zeros(())
        if image_terms and weights.w_l1:
            loss = loss + weights.w_l1 * (pred - target).abs().mean()
        if image_terms and weights.w_ssim:
            loss = loss + weights.w_ssim * (1 - ssim(pred, target))
        if image_terms and weights.w_edge:
            loss = loss + weights.w_edge * edge_loss(pred, target)
        if bce and weights.w_bce:
            loss = loss + weights.w_bce * kl_bce(pred, target)
        if bce and weights.w_dice:
            loss = loss + weights.w_dice * dice_loss(pred, target)
        if bce and weights.w_lovasz:
            loss = loss + weights.w_lovasz * lovasz_loss(pred, target)
        return loss


def total_loss(mask_pred: torch.Tensor, depth_pred: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor,
               weights: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mask loss + depth loss, {"mask": .., "depth": ..}); the parts are detached, for logging."""
    parts = {"mask": head_loss(mask_pred, mask, weights, bce=True), "depth": head_loss(depth_pred, depth, weights)}
    return parts["mask"] + parts["depth"], {k: v.detach() for k, v in parts.items()}
