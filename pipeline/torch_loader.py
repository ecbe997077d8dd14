"""The torch loader: webdataset + torch DataLoader, the same contract and epoch rules as the DALI
loader (see pipeline.loaders), for machines without DALI (AMD, Apple, CPU-only boxes).

webdataset's pipeline shards, shuffles and batches; the tars' members are read at the offsets of
their DALI indexes (IndexedSamples), not parsed header by header. Workers decode JPEGs with
simplejpeg (libjpeg-turbo) at the smallest DCT scale (n/8) that still covers `res`, so a 64 px
epoch from 224 px JPEGs skips most of the decoding, then resize the rest of the way (bilinear
below 2×, area above); other formats (PNG) go through OpenCV; a bg, shared by many samples, is
decoded once per worker. The augmentation, per sample in the workers (CPU) or per batch on the
device (GPU), is pipeline.torch_augment's. Measurements behind these choices are in
BENCHMARKS.md ("Torch loader on libraries").
"""

from __future__ import annotations

import functools
import random

import cv2
import numpy as np
import simplejpeg
import torch
import webdataset as wds
from torch.utils.data import DataLoader, default_collate, get_worker_info
from webdataset.gopen import gopen

from pipeline.augment import Augment
from pipeline.epoch import SHUFFLE_BUFFER, Plan, derive_seed, to_contract
from pipeline.manifest import ROLES, LoaderError
from pipeline.store import StoreError
from pipeline.tar_index import HEADER, header_names, parse_index
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


def decode_sample(sample: dict, res: int) -> dict[str, np.ndarray]:
    """A webdataset sample → {role: uint8 array at res×res}; a bad image is one sentence."""
    out = {}
    for role in ROLES:
        data = sample.get(f"{role}.jpg", sample.get(f"{role}.png"))
        try:
            out[role] = decode_bg(data, res) if role == "bg" else decode_image(data, role in ("mask", "depth"), res)
        except Exception as e:  # the decoders raise several types; None data (missing member) too
            shards = sample.get("__url__", "?").rsplit("/", 1)[0]
            raise LoaderError(f"could not decode {role} of sample {sample.get('__key__')} in {sample.get('__url__')} "
                              f"({e}); run `depthcli verify --decode {shards}`.") from None
    return out


def to_planes(images: dict[str, np.ndarray], floats: bool) -> torch.Tensor:
    """{role: HWC or HW uint8} → 8×H×W (bg, fg_bg, mask, depth), uint8 or float in [0, 1].
    cv2.split + stack: 25× faster than a transposing copy of the interleaved channels."""
    planes = torch.from_numpy(np.stack([*cv2.split(images["bg"]), *cv2.split(images["fg_bg"]), images["mask"], images["depth"]]))
    return planes.float().div_(255) if floats else planes


class SampleStage:
    """A picklable stage that decodes one sample inside a DataLoader worker and, given `aug`,
    augments it there (on the CPU 2.7× faster than whole batches: their intermediates do not
    fit in cache). `floats`: hand over float planes (on the CPU: cheaper per sample in the
    workers than per batch in the trainer's process); else uint8, a quarter of the bytes to copy
    to a GPU."""

    def __init__(self, aug: Augment | None, res: int, seed: int, floats: bool):
        self.aug, self.res, self.seed, self.floats, self.ops = aug, res, seed, floats, None

    def _setup(self):
        info = get_worker_info()
        seed = derive_seed("torch-worker", self.seed, info.id if info else 0)
        self.ops = cpu_transforms(self.aug) if self.aug else ()
        # One generator pair for all ops: Compose(seed=s) gives every op its own generator seeded
        # with s, so their draws coincide (every vertical flip would also be a horizontal one).
        state = np.random.default_rng(seed), random.Random(seed)
        for compose in self.ops:
            compose.set_random_state(*state)

    def __call__(self, sample: dict) -> torch.Tensor:
        if self.ops is None:
            self._setup()
        x = decode_sample(sample, self.res)
        if self.ops:
            geometry, photometric = self.ops
            x = geometry(image=x["bg"], fg_bg=x["fg_bg"], mask=x["mask"], depth=x["depth"])
            x["bg"] = x.pop("image")
            if self.aug.shared:
                y = photometric(image=x["bg"], fg_bg=x["fg_bg"])
                x["bg"], x["fg_bg"] = y["image"], y["fg_bg"]
            else:
                x["bg"], x["fg_bg"] = (photometric(image=x[k])["image"] for k in ("bg", "fg_bg"))
        return to_planes(x, self.floats)


