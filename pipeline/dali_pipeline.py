"""The DALI graph: samples fed in pipeline.epoch's order, decoded, resized, augmented, handed
to PyTorch.

One graph for the GPU (JPEG decoded by device="mixed", every op on the GPU) and the CPU
(device_id=None, the same ops on CPU threads). A sample travels as three images: bg, fg_bg and
its labels (mask and depth stacked, 2 channels). Every geometric parameter is drawn once per
sample and the same node is given to the op of each image, so geometry is synchronized by
construction; photometric ops touch bg and fg_bg only. Conditionals (`if coin:`) run an op only
on the samples that drew it. Costs per op on the CPU are in BENCHMARKS.md.
"""

from __future__ import annotations

import io
import weakref
from contextlib import contextmanager
from functools import lru_cache

import nvidia.dali.math as dmath
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image

from pipeline.augment import Augment
from pipeline.epoch import Deal, derive_seed, to_contract
from pipeline.manifest import ROLES, LoaderError
from pipeline.reader import SampleReader
# Share of JPEGs the mixed decoder gives the GPU's hardware JPEG engines (A100, H100); the rest
# are Huffman-decoded on CPU threads. DALI's default is 0.65; scripts/gpu_check.sh sweeps it.
HW_DECODER_LOAD = 0.9


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _resize(images: list, res: int, gpu: bool) -> list:
    """Antialiased resize to res×res. On the CPU it is skipped for samples already at res (a
    224→224 resize of the four images costs more than decoding them)."""
    if gpu:
        return [fn.resize(x, size=[res, res], antialias=True) for x in images]
    shape = images[0].shape()  # the four images of a sample share a size (checked when sharding)
    if (shape[0] != res) | (shape[1] != res):
        images = [fn.resize(x, size=[res, res], antialias=True) for x in images]
    return images


def _geometry(images: list, aug: Augment) -> list:
    """Flips and rotation: each parameter drawn once per sample and given to every image's op.
    The labels (last) rotate with nearest neighbour: no blended mask values or depths across an
    edge, and DALI's CPU linear warp costs 12× OpenCV's (BENCHMARKS.md)."""
    if aug.hflip_p > 0 or aug.vflip_p > 0:
        h, v = fn.random.coin_flip(probability=aug.hflip_p), fn.random.coin_flip(probability=aug.vflip_p)
        images = [fn.flip(x, horizontal=h, vertical=v) for x in images]
    if aug.rotate_p > 0 and _coin(aug.rotate_p):
        angle = fn.random.uniform(range=[-aug.rotate_deg, aug.rotate_deg])
        image_interp = types.INTERP_LINEAR if aug.rotate_interp == "linear" else types.INTERP_NN
        images = [fn.rotate(x, angle=angle, fill_value=0, keep_size=True,
                            interp_type=types.INTERP_NN if i == len(images) - 1 else image_interp)
                  for i, x in enumerate(images)]
    return images


def _draws(aug: Augment) -> dict:
    """Every photometric parameter of one image (or of both, when shared)."""
    n = aug.dropout_max_holes
    # Holes: 1..n of them, each at least half of max_h × max_w, inside the image.
    size = fn.random.uniform(range=[0.5, 1.0], shape=[n, 2]) * [aug.dropout_max_h, aug.dropout_max_w]
    holes = fn.random.uniform(values=[float(k) for k in range(1, n + 1)])
    used = fn.cast(types.Constant(np.arange(n, dtype=np.float32).reshape(n, 1)) < holes, dtype=types.FLOAT)
    return {"color": _coin(aug.color_p), "rgb": _coin(0.5), "noise": _coin(aug.noise_p), "dropout": _coin(aug.dropout_p),
            "shift": fn.random.uniform(range=[-aug.rgb_shift * 255, aug.rgb_shift * 255], shape=[3]),
            "hue": fn.random.uniform(range=[-aug.hue_deg, aug.hue_deg]),
            "sat": fn.random.uniform(range=[1 - aug.saturation, 1 + aug.saturation]),
            "val": fn.random.uniform(range=[1 - aug.value, 1 + aug.value]),
            "noise_level": fn.random.uniform(values=[float(k) for k in range(noise_levels(aug))]),
            "noise_at": fn.random.uniform(range=[0, 1], shape=[2]),
            "hole_shape": fn.reshape(size * used, shape=[2 * n]),
            "hole_anchor": fn.reshape(fn.random.uniform(range=[0, 1], shape=[n, 2]) * (1 - size), shape=[2 * n])}


NOISE_STEP = 1.0  # sigma levels of the CPU's noise bank, in pixel values
NOISE_MARGIN = 64  # a bank block is res + this on a side: MARGIN² window positions per level


def noise_levels(aug: Augment) -> int:
    return int(round((aug.noise_max - aug.noise_min) * 255 / NOISE_STEP)) + 1


