"""The DALI graph: read shards, decode, resize, augment, hand batches to PyTorch.

One graph for the GPU (JPEG decoded by device="mixed", every op on the GPU) and the CPU
(device_id=None, the same ops on CPU threads). The four images of a sample are stacked into one
8-channel image (bg 3, fg_bg 3, mask 1, depth 1) before resize and geometry, so each geometric op
runs once per sample and is synchronized by construction; photometric ops then touch bg and
fg_bg only. Conditionals (`if coin:`) run an op only on the samples that drew it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.augment import Augment
from pipeline.loaders import LoaderError, Plan, split_channels, valid_mask
from pipeline.manifest import ROLES

READER = "Reader"
SHUFFLE_BUFFER = 1024  # shards are shuffled when packed; this mixes neighbouring shards too


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _geometry(x, aug: Augment):
    """Flips and rotation, drawn once per sample, on all eight channels at once."""
    if aug.hflip_p > 0 or aug.vflip_p > 0:
        x = fn.flip(x, horizontal=fn.random.coin_flip(probability=aug.hflip_p),
                    vertical=fn.random.coin_flip(probability=aug.vflip_p))
    if aug.rotate_p > 0 and _coin(aug.rotate_p):
        angle = fn.random.uniform(range=[-aug.rotate_deg, aug.rotate_deg])
        x = fn.rotate(x, angle=angle, fill_value=0, keep_size=True, interp_type=types.INTERP_LINEAR)
    return x


def _draws(aug: Augment) -> dict:
    """Every photometric parameter of one image (or of both, when shared)."""
    d = {"color": _coin(aug.color_p), "rgb": _coin(0.5), "noise": _coin(aug.noise_p), "dropout": _coin(aug.dropout_p),
         "shift": fn.random.uniform(range=[-aug.rgb_shift * 255, aug.rgb_shift * 255], shape=[3]),
         "hue": fn.random.uniform(range=[-aug.hue_deg, aug.hue_deg]),
         "sat": fn.random.uniform(range=[1 - aug.saturation, 1 + aug.saturation]),
         "val": fn.random.uniform(range=[1 - aug.value, 1 + aug.value]),
         "sigma": fn.random.uniform(range=[aug.noise_min * 255, aug.noise_max * 255])}
    # Holes: n = 1..max, each up to max_h × max_w of the image (at least half of that), inside it.
    n = aug.dropout_max_holes
    size = fn.random.uniform(range=[0.5, 1.0], shape=[n, 2]) * [aug.dropout_max_h, aug.dropout_max_w]
    used = fn.cast(fn.random.uniform(range=[0, n], shape=[n, 1]) < fn.random.uniform(range=[1, n + 1]), dtype=types.FLOAT)
    used = fn.stack(*([fn.constant(fdata=1.0, shape=[1])] + [used[i] for i in range(1, n)])) if n > 1 else used
    d["hole_shape"] = fn.reshape(size * used, shape=[2 * n])
    d["hole_anchor"] = fn.reshape(fn.random.uniform(range=[0, 1], shape=[n, 2]) * (1 - size), shape=[2 * n])
    return d


def _photometric(img, d: dict, aug: Augment):
    """Colour shift (RGB shift or HSV), Gaussian noise, coarse dropout: uint8 HWC in and out."""
    if aug.color_p > 0 and d["color"]:
        if d["rgb"]:
            img = fn.cast(dmath.clamp(fn.cast(img, dtype=types.FLOAT) + d["shift"], 0, 255), dtype=types.UINT8)
        else:
            img = fn.hsv(img, hue=d["hue"], saturation=d["sat"], value=d["val"])
    if aug.noise_p > 0 and d["noise"]:
        img = fn.noise.gaussian(img, stddev=d["sigma"])
    if aug.dropout_p > 0 and d["dropout"]:
        img = fn.erase(img, anchor=d["hole_anchor"], shape=d["hole_shape"], axis_names="HW", normalized=True, fill_value=0)
    return img


@pipeline_def(enable_conditionals=True)
def depthseg_pipeline(plan: Plan, res: int, aug: Augment, gpu: bool):
    """bg, fg_bg, mask, depth → one float B×8×res×res tensor in [0, 1] (CHW)."""
    raw = fn.readers.webdataset(
        paths=plan.tars, index_paths=plan.indexes, ext=[f"{r}.jpg;{r}.png" for r in ROLES],
        missing_component_behavior="error", name=READER, shard_id=plan.rank, num_shards=plan.world_size,
        random_shuffle=plan.train, initial_fill=SHUFFLE_BUFFER, stick_to_shard=not plan.train,
        pad_last_batch=not plan.train)
    device = "mixed" if gpu else "cpu"
    decoded = [fn.decoders.image(r, device=device, output_type=types.RGB if i < 2 else types.GRAY)
               for i, r in enumerate(raw)]
    x = fn.resize(fn.cat(*decoded, axis=2), size=[res, res], antialias=True)
    if plan.train:
        x = _geometry(x, aug)
        if aug.color_p > 0 or aug.noise_p > 0 or aug.dropout_p > 0:
            first = _draws(aug)
            second = first if aug.shared else _draws(aug)
            bg = _photometric(x[:, :, 0:3], first, aug)
            fg_bg = _photometric(x[:, :, 3:6], second, aug)
            x = fn.cat(bg, fg_bg, x[:, :, 6:8], axis=2)
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[255.0])


@contextmanager
def dali_errors(plan: Plan):
    """DALI reports a bad image as a long RuntimeError; give the user one sentence."""
    try:
        yield
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0] if lines else "?"
        shards = str(Path(plan.tars[0]).parent)
        raise LoaderError(f"DALI could not decode a sample of {shards} ({cause[:200]}); "
                          f"run `depthcli verify --decode {shards}` to find it.") from None


class DaliLoader:
    """The batch contract over a DALI pipeline; see pipeline.loaders for the epoch rules."""

    def __init__(self, plan: Plan, res: int, aug: Augment, device: str, seed: int, threads: int):
        self.plan = plan
        gpu = device.startswith("cuda")
        device_id = (torch.device(device).index or 0) if gpu else None
        # Different augmentation per rank; the reader's sharding does not depend on the seed.
        pipe = depthseg_pipeline(plan, res, aug, gpu, batch_size=plan.batch_size, num_threads=threads,
                                 device_id=device_id, seed=seed * 1000 + plan.rank, prefetch_queue_depth=2)
        self.device = torch.device(device)
        policy = LastBatchPolicy.DROP if plan.train else LastBatchPolicy.FILL
        with dali_errors(plan):  # the iterator runs the first batches already
            self.iterator = DALIGenericIterator(pipe, ["images"], reader_name=READER, last_batch_policy=policy,
                                                auto_reset=True)

    def __len__(self) -> int:
        return self.plan.batches

    def __iter__(self):
        with dali_errors(self.plan):
            yield from self._batches()

    def _batches(self):
        for i, out in enumerate(self.iterator):
            images = out[0]["images"]
            if images.device != self.device:
                images = images.to(self.device, non_blocking=True)
            yield split_channels(images, valid_mask(self.plan, i, len(images)) if not self.plan.train
                                 else torch.ones(len(images), dtype=torch.bool))

