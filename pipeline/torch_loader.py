"""The reference loader: webdataset + torch DataLoader, the same contract and epoch rules as the
DALI loader (see pipeline.loaders), for machines without DALI and as the benchmark's baseline.

Workers decode with PIL and resize; augmentation is torch code written for batches (every random
parameter drawn per sample, as tensors). Where it runs was decided by measuring (BENCHMARKS.md):
on a GPU, on whole batches on the device, where it costs almost nothing; on the CPU, per sample
in the workers (2.7× faster than whole batches, in the workers or in the main process).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from pipeline.augment import Augment
from pipeline.epoch import Plan, to_contract
from pipeline.manifest import ROLES, LoaderError

SHUFFLE_BUFFER = 1024  # as the DALI reader's


def decode_sample(sample: dict, res: int) -> torch.Tensor:
    """Four encoded images → uint8 8×res×res (bg, fg_bg, mask, depth)."""
    planes = []
    for role in ROLES:
        data = sample.get(f"{role}.jpg", sample.get(f"{role}.png"))
        mode = "RGB" if role in ("bg", "fg_bg") else "L"
        try:
            im = Image.open(io.BytesIO(data))
            im.draft(mode, (res, res))  # JPEG: decode at a reduced scale when that is still >= res
            im = im.convert(mode)
        except Exception as e:  # PIL raises many types; None data (missing member) too
            shards = sample.get("__url__", "?").rsplit("/", 1)[0]
            raise LoaderError(f"could not decode {role} of sample {sample.get('__key__')} in {sample.get('__url__')} "
                              f"({e}); run `depthcli verify --decode {shards}`.") from None
        if im.size != (res, res):
            im = im.resize((res, res), Image.BILINEAR)  # PIL's resize is antialiased
        arr = np.asarray(im)
        planes.append(arr[..., None] if arr.ndim == 2 else arr)
    return torch.from_numpy(np.concatenate(planes, axis=2)).permute(2, 0, 1).contiguous()


# --- batched augmentation: B×8×H×W float in [0, 1], parameters drawn per sample ----------------

def _rand(n: int, g: torch.Generator, device, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1).values
    s = torch.where(v > 0, c / v.clamp_min(1e-8), torch.zeros_like(v))
    cz = c.clamp_min(1e-8)
    h = torch.where(v == r, ((g - b) / cz) % 6, torch.where(v == g, (b - r) / cz + 2, (r - g) / cz + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v[:, None] - (v * s)[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _geometry(x: torch.Tensor, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """Flips and rotation, drawn once per sample, applied to all eight channels together; the
    labels (mask, depth) rotate with nearest neighbour, as in the DALI graph."""
    n, dev = len(x), x.device
    for p, dim in ((aug.hflip_p, -1), (aug.vflip_p, -2)):
        if p > 0:
            x = torch.where((_rand(n, g, dev) < p)[:, None, None, None], x.flip(dim), x)
    rot = _rand(n, g, dev) < aug.rotate_p
    angle = _rand(n, g, dev, -aug.rotate_deg, aug.rotate_deg) * math.pi / 180
    if rot.any():
        a = angle[rot]
        cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x[rot].shape), align_corners=False)
        mode = "bilinear" if aug.rotate_interp == "linear" else "nearest"
        x = x.clone()
        x[rot] = torch.cat([F.grid_sample(x[rot][:, :6], grid, mode=mode, padding_mode="zeros", align_corners=False),
                            F.grid_sample(x[rot][:, 6:], grid, mode="nearest", padding_mode="zeros", align_corners=False)], 1)
    return x


def _draws(n: int, aug: Augment, g: torch.Generator, dev) -> dict:
    nh = aug.dropout_max_holes
    return {"color": _rand(n, g, dev) < aug.color_p, "rgb": _rand(n, g, dev) < 0.5,
            "shift": (torch.rand(n, 3, generator=g, device=dev) * 2 - 1) * aug.rgb_shift,
            "hue": _rand(n, g, dev, -aug.hue_deg, aug.hue_deg) / 360,
            "sat": _rand(n, g, dev, 1 - aug.saturation, 1 + aug.saturation),
            "val": _rand(n, g, dev, 1 - aug.value, 1 + aug.value),
            "noise": _rand(n, g, dev) < aug.noise_p, "sigma": _rand(n, g, dev, aug.noise_min, aug.noise_max),
            "dropout": _rand(n, g, dev) < aug.dropout_p,
            "holes": torch.randint(1, nh + 1, (n,), generator=g, device=dev),
            "size": torch.rand(n, nh, 2, generator=g, device=dev) * 0.5 + 0.5,
            "anchor": torch.rand(n, nh, 2, generator=g, device=dev)}


def _photometric(img: torch.Tensor, d: dict, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """Colour shift (RGB shift or HSV), Gaussian noise, coarse dropout on B×3×H×W."""
    n, _, h, w = img.shape
    shifted = img + d["shift"][:, :, None, None]
    hsv = rgb_to_hsv(img) if (d["color"] & ~d["rgb"]).any() else None
    if hsv is not None:
        hsv = torch.stack([(hsv[:, 0] + d["hue"][:, None, None]) % 1,
                           (hsv[:, 1] * d["sat"][:, None, None]).clamp(0, 1),
                           (hsv[:, 2] * d["val"][:, None, None]).clamp(0, 1)], 1)
        shifted = torch.where(d["rgb"][:, None, None, None], shifted, hsv_to_rgb(hsv))
    img = torch.where(d["color"][:, None, None, None], shifted, img)
    if d["noise"].any():
        noise = torch.randn(img.shape, generator=g, device=img.device) * d["sigma"][:, None, None, None]
        img = torch.where(d["noise"][:, None, None, None], img + noise, img)
    if d["dropout"].any():
        size = d["size"] * torch.tensor([aug.dropout_max_h, aug.dropout_max_w], device=img.device)
        lo = d["anchor"] * (1 - size)  # holes lie inside the image
        hi = lo + size
        yy = (torch.arange(h, device=img.device) + 0.5) / h
        xx = (torch.arange(w, device=img.device) + 0.5) / w
        inside = ((yy[None, None, :, None] >= lo[..., 0, None, None]) & (yy[None, None, :, None] < hi[..., 0, None, None])
                  & (xx[None, None, None, :] >= lo[..., 1, None, None]) & (xx[None, None, None, :] < hi[..., 1, None, None]))
        used = torch.arange(aug.dropout_max_holes, device=img.device)[None] < d["holes"][:, None]
        hole = (inside & used[..., None, None]).any(1) & d["dropout"][:, None, None]
        img = img.masked_fill(hole[:, None], 0.0)
    return img.clamp(0, 1)


def augment_batch(x: torch.Tensor, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """uint8 or float B×8×H×W → float in [0, 1], augmented."""
    x = x.float().div_(255) if x.dtype == torch.uint8 else x
    x = _geometry(x, aug, g)
    if aug.color_p > 0 or aug.noise_p > 0 or aug.dropout_p > 0:
        first = _draws(len(x), aug, g, x.device)
        second = first if aug.shared else _draws(len(x), aug, g, x.device)
        x = torch.cat([_photometric(x[:, 0:3], first, aug, g), _photometric(x[:, 3:6], second, aug, g), x[:, 6:8]], 1)
    return x


# --- the loader ------------------------------------------------------------------------------

class _AugmentInWorker:
    """A picklable stage that augments one sample inside a DataLoader worker. On the CPU this
    is 2.7× faster than augmenting whole batches (in the workers or in the main process): a
    batch's float intermediates do not fit in cache (BENCHMARKS.md)."""

    def __init__(self, aug: Augment, seed: int):
        self.aug, self.seed, self.g = aug, seed, None

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        if self.g is None:
            info = get_worker_info()
            self.g = torch.Generator().manual_seed(self.seed * 1000 + (info.id if info else 0))
        return augment_batch(sample[None], self.aug, self.g)[0]


