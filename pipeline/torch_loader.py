"""The torch loader: a torch DataLoader over pipeline.epoch's order, the same contract and epoch
rules as the DALI loader (see pipeline.loaders), for machines without DALI (AMD, Apple, CPU-only
boxes).

A batch sampler in the trainer's process deals this rank's batches of the epoch (and, for s3://
through the cache, waits for their shards to be fetched); workers read each sample at its index
offsets (pipeline.reader), decode JPEGs with simplejpeg (libjpeg-turbo) at the smallest DCT scale
(n/8) that still covers `res`, so a 64 px epoch from 224 px JPEGs skips most of the decoding,
then resize the rest of the way (bilinear below 2×, area above); other formats (PNG) go through
OpenCV; a bg, shared by many samples, is decoded once per worker. The augmentation, per sample
in the workers (CPU) or per batch on the device (GPU), is pipeline.torch_augment's, its draws
seeded by the sample and epoch (CPU) or the batch (GPU): a resumed epoch, on any number of
ranks or workers, gets the draws the uninterrupted one got. Measurements behind these choices
are in BENCHMARKS.md ("Torch loader on libraries").
"""

from __future__ import annotations

import functools
import random
import weakref

import cv2
import numpy as np
import simplejpeg
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from pipeline.augment import Augment
from pipeline.epoch import Deal, derive_seed, to_contract
from pipeline.manifest import ROLES, LoaderError
from pipeline.reader import SampleReader
from pipeline.store import StoreError
from pipeline.torch_augment import DeviceAugment, augment_on_device, cpu_transforms
from pipeline.workers import forked


def decode_jpeg(data: bytes, gray: bool, res: int) -> np.ndarray:
    """A JPEG decoded at the smallest of libjpeg-turbo's scales (n/8) that keeps both sides >= res:
    e.g. 224 px at 3/8 (84 px) for res 64, at 5/8 (140 px) for res 128."""
    img = simplejpeg.decode_jpeg(data, "GRAY" if gray else "RGB", min_height=res, min_width=res)
    return img[..., 0] if gray else img


def decode_image(data: bytes, gray: bool, res: int) -> np.ndarray:
    """Encoded bytes → uint8 res×res×3 (RGB) or res×res (grey)."""
    if data[:2] == b"\xff\xd8":
        img = decode_jpeg(data, gray, res)
    else:  # PNG and the rest: OpenCV
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR_RGB)
        if img is None:
            raise ValueError("not a decodable image")
    if img.shape[:2] != (res, res):  # bilinear is antialiased enough below 2× (within 0.03 grey levels of area)
        img = cv2.resize(img, (res, res), interpolation=cv2.INTER_LINEAR if min(img.shape[:2]) < 2 * res else cv2.INTER_AREA)
    return img


@functools.lru_cache(maxsize=256)
def decode_bg(data: bytes, res: int) -> np.ndarray:
    """A bg recurs under thousands of samples (100 backgrounds in the reference's 400k): each is
    decoded once per worker. Read-only, so that no augmentation can change the kept copy."""
    img = decode_image(data, False, res)
    img.flags.writeable = False
    return img


def decode_sample(data: list[bytes], res: int, where: str) -> dict[str, np.ndarray]:
    """A sample's encoded images (ROLES order) → {role: uint8 array at res×res}; a bad image is
    one sentence naming `where` (the sample and its tar)."""
    out = {}
    for role, encoded in zip(ROLES, data):
        try:
            out[role] = decode_bg(encoded, res) if role == "bg" else decode_image(encoded, role in ("mask", "depth"), res)
        except Exception as e:  # the decoders raise several types
            raise LoaderError(f"could not decode {role} of {where} ({e}); run `depthcli verify --decode` on the shards.") from None
    return out


def to_planes(images: dict[str, np.ndarray], floats: bool) -> torch.Tensor:
    """{role: HWC or HW uint8} → 8×H×W (bg, fg_bg, mask, depth), uint8 or float in [0, 1].
    cv2.split + stack: 25× faster than a transposing copy of the interleaved channels."""
    planes = torch.from_numpy(np.stack([*cv2.split(images["bg"]), *cv2.split(images["fg_bg"]), images["mask"], images["depth"]]))
    return planes.float().div_(255) if floats else planes


