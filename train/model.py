"""The networks: bg and fg_bg in, mask and depth out.

    from train.model import build_model
    mask, depth = build_model("reference", dropout=0.2)(torch.cat([bg, fg_bg], 1))

The reference network (3,165,170 parameters) is a small two-stream ResNet encoder with two U-Net
style decoders:

    per stream (bg, fg_bg)  conv3x3 3->32 + BN + ReLU, 2 BasicBlocks(32)        H      2 x 38,048
    concatenate             64 channels                                        H      (skip 2)
    stage 1                 BasicBlock(64->128, stride 2) + BasicBlock(128)    H/2    525,568 (skip 1)
    stage 2                 BasicBlock(128->256, stride 2) + BasicBlock(256)   H/4    2,099,712
    decoder (F = 64 mask, 128 depth)
        1x1 conv 256->F + LeakyReLU
        up 1: ConvTranspose2d(F, F, 2, 2), concat skip 1, 3x3 (F+128 -> F/2), 3x3 (F/2 -> F/2)
        up 2: ConvTranspose2d(F/2, F/2, 2, 2), concat skip 2, 3x3 (F/2+64 -> F/4), 3x3 (F/4 -> F/4)
        3x3 conv F/4 -> 1, sigmoid                              mask 117,905; depth 345,889

The encoder is torchvision's convention (bias-free convs followed by BN, a 1x1 conv + BN
shortcut where the shape changes); the decoder has biased convs and no BN. Of the ResNet/U-Net
variants searched (bias, BN, blocks per stage, kernel sizes, decoder widths), this is the one
that follows the usual conventions throughout and gives exactly the reference's count.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.epoch import RES_MULTIPLE


class BasicBlock(nn.Module):
    """ResNet's BasicBlock, with dropout between its two convs (where Wide-ResNets put it), so
    the residual path is regularised but the shortcut never is."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def stem(dropout: float, cin: int = 3) -> nn.Sequential:
    """One image (3 channels, or `cin`) to 32 full-resolution features."""
    return nn.Sequential(
        nn.Conv2d(cin, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        BasicBlock(32, 32, dropout=dropout), BasicBlock(32, 32, dropout=dropout),
    )


def stage(cin: int, cout: int, dropout: float) -> nn.Sequential:
    """Halve the resolution, widen to `cout`: a strided block then a plain one (as ResNet-18)."""
    return nn.Sequential(BasicBlock(cin, cout, 2, dropout), BasicBlock(cout, cout, 1, dropout))


def conv_lrelu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True))