def _worker_init(_):
    """One process per core already: OpenCV's own thread pool would oversubscribe. 0 (run
    sequentially), not 1: resizing an inherited pool to 1 thread waits forever in a forked worker
    whose parent had used OpenCV's threads (a condition variable with waiters the fork did not copy)."""
    cv2.setNumThreads(0)


# --- the loader ------------------------------------------------------------------------------

class IndexedSamples:
    """A webdataset stage: shard URLs ({"url": ...}) → the samples of this rank's part in them,
    as webdataset's sample dicts. Each member is read at the offset the shard's DALI index gives,
    one read each, where webdataset's own tar reading parses every header with Python's tarfile
    (0.15–0.23 ms a sample: at 64 px a sixth of the loader's work; BENCHMARKS.md). The header in
    front of each member must carry the index's name for it, so an index that does not belong to
    its tar stops with one sentence instead of mixing members of different samples."""

    def __init__(self, plan: Plan):
        self.indexes = dict(zip(plan.tars, plan.indexes))
        self.starts = dict(zip(plan.tars, plan.starts))
        self.part = plan.part
        self.origin = plan.shards  # what to verify: the tars may be cached copies of s3:// shards

    def __call__(self, src):
        for item in src:
            yield from self.shard(item["url"])

    def shard(self, url: str):
        """The shard's samples in [start, end) of the rank's part, in shard order."""
        index, (lo, hi) = self._index(url), (p - self.starts[url] for p in self.part)
        stream, pos = self._open(url), 0
        try:
            for members in index[max(lo, 0):max(hi, 0)]:
                sample = {"__key__": members[0][0].split(".", 1)[0], "__url__": url}
                for name, offset, size in members:
                    sample[name.split(".", 1)[1]] = self._member(stream, url, name, offset - pos, size)
                    pos = offset + size
                yield sample
        except OSError as e:  # a failing disk; a store's failures are StoreErrors naming the object already
            raise LoaderError(f"could not read {url} ({e.strerror or e}); run `depthcli verify {self.origin}`.") from None
        finally:
            stream.close()

    def _member(self, stream, url: str, name: str, gap: int, size: int) -> bytes:
        """The member `name`, after `gap` bytes whose last 512 are its tar header."""
        header = _skip(stream, gap)
        data = stream.read(size)
        if len(data) != size:
            raise LoaderError(f"could not read {url} (it ends inside {name}); run `depthcli verify {self.origin}`.")
        if not header_names(header[-HEADER:], name):
            raise LoaderError(f"{self.indexes[url]} does not agree with {url}; run `depthcli verify {self.origin}`.")
        return data

    def _open(self, url: str):
        try:
            return gopen(url)  # a file, or through pipeline.store for s3://
        except OSError as e:
            raise LoaderError(f"could not read {url} ({e.strerror or e}); run `depthcli verify {self.origin}`.") from None

    def _index(self, url: str) -> list[list[tuple[str, int, int]]]:
        idx = self.indexes[url]
        stream = self._open(idx)
        try:
            return parse_index(idx, stream.read().decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise LoaderError(f"could not read {idx} ({e}); run `depthcli verify {self.origin}`.") from None
        finally:
            stream.close()


def _skip(stream, n: int) -> bytes:
    """Read n bytes and drop them, in bounded pieces; the last (up to) HEADER bytes are returned."""
    last = b""
    while n > 0:
        piece = stream.read(min(n, 1 << 20))
        if not piece:
            break
        last, n = (last + piece)[-HEADER:], n - len(piece)
    return last


class TorchLoader:
    """The batch contract over webdataset + DataLoader. Tars and indexes are opened with
    webdataset's gopen: local paths, or s3:// through pipeline.store."""

    def __init__(self, plan: Plan, res: int, aug: Augment, device: str, seed: int, workers: int):
        self.plan, self.res, self.aug, self.device = plan, res, aug, torch.device(device)
        self.seed, self.workers, self.epoch = seed, workers, 0
        self.on_device = augment_on_device(self.device)
        self.device_augment = DeviceAugment(aug) if self.on_device and plan.train else None

    def __len__(self) -> int:
        return self.plan.batches

    def _part_tars(self) -> list[str]:
        """The shards that hold some of this rank's part."""
        return [self.plan.tars[k] for k in self.plan.part_shards]

    def _loader(self, ds, tars: list[str]) -> DataLoader:
        workers = min(self.workers, len(tars))
        return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
                          worker_init_fn=_worker_init, prefetch_factor=2 if workers else None)

    def _train_loader(self):
        """This rank's part, shards and samples shuffled anew each epoch; each worker cycles its
        shards (.repeat()) so the rank always has its len() full batches, whatever the tails."""
        rank_seed = derive_seed("torch-loader", self.seed, self.plan.rank, self.epoch)
        tars = self._part_tars()
        stage = SampleStage(None if self.on_device else self.aug, self.res, rank_seed, floats=not self.on_device)
        ds = wds.DataPipeline(  # what wds.WebDataset does, with IndexedSamples reading the tars
            wds.SimpleShardList(tars), wds.split_by_worker, wds.shuffle(len(tars), seed=rank_seed), IndexedSamples(self.plan),
            wds.shuffle(SHUFFLE_BUFFER, seed=rank_seed), wds.map(stage),
            wds.batched(self.plan.batch_size, collation_fn=default_collate, partial=False),  # stacks into shared memory
        ).repeat()
        return self._loader(ds, tars)

    def _val_loader(self):
        tars = self._part_tars()
        ds = wds.DataPipeline(wds.SimpleShardList(tars), wds.split_by_worker, IndexedSamples(self.plan),
                              wds.map(SampleStage(None, self.res, 0, floats=not self.on_device)))
        return self._loader(ds, tars)

    def __iter__(self):
        self.epoch += 1
        try:
            yield from self._train_batches() if self.plan.train else self._val_batches()
        except (LoaderError, StoreError) as e:  # from a worker, the message carries the worker's traceback
            raise type(e)(str(e).strip().splitlines()[-1].split(f"{type(e).__name__}: ", 1)[-1]) from None

    def _floats(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        return batch.float().div_(255) if batch.dtype == torch.uint8 else batch

    def _train_batches(self):
        for i, batch in enumerate(forked(self._train_loader())):
            if i == self.plan.batches:
                break
            images = self._floats(batch)
            if self.device_augment is not None:
                images = self.device_augment(images)
            yield to_contract(images[:, 0:3], images[:, 3:6], images[:, 6:8], self.plan, i)

    def _val_batches(self):
        """Batches of the rank's part in shard order; the tail, and a whole batch where this
        rank's part is shorter than the largest, are filled with repeats (valid = False)."""
        buf, i, last = [], 0, None
        for sample in forked(self._val_loader()):
            buf.append(sample)
            last = sample
            if len(buf) == self.plan.batch_size:
                yield self._val_batch(buf, i)
                buf, i = [], i + 1
        while i < self.plan.batches:
            buf += [last] * (self.plan.batch_size - len(buf))
            yield self._val_batch(buf, i)
            buf, i = [], i + 1

    def _val_batch(self, samples: list[torch.Tensor], i: int) -> dict:
        images = self._floats(torch.stack(samples))
        return to_contract(images[:, 0:3], images[:, 3:6], images[:, 6:8], self.plan, i)