def _in_part(plan: Plan):
    """Keep the samples of this rank's part [start, end) of the split, counted in shard order."""
    starts = dict(zip(plan.tars, np.cumsum([0] + list(plan.counts[:-1])).tolist()))
    lo, hi = plan.part

    def select(src):
        url, pos = None, 0
        for sample in src:
            if sample["__url__"] != url:
                url, pos = sample["__url__"], 0
            if lo <= starts[url] + pos < hi:
                yield sample
            pos += 1

    return select


class TorchLoader:
    """The batch contract over webdataset + DataLoader."""

    def __init__(self, plan: Plan, res: int, aug: Augment, device: str, seed: int, workers: int):
        self.plan, self.res, self.aug, self.device = plan, res, aug, torch.device(device)
        self.seed, self.workers, self.epoch = seed, workers, 0
        self.on_device = self.device.type == "cuda"  # else augment in the workers

    def __len__(self) -> int:
        return self.plan.batches

    def _decode(self, sample):
        return decode_sample(sample, self.res)

    def _part_tars(self) -> list[str]:
        """The shards that hold some of this rank's part."""
        lo, hi = self.plan.part
        starts = np.cumsum([0] + list(self.plan.counts))
        return [t for t, a, b in zip(self.plan.tars, starts[:-1], starts[1:]) if a < hi and b > lo]

    def _train_loader(self):
        """This rank's part, shards and samples shuffled anew each epoch; each worker cycles its
        shards (.repeat()) so the rank always has its len() full batches, whatever the tails."""
        rank_seed = (self.seed * 1000 + self.plan.rank) * 1000 + self.epoch
        tars = self._part_tars()
        ds = (wds.WebDataset(tars, shardshuffle=len(tars), nodesplitter=None, seed=rank_seed, empty_check=False)
              .compose(_in_part(self.plan)).shuffle(SHUFFLE_BUFFER).map(self._decode))
        if not self.on_device:
            ds = ds.map(_AugmentInWorker(self.aug, rank_seed))
        ds = ds.batched(self.plan.batch_size, collation_fn=torch.stack, partial=False).repeat()
        workers = min(self.workers, len(tars))
        return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=self.on_device,
                          prefetch_factor=2 if workers else None)

    def _val_loader(self):
        tars = self._part_tars()
        ds = (wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, empty_check=False)
              .compose(_in_part(self.plan)).map(self._decode))
        return DataLoader(ds, batch_size=None, num_workers=min(self.workers, len(tars)), pin_memory=self.on_device)

    def __iter__(self):
        self.epoch += 1
        try:
            yield from self._train_batches() if self.plan.train else self._val_batches()
        except LoaderError as e:  # from a worker, the message carries the worker's traceback
            raise LoaderError(str(e).strip().splitlines()[-1].split("LoaderError: ", 1)[-1]) from None

    def _train_batches(self):
        g = torch.Generator(self.device).manual_seed(self.seed * 1000 + self.plan.rank + 7919 * self.epoch)
        for i, batch in enumerate(self._train_loader()):
            if i == self.plan.batches:
                break
            batch = batch.to(self.device, non_blocking=True)
            images = augment_batch(batch, self.aug, g) if self.on_device else batch
            yield to_contract(images[:, 0:3], images[:, 3:6], images[:, 6:8], self.plan, i)

    def _val_batches(self):
        """Batches of the rank's part in shard order; the tail, and a whole batch where this
        rank's part is shorter than the largest, are filled with repeats (valid = False)."""
        buf, i, last = [], 0, None
        for sample in self._val_loader():
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
        images = torch.stack(samples).to(self.device, non_blocking=True).float().div_(255)
        return to_contract(images[:, 0:3], images[:, 3:6], images[:, 6:8], self.plan, i)