class Samples(Dataset):
    """(epoch, shard, sample) → (8×H×W planes, key), in a DataLoader worker: read, decoded and,
    given `aug`, augmented there (on the CPU 2.7× faster than whole batches: their intermediates
    do not fit in cache), with draws seeded by (seed, epoch, shard, sample). `floats`: hand over
    float planes (on the CPU: cheaper per sample in the workers than per batch in the trainer's
    process); else uint8, a quarter of the bytes to copy to a GPU."""

    def __init__(self, reader: SampleReader, aug: Augment | None, res: int, seed: int, floats: bool):
        self.reader, self.aug, self.res, self.seed, self.floats, self.ops = reader, aug, res, seed, floats, None

    def __getitem__(self, item: tuple[int, int, int]) -> tuple[torch.Tensor, str]:
        epoch, k, i = item
        key = self.reader.key(k, i)
        x = decode_sample(self.reader.read(k, i), self.res, f"sample {key} in {self.reader.tars[k]}")
        if self.aug:
            x = self._augment(x, derive_seed("torch-augment", self.seed, epoch, k, i))
        return to_planes(x, self.floats), key

    def _augment(self, x: dict, seed: int) -> dict:
        if self.ops is None:
            self.ops = cpu_transforms(self.aug)
        geometry, photometric = self.ops
        # One generator pair for all ops: Compose(seed=s) gives every op its own generator seeded
        # with s, so their draws coincide (every vertical flip would also be a horizontal one).
        # Philox keyed by the seed: half default_rng's cost, which hashes its seed first.
        state = np.random.Generator(np.random.Philox(key=seed)), random.Random(seed)
        for compose in self.ops:
            compose.set_random_state(*state)
        x = geometry(image=x["bg"], fg_bg=x["fg_bg"], mask=x["mask"], depth=x["depth"])
        x["bg"] = x.pop("image")
        if self.aug.shared:
            y = photometric(image=x["bg"], fg_bg=x["fg_bg"])
            x["bg"], x["fg_bg"] = y["image"], y["fg_bg"]
        else:
            x["bg"], x["fg_bg"] = (photometric(image=x[k])["image"] for k in ("bg", "fg_bg"))
        return x


class RankBatches(Sampler):
    """This rank's batches of an epoch as lists of (epoch, shard, sample), dealt by pipeline.epoch;
    with a `window`, each waits for its shards to be cached before a worker is given it."""

    def __init__(self, deal: Deal, epoch: int, window=None):
        self.deal, self.epoch, self.window = deal, epoch, window

    def __len__(self) -> int:
        return self.deal.batches(self.epoch)

    def __iter__(self):
        for i in range(len(self)):
            positions = self.deal.positions(self.epoch, i)
            if self.window is not None:
                self.window.wait(self.epoch, positions)
            yield [(self.epoch, k, j) for k, j in self.deal.order.sequence(self.epoch)[positions].tolist()]


def _worker_init(_):
    """One process per core already: OpenCV's own thread pool would oversubscribe. 0 (run
    sequentially), not 1: resizing an inherited pool to 1 thread waits forever in a forked worker
    whose parent had used OpenCV's threads (a condition variable with waiters the fork did not copy)."""
    cv2.setNumThreads(0)


class TorchLoader:
    """The batch contract over a DataLoader per epoch; the epochs count from the deal's first."""

    def __init__(self, deal: Deal, reader: SampleReader, res: int, aug: Augment, device: str, seed: int, workers: int,
                 window=None):
        self.deal, self.plan, self.device, self.seed = deal, deal.plan, torch.device(device), seed
        self.workers, self.window, self.epoch = workers, window, deal.first[0]
        if window is not None:  # fetching from now on; its pins go with the loader, not when its thread lets go of it
            window.start()
            weakref.finalize(self, window.close)
        on_device = augment_on_device(self.device)
        self.device_augment = DeviceAugment(aug) if on_device and self.plan.train else None
        augment = aug if self.plan.train and not on_device else None
        self.samples = Samples(reader, augment, res, seed, floats=not on_device)

    def __len__(self) -> int:
        return self.plan.batches

    def __iter__(self):
        epoch = self.epoch if self.plan.train else 0  # validation's order is the same every epoch
        self.epoch += 1
        batches = RankBatches(self.deal, epoch, self.window)
        workers = min(self.workers, len(batches))
        loader = DataLoader(self.samples, batch_sampler=batches, num_workers=workers, collate_fn=default_collate,
                            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init,
                            prefetch_factor=2 if workers else None)
        try:
            for i, (planes, keys) in enumerate(forked(loader)):
                yield self._batch(planes, keys, epoch, i)
        except (LoaderError, StoreError) as e:  # from a worker, the message carries the worker's traceback
            raise type(e)(str(e).strip().splitlines()[-1].split(f"{type(e).__name__}: ", 1)[-1]) from None

    def _batch(self, planes: torch.Tensor, keys: list[str], epoch: int, i: int) -> dict:
        images = planes.to(self.device, non_blocking=True)
        images = images.float().div_(255) if images.dtype == torch.uint8 else images
        if self.device_augment is not None:  # draws seeded by the batch: the same on a resume
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(derive_seed("device-augment", self.seed, epoch, int(self.deal.positions(epoch, i)[0])))
                images = self.device_augment(images)
        batch = to_contract(images[:, 0:3], images[:, 3:6], images[:, 6:8], self.plan, i)
        batch["keys"] = list(keys)
        return batch