@lru_cache(maxsize=4)
def noise_bank(res: int, aug: Augment) -> np.ndarray:
    """The CPU's Gaussian noise: int8 pixel offsets, one (res + 64)² block per sigma level from
    noise_min to noise_max in steps of 1/255, stacked along the height. A noisy image adds a
    random res×res window of a random level: per-pixel i.i.d. within the image and rounded to
    whole pixel values, as any uint8 image's noise is; 10× cheaper than fn.noise.gaussian's
    res²×3 normal draws per image on the CPU (BENCHMARKS.md). Kept small because DALI passes a
    constant to its graph as a list (about 1 s to build per million values)."""
    side = res + NOISE_MARGIN
    sigmas = aug.noise_min * 255 + NOISE_STEP * np.arange(noise_levels(aug))
    z = np.random.default_rng(0).standard_normal((len(sigmas), side, side, 3))
    noise = np.clip(np.round(z * sigmas[:, None, None, None]), -127, 127).astype(np.int8)
    return noise.reshape(len(sigmas) * side, side, 3)


def _noise(img, d: dict, aug: Augment, bank, res: int):
    """Gaussian noise: exact draws on the GPU (bank is None), where they are cheap; a window of
    the bank (a graph constant, noise_bank's array) on the CPU."""
    if bank is None:
        return fn.noise.gaussian(img, stddev=aug.noise_min * 255 + d["noise_level"] * NOISE_STEP)
    levels, side = noise_levels(aug), res + NOISE_MARGIN
    # A random level (block) and a random window in it; crop_pos_y is relative to the whole bank.
    y = (d["noise_level"] * side + d["noise_at"][1] * (side - res)) / (levels * side - res)
    window = fn.crop(bank, crop=(res, res), crop_pos_x=d["noise_at"][0], crop_pos_y=y)
    return fn.cast(dmath.clamp(img + window, 0, 255), dtype=types.UINT8)


def _photometric(img, d: dict, aug: Augment, bank, res: int):
    """Colour shift (RGB shift or HSV), Gaussian noise, coarse dropout: uint8 HWC in and out."""
    if aug.color_p > 0 and d["color"]:
        if d["rgb"]:  # x + shift per channel, saturated to uint8, in one pass
            img = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="HWC", mean=-d["shift"], std=[1.0])
        else:
            img = fn.hsv(img, hue=d["hue"], saturation=d["sat"], value=d["val"])
    if aug.noise_p > 0 and d["noise"]:
        img = _noise(img, d, aug, bank, res)
    if aug.dropout_p > 0 and d["dropout"]:
        img = fn.erase(img, anchor=d["hole_anchor"], shape=d["hole_shape"], axis_names="HW", normalized=True, fill_value=0)
    return img


@pipeline_def(enable_conditionals=True)
def depthseg_pipeline(feed, train: bool, res: int, aug: Augment, gpu: bool, hw_decoder_load: float = HW_DECODER_LOAD,
                      size_hint: tuple[int, int] = (0, 0)):
    """Encoded samples from `feed` (a BatchFeed) → bg (3), fg_bg (3), labels (mask and depth, 2):
    float CHW in [0, 1], and each sample's ids (epoch, shard, sample) as they came. On the GPU,
    size_hint (width, height of the stored images) lets the hardware decoder allocate once."""
    *raw, ids = fn.external_source(source=feed, num_outputs=len(ROLES) + 1, batch=True, batch_info=True,
                                   dtype=[types.UINT8] * len(ROLES) + [types.INT64])
    device = "mixed" if gpu else "cpu"
    hw = {"hw_decoder_load": hw_decoder_load, "preallocate_width_hint": size_hint[0],
          "preallocate_height_hint": size_hint[1]} if gpu else {}
    bg, fg_bg, mask, depth = [fn.decoders.image(r, device=device, output_type=types.RGB if i < 2 else types.GRAY, **hw)
                              for i, r in enumerate(raw)]
    images = _resize([bg, fg_bg, fn.cat(mask, depth, axis=2)], res, gpu)  # labels share every op
    if train:
        images = _geometry(images, aug)
        if aug.color_p > 0 or aug.noise_p > 0 or aug.dropout_p > 0:
            bank = None if gpu or aug.noise_p == 0 else types.Constant(noise_bank(res, aug), layout="HWC")
            first = _draws(aug)
            # Shared: the same decisions and levels, but each image its own noise pixels.
            second = {**first, "noise_at": fn.random.uniform(range=[0, 1], shape=[2])} if aug.shared else _draws(aug)
            images[0] = _photometric(images[0], first, aug, bank, res)
            images[1] = _photometric(images[1], second, aug, bank, res)
    return (*(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[255.0])
              for x in images), ids)


def stored_size(feed: "BatchFeed") -> tuple[int, int]:
    """(width, height) of the first sample's fg_bg, read from its header; (0, 0) if unreadable.
    The four images of a sample share a size, and a set usually has one size throughout."""
    try:
        epoch = feed.deal.first[0]
        fg_bg = feed.read(epoch, feed.deal.positions(epoch, 0)[:1])[1][0][1]
        with Image.open(io.BytesIO(fg_bg)) as img:
            return img.size
    except (OSError, LoaderError):
        return (0, 0)


