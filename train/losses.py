"""Training loss: per head w_ssim·(1 − SSIM) + w_l1·L1 + w_edge·edge, plus w_bce·BCE and
w_dice·Dice on the mask head (whose SSIM/L1/edge terms `mask_image_terms` can switch off);
total = mask + depth.

    from train.losses import LossWeights, total_loss
    loss, parts = total_loss(mask_pred, depth_pred, batch["mask"], batch["depth"], LossWeights())
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim

# Sobel kernels divided by 8, so a ramp rising by s per pixel has gradient exactly s: the edge
# term is then in the same units as L1 and w_edge = 1 weighs them alike.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
_SOBEL_Y = _SOBEL_X.t()
SSIM_WIN, SSIM_SIGMA = 11, 1.5  # pytorch-msssim's defaults


@lru_cache(maxsize=8)
def _kernels(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sobel x, Sobel y and SSIM's 1-D Gaussian window, made once per device and dtype: a
    host-to-device copy on every call would be a stream synchronization on every step."""
    coords = torch.arange(SSIM_WIN, dtype=torch.float) - SSIM_WIN // 2
    g = torch.exp(-(coords ** 2) / (2 * SSIM_SIGMA ** 2))
    win = (g / g.sum()).view(1, 1, 1, SSIM_WIN)  # as pytorch_msssim builds it, for one channel
    return tuple(k.to(device, dtype) for k in (_SOBEL_X.view(1, 1, 3, 3), _SOBEL_Y.reshape(1, 1, 3, 3), win))


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
    # Whether the mask head also gets the image terms above (SSIM, L1, edge), as the reference did.
    mask_image_terms: bool = True


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical gradients of B×1×H×W maps. Replicate padding: a map that is flat
    at its border has zero gradient there, instead of a false edge against zero padding."""
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    kx, ky, _ = _kernels(x.device, x.dtype)
    return F.conv2d(x, kx), F.conv2d(x, ky)


def edge_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean |∂x pred − ∂x target| + mean |∂y pred − ∂y target|."""
    (px, py), (tx, ty) = sobel(pred), sobel(target)
    return (px - tx).abs().mean() + (py - ty).abs().mean()


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


def head_loss(pred: torch.Tensor, target: torch.Tensor, weights: LossWeights, bce: bool = False) -> torch.Tensor:
    """Loss of one head; pred and target are B×1×H×W in [0, 1], H and W at least 11 (the SSIM
    window). Computed in float32 with autocast off: SSIM's small constants (1e-4, 9e-4) and the
    differences of nearly equal means are lost in bf16."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        image_terms = not bce or weights.mask_image_terms  # bce: this is the mask head
        loss = pred.new_zeros(())
        if image_terms and weights.w_l1:
            loss = loss + weights.w_l1 * (pred - target).abs().mean()
        if image_terms and weights.w_ssim:
            loss = loss + weights.w_ssim * (1 - ssim(pred, target, data_range=1.0, size_average=True,
                                                           win=_kernels(pred.device, pred.dtype)[2]))
        if image_terms and weights.w_edge:
            loss = loss + weights.w_edge * edge_loss(pred, target)
        if bce and weights.w_bce:
            loss = loss + weights.w_bce * kl_bce(pred, target)
        if bce and weights.w_dice:
            loss = loss + weights.w_dice * dice_loss(pred, target)
        return loss


def total_loss(mask_pred: torch.Tensor, depth_pred: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor,
               weights: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mask loss + depth loss, {"mask": .., "depth": ..}); the parts are detached, for logging."""
    parts = {"mask": head_loss(mask_pred, mask, weights, bce=True), "depth": head_loss(depth_pred, depth, weights)}
    return parts["mask"] + parts["depth"], {k: v.detach() for k, v in parts.items()}
