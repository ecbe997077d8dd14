"""The torch loader's augmentation: the field's libraries, with the `Augment` settings mapped onto
their parameters (the reading and decoding are pipeline.torch_loader's):
- CPU: albumentations, one sample at a time in the workers (OpenCV's SIMD kernels). The four
  images are targets of one geometric transform, so flips and rotation are drawn once per sample
  and labels rotate with nearest neighbour; colour, noise and dropout are a second transform,
  applied to bg and fg_bg (one call for both when `shared`, else one each).
- GPU: kornia.augmentation on whole batches on the device, parameters drawn per sample, every
  skip a `torch.where`: no host-device synchronization per batch.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

from pipeline.augment import Augment


# --- CPU: albumentations, one sample at a time in the workers -------------------------------------

class _GaussNoise(A.GaussNoise):
    """A.GaussNoise for uint8 images, with σ drawn once per call and the noise drawn for each
    image target, in float32 by cv2.randn and added by cv2.add. The stock op draws one float64
    map, converts it and adds through float copies of the image (about 3× the cost: the largest
    op of a 224 px sample), and adds that same map to every target: with `Augment.shared`,
    fg_bg − bg would stay exactly 0 outside the object."""

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        return {"sigma": self.py_random.uniform(*self.std_range)}

    def apply(self, img: np.ndarray, sigma: float, **params) -> np.ndarray:
        cv2.setRNGSeed(int(self.random_generator.integers(2**31)))  # OpenCV's generator, seeded from ours
        noise = np.empty(img.shape, np.float32)
        cv2.randn(noise.reshape(len(img), -1), 0.0, sigma * 255)  # as one channel: every value drawn
        return cv2.add(img, noise, dtype=cv2.CV_8U)  # rounds and saturates, without float copies of img


class _Rotate(A.Rotate):
    """A.Rotate with its matrix from one cv2.getRotationMatrix2D and each target warped by a bare
    cv2.warpAffine. The stock op builds two 3×3 matrices per sample and, for each of the four
    targets, tests its matrix against the identity with np.allclose: at 64 px that Python costs
    about 3× the warps themselves. Same draw (angle ~ U(limit)), centre and fill (0) as the stock op."""

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        h, w = params["shape"][:2]
        return {"matrix": cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), self.py_random.uniform(*self.limit), 1.0)}

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params) -> np.ndarray:
        return self._warp(img, matrix, self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, matrix: np.ndarray, **params) -> np.ndarray:
        return self._warp(mask, matrix, self.mask_interpolation)

    def _warp(self, img: np.ndarray, matrix: np.ndarray, interpolation: int) -> np.ndarray:
        return cv2.warpAffine(img, matrix, img.shape[1::-1], flags=interpolation, borderMode=self.border_mode, borderValue=0)


def cpu_transforms(aug: Augment) -> tuple[A.Compose, A.Compose]:
    """(geometry for all four images, photometric for bg and fg_bg), `aug` in albumentations' terms:
    angles in degrees; RGB shift and noise σ as fractions of 255 (albumentations reads limits
    <= 1 that way); HSV as ColorJitter's factors (hue in turns, saturation and value multiplied:
    value = brightness, saturation blends with grey as torchvision's and kornia's do); holes as
    fractions of the side, 0.5–1× of dropout_max_h × dropout_max_w."""
    interp = cv2.INTER_LINEAR if aug.rotate_interp == "linear" else cv2.INTER_NEAREST
    geometry = A.Compose([
        A.HorizontalFlip(p=aug.hflip_p),
        A.VerticalFlip(p=aug.vflip_p),
        _Rotate(limit=aug.rotate_deg, interpolation=interp, mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=aug.rotate_p),
    ], additional_targets={"fg_bg": "image", "depth": "mask"})
    shift = (-aug.rgb_shift, aug.rgb_shift)
    photometric = A.Compose([
        A.OneOf([A.RGBShift(r_shift_limit=shift, g_shift_limit=shift, b_shift_limit=shift, p=1),
                 A.ColorJitter(brightness=(1 - aug.value, 1 + aug.value), contrast=(1, 1),
                               saturation=(1 - aug.saturation, 1 + aug.saturation),
                               hue=(-aug.hue_deg / 360, aug.hue_deg / 360), p=1)], p=aug.color_p),
        _GaussNoise(std_range=(aug.noise_min, aug.noise_max), mean_range=(0, 0), per_channel=True, p=aug.noise_p),
        A.CoarseDropout(num_holes_range=(1, aug.dropout_max_holes),
                        hole_height_range=(aug.dropout_max_h / 2, aug.dropout_max_h),
                        hole_width_range=(aug.dropout_max_w / 2, aug.dropout_max_w), fill=0, p=aug.dropout_p),
    ], additional_targets={"fg_bg": "image"})
    return geometry, photometric


# --- GPU: kornia.augmentation on whole batches on the device --------------------------------------

class DeviceAugment(torch.nn.Module):
    """Float B×8×H×W batches (bg, fg_bg, mask, depth) on the device → augmented, with kornia.
    Every parameter is drawn per sample: kornia's own on the CPU (moved without blocking), the
    one-of choice, noise and holes here on the device; skipped samples are kept by torch.where,
    so nothing waits for the device. Same mapping of `Augment` as cpu_transforms."""

    def __init__(self, aug: Augment):
        import kornia.augmentation as K

        super().__init__()
        self.aug = aug
        resample = "bilinear" if aug.rotate_interp == "linear" else "nearest"
        # "mask" keys are resampled with nearest neighbour; flips and angle are drawn once per sample.
        self.geometry = K.AugmentationSequential(
            K.RandomHorizontalFlip(p=aug.hflip_p), K.RandomVerticalFlip(p=aug.vflip_p),
            K.RandomRotation(aug.rotate_deg, resample=resample, p=aug.rotate_p), data_keys=["input", "mask"])
        s = aug.rgb_shift
        self.rgb_shift = K.RandomRGBShift((-s, s), (-s, s), (-s, s), p=1.0)
        self.jitter = K.ColorJitter(brightness=(1 - aug.value, 1 + aug.value), saturation=(1 - aug.saturation, 1 + aug.saturation),
                                    hue=(-aug.hue_deg / 360, aug.hue_deg / 360), p=1.0,
                                    order=(0, 2, 3))  # a fixed order is branch-free: a random one tests factors in Python
        self.erase = K.RandomErasing(value=0.0, p=1.0)  # holes drawn by _holes: kornia's are area × aspect

    def _holes(self, n: int, h: int, w: int, on: torch.Tensor, device) -> list[dict]:
        """RandomErasing's parameters, one dict per possible hole: 1..max_holes holes a sample,
        each 0.5–1× of max_h × max_w and inside the image; an unused hole is an empty box."""
        a = self.aug
        count = torch.randint(1, a.dropout_max_holes + 1, (n,), device=device)
        out = []
        for k in range(a.dropout_max_holes):
            heights = ((torch.rand(n, device=device) * 0.5 + 0.5) * a.dropout_max_h * h).round()
            widths = ((torch.rand(n, device=device) * 0.5 + 0.5) * a.dropout_max_w * w).round()
            widths = torch.where(on & (count > k), widths, 0.0)
            out.append({"xs": (torch.rand(n, device=device) * (w - widths + 1)).floor(),
                        "ys": (torch.rand(n, device=device) * (h - heights + 1)).floor(),
                        "widths": widths, "heights": heights, "values": torch.zeros(n, device=device),
                        "batch_prob": torch.ones(n, dtype=torch.bool)})
        return out

    def draws(self, img: torch.Tensor) -> dict:
        """Every photometric parameter of each image of a batch, drawn on its device."""
        a, (n, _, h, w), dev = self.aug, img.shape, img.device
        coin = lambda p: torch.rand(n, device=dev) < p  # noqa: E731
        return {"color": coin(a.color_p), "rgb": coin(0.5), "noise": coin(a.noise_p),
                "sigma": torch.rand(n, device=dev) * (a.noise_max - a.noise_min) + a.noise_min,
                "holes": self._holes(n, h, w, coin(a.dropout_p), dev)}

    def photometric(self, img: torch.Tensor, d: dict) -> torch.Tensor:
        """Colour shift (RGB shift or HSV, one of the two per sample), Gaussian noise, dropout."""
        per = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
        img = torch.where(per(d["color"] & d["rgb"]), self.rgb_shift(img),
                          torch.where(per(d["color"]), self.jitter(img), img))
        # kornia's RandomGaussianNoise has one fixed sigma; ours is drawn per sample.
        img = (img + torch.randn_like(img) * per(d["sigma"] * d["noise"])).clamp_(0, 1)
        for hole in d["holes"]:
            img = self.erase(img, params=dict(hole))
        return img

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, labels = self.geometry(x[:, 0:6], x[:, 6:8])
        bg, fg_bg = images[:, 0:3], images[:, 3:6]
        if self.aug.color_p > 0 or self.aug.noise_p > 0 or self.aug.dropout_p > 0:
            if self.aug.shared:  # one set of draws for both; randn_like gives each its own noise pixels
                d = _twice(self.draws(bg))
                bg, fg_bg = self.photometric(torch.cat([bg, fg_bg]), d).chunk(2)
            else:
                bg, fg_bg = self.photometric(bg, self.draws(bg)), self.photometric(fg_bg, self.draws(fg_bg))
        return torch.cat([bg, fg_bg, labels], 1)


def _twice(d: dict) -> dict:
    """Draws for a batch made of the same batch twice (bg then fg_bg)."""
    return {k: [_twice(h) for h in v] if isinstance(v, list) else torch.cat([v, v]) for k, v in d.items()}


def augment_on_device(device: torch.device) -> bool:
    """Whole batches with kornia on a GPU; per sample with albumentations in the CPU workers."""
    return device.type == "cuda"