@contextmanager
def dali_errors(shards: str):
    """DALI reports a bad image as a long RuntimeError; give the user one sentence. (A file that
    cannot be read is the feed's LoaderError already.)"""
    try:
        yield
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0] if lines else "?"
        cause = cause.lstrip(": ")
        if "decoders.image" in str(e):
            raise LoaderError(f"DALI could not decode a sample of {shards} ({cause[:200]}); "
                              f"run `depthcli verify --decode {shards}` to find it.") from None
        raise LoaderError(f"the DALI pipeline failed: {cause[:300]}") from None  # e.g. out of GPU memory


class BatchFeed:
    """external_source's callable: a BatchInfo → this rank's batch of that (epoch, iteration) in
    pipeline.epoch's order: each role's encoded images, and each sample's (epoch, shard, sample).
    DALI's epoch e of the loader is the run's epoch deal.first[0] + e. With a `window` (s3://
    through the cache), a batch waits for its shards to be fetched."""

    def __init__(self, deal: Deal, reader: SampleReader, window=None):
        self.deal, self.reader, self.window = deal, reader, window

    def read(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, list[list[bytes]]]:
        """(the samples at these positions of the epoch's order as (shard, sample) rows, their images)."""
        if self.window is not None:
            self.window.wait(epoch, positions)
        rows = self.deal.order.sequence(epoch)[positions]
        return rows, [self.reader.read(k, i) for k, i in rows.tolist()]

    def __call__(self, info):
        epoch = self.deal.first[0] + info.epoch_idx
        if info.iteration >= self.deal.batches(epoch):
            raise StopIteration
        rows, samples = self.read(epoch, self.deal.positions(epoch, info.iteration))
        # One dense B×3 array: DALI takes it in one copy, where a list costs a conversion a sample.
        ids = np.concatenate([np.full((len(rows), 1), epoch), rows], 1).astype(np.int64)
        return (*([np.frombuffer(s[r], np.uint8) for s in samples] for r in range(len(ROLES))), ids)


class _Feed:
    """What DALI's graph holds: its callable stays in reference cycles until some later garbage
    collection, so it gets only a weak reference, and the loader that owns the feed frees it (and
    the window's pins) as soon as the loader goes."""

    def __init__(self, feed: BatchFeed):
        self.ref = weakref.ref(feed)

    def __call__(self, info):
        feed = self.ref()
        if feed is None:  # the loader is gone; DALI may still be running ahead
            raise StopIteration
        return feed(info)


class DaliLoader:
    """The batch contract over a DALI pipeline fed in pipeline.epoch's order; see
    pipeline.loaders for the epoch rules. state() is DALI's checkpoint (every random draw, and
    the feed's epoch and iteration) with the deal's start, which the epochs it counts are from."""

    def __init__(self, deal: Deal, reader: SampleReader, res: int, aug: Augment, device: str, seed: int, threads: int,
                 hw_decoder_load: float = HW_DECODER_LOAD, state=None, window=None):
        self.deal, self.plan, self.reader = deal, deal.plan, reader
        self.feed = BatchFeed(deal, reader, window)
        if window is not None:  # its pins go with the loader, not when its thread next lets go of it
            weakref.finalize(self, window.close)
        gpu = device.startswith("cuda")
        device_id = (torch.device(device).index or 0) if gpu else None
        hints = {"hw_decoder_load": hw_decoder_load, "size_hint": stored_size(self.feed)} if gpu else {}
        # Different draws per rank and per start: a resume without its state does not replay the run's first.
        pipe = depthseg_pipeline(_Feed(self.feed), self.plan.train, res, aug, gpu, **hints,
                                 batch_size=self.plan.batch_size, num_threads=threads, device_id=device_id,
                                 seed=derive_seed("dali", seed, self.plan.rank, *deal.first), prefetch_queue_depth=2,
                                 enable_checkpointing=self.plan.train, checkpoint=state["dali"] if state else None)
        self.device = torch.device(device)
        with dali_errors(self.plan.shards):  # the iterator runs the first batches already
            pipe.build()  # first, then the downloads: side by side, both wait on Python's lock, and longer than in turn
            if window is not None:
                window.start()
            self.iterator = DALIGenericIterator(pipe, ["bg", "fg_bg", "labels", "ids"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                                auto_reset=True)

    def __len__(self) -> int:
        return self.plan.batches

    def state(self) -> dict | None:
        """After the batches handed out so far; given back as `state` (with the same deal), the
        loader goes on exactly from there."""
        if not self.plan.train:
            return None
        return {"dali": self.iterator.checkpoints()[0], "first": list(self.deal.first)}

    def __iter__(self):
        with dali_errors(self.plan.shards):
            yield from self._batches()

    def _batches(self):
        for i, out in enumerate(self.iterator):
            b = {k: v.to(self.device, non_blocking=True) for k, v in out[0].items() if k != "ids"}
            batch = to_contract(b["bg"], b["fg_bg"], b["labels"], self.plan, i)
            batch["keys"] = [self.reader.key(k, j) for _, k, j in out[0]["ids"].tolist()]
            yield batch