class Up(nn.Module):
    """×2 transposed conv, concatenate the encoder's skip at that resolution, two 3x3 convs that
    halve the width (U-Net's habit: fewer features as resolution grows)."""

    def __init__(self, cin: int, skip: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, 2, 2)
        self.convs = nn.Sequential(conv_lrelu(cin + skip, cin // 2), conv_lrelu(cin // 2, cin // 2))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], 1))


class Decoder(nn.Module):
    """Bottleneck (256 channels, H/4) to one map at H, in [0, 1]."""

    def __init__(self, features: int):
        super().__init__()
        # A nonlinearity after the 1x1 conv, else it and the transposed conv would be one linear map.
        self.reduce = nn.Sequential(nn.Conv2d(256, features, 1), nn.LeakyReLU(0.2, inplace=True))
        self.up1 = Up(features, 128)
        self.up2 = Up(features // 2, 64)
        self.out = nn.Conv2d(features // 4, 1, 3, 1, 1)

    def forward(self, bottleneck: torch.Tensor, skip1: torch.Tensor, skip2: torch.Tensor) -> torch.Tensor:
        x = self.up2(self.up1(self.reduce(bottleneck), skip1), skip2)
        # Sigmoid, not logits: both targets are images in [0, 1], and the SSIM term of the loss
        # (data_range=1) and the metrics need predictions on the same scale.
        # In float32 even under bf16 autocast: bf16 rounds probabilities near 1 to exactly 1,
        # where the mask's BCE term has no gradient.
        return torch.sigmoid(self.out(x).float())


class ReferenceNet(nn.Module):
    """The reference two-stream encoder with a mask decoder (64 features) and a depth decoder
    (128: depth is the harder, denser target). Input B×6×H×W, H and W multiples of 4.

    diff=True (the "diff" model): the fg_bg stream also sees |fg_bg − bg| (3 more input
    channels, 864 more weights), the cue a change detector starts from."""

    def __init__(self, dropout: float = 0.2, diff: bool = False):
        super().__init__()
        self.diff = diff
        self.bg_stem, self.fg_bg_stem = stem(dropout), stem(dropout, 6 if diff else 3)
        self.stage1 = stage(64, 128, dropout)
        self.stage2 = stage(128, 256, dropout)
        self.mask_head, self.depth_head = Decoder(64), Decoder(128)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-2] % RES_MULTIPLE or x.shape[-1] % RES_MULTIPLE:
            # Two stride-2 stages and two ×2 upsamplings: other sizes cannot meet their skips.
            raise ValueError(f"input height and width must be multiples of {RES_MULTIPLE}, got {tuple(x.shape[-2:])}")
        bg, fg_bg = x[:, :3], x[:, 3:]
        if self.diff:
            fg_bg = torch.cat([fg_bg, (fg_bg - bg).abs()], 1)
        skip2 = torch.cat([self.bg_stem(bg), self.fg_bg_stem(fg_bg)], 1)
        skip1 = self.stage1(skip2)
        bottleneck = self.stage2(skip1)
        return self.mask_head(bottleneck, skip1, skip2), self.depth_head(bottleneck, skip1, skip2)


# --- the efficient family: one early-fusion encoder, two U-Net decoders ----------------------
# Chosen on scripts/bench_quality.py (BENCHMARKS.md, "Choosing the unet"): a 16-channel conv at
# full resolution, two convs per decoder step and nearest upsampling beat the prototype
# per sample and per minute; bilinear's backward alone was 16-19% of a step.

def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """bg, fg_bg and |fg_bg − bg| (9 channels): one light conv at full resolution (`full_res`
    features), a stride-2 stem (two 3x3 convs), then one stage of `blocks` BasicBlocks per
    further halving, down to H/32, whose receptive field covers a 224 px image. Returns the
    features at every resolution: [input + full-res features (H), stem (H/2), .., bottleneck]."""

    def __init__(self, widths: tuple[int, ...], full_res: int, blocks: int = 2, dropout: float = 0.0, cin: int = 9):
        super().__init__()
        self.full = conv_bn_relu(cin, full_res)
        self.stem = nn.Sequential(conv_bn_relu(full_res, widths[0], 2), conv_bn_relu(widths[0], widths[0]))
        self.stages = nn.ModuleList(
            nn.Sequential(BasicBlock(a, b, 2, dropout), *(BasicBlock(b, b, 1, dropout) for _ in range(blocks - 1)))
            for a, b in zip(widths, widths[1:]))
        self.out_channels = (cin + full_res, *widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.full(x)
        feats = [torch.cat([x, f], 1), self.stem(f)]
        for stage_ in self.stages:
            feats.append(stage_(feats[-1]))
        return feats


class UNetDecoder(nn.Module):
    """From the bottleneck up to H, one step per encoder resolution: nearest ×2, the encoder's
    features at that resolution concatenated, `convs` 3x3 conv + BN + ReLU (one at full
    resolution, where the input itself is the skip, so thin parts of a mask stay sharp)."""

    def __init__(self, encoder_channels: tuple[int, ...], widths: tuple[int, ...], convs: int = 2):
        super().__init__()
        skips = encoder_channels[-2::-1]  # from the resolution below the bottleneck up to the input
        assert len(widths) == len(skips), (widths, skips)
        cins = (encoder_channels[-1], *widths[:-1])
        n = [convs] * (len(widths) - 1) + [1]
        self.steps = nn.ModuleList(nn.Sequential(conv_bn_relu(c + s, w), *(conv_bn_relu(w, w) for _ in range(k - 1)))
                                   for c, s, w, k in zip(cins, skips, widths, n))
        self.out = nn.Conv2d(widths[-1], 1, 3, 1, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for step, skip in zip(self.steps, reversed(feats[:-1])):
            # To the skip's size, not ×2: a stride-2 conv rounds odd sizes up, so any H and W work.
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            # The input (a float32 skip) in x's dtype: else the concatenation is float32 at full
            # resolution and autocast casts it back to bf16 for the conv.
            x = step(torch.cat([x, skip.to(x.dtype)], 1))
        return torch.sigmoid(self.out(x).float())  # float32 under autocast: see Decoder.forward


class UNet(nn.Module):
    """The efficient dual-decoder model: early fusion of bg, fg_bg and the change cue
    |fg_bg − bg|, one shared encoder, a mask decoder and a (wider) depth decoder. `width`
    scales every channel count. Input B×6×H×W, any H and W."""

    def __init__(self, width: float = 1.0, dropout: float = 0.0, blocks: int = 2,
                 encoder: tuple[int, ...] = (32, 64, 96, 144, 192), full_res: int = 16,
                 mask: tuple[int, ...] = (64, 48, 48, 32, 16), depth: tuple[int, ...] = (128, 96, 64, 48, 24)):
        super().__init__()
        scale = lambda ws: tuple(max(8, int(round(w * width / 8)) * 8) for w in ws)  # noqa: E731 (multiples of 8)
        self.encoder = Encoder(scale(encoder), scale((full_res,))[0], blocks, dropout)
        self.mask_head = UNetDecoder(self.encoder.out_channels, scale(mask))
        self.depth_head = UNetDecoder(self.encoder.out_channels, scale(depth))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bg, fg_bg = x[:, :3], x[:, 3:]
        feats = self.encoder(torch.cat([bg, fg_bg, (fg_bg - bg).abs()], 1))
        return self.mask_head(feats), self.depth_head(feats)


# name -> constructor(dropout=...); add variants here and they become `--model` choices.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "reference": ReferenceNet, "diff": partial(ReferenceNet, diff=True),
    "unet-s": partial(UNet, width=0.75), "unet": UNet, "unet-l": partial(UNet, width=1.5),
}


def init_output_bias(model: nn.Module, mask_prior: float, depth_prior: float) -> None:
    """Start each head's sigmoid at its target's mean (the foreground fraction; the mean depth)
    instead of 0.5, so the first steps learn where things are rather than the overall level
    (the focal-loss paper's prior init). A prior of 0 leaves PyTorch's default (bias ~ 0)."""
    for head, prior in ((model.mask_head, mask_prior), (model.depth_head, depth_prior)):
        if prior:
            nn.init.constant_(head.out.bias, math.log(prior / (1 - prior)))


def build_model(name: str = "reference", dropout: float = 0.2) -> nn.Module:
    """The model `name` from MODELS; its forward maps B×6×H×W to (mask, depth), each B×1×H×W in [0, 1]."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](dropout=dropout)
