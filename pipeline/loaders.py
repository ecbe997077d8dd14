"""One entry point for both loaders, and the epoch arithmetic they share.

    from pipeline.loaders import build_loader
    loader = build_loader("shards/", split="train", res=224, batch_size=64, loader="dali",
                          device="cpu", train=True, augment=Augment(), rank=0, world_size=1, seed=0)
    for batch in loader:  # len(loader) batches, the same on every rank
        batch["bg"], batch["fg_bg"]    # float B×3×H×W in [0, 1], on `device`
        batch["mask"], batch["depth"]  # float B×1×H×W in [0, 1]
        batch["valid"]                 # bool B: False only for validation's padding samples

Rank r of w reads its own part of the samples. Training: every rank yields
floor(N / w / batch_size) full batches an epoch (the tail is dropped, so DDP never waits on a
rank that ran out), and the order changes every epoch. Validation: no shuffle and no
augmentation; every sample exactly once over all ranks, in ceil(max part / batch_size) batches on
every rank, the last ones padded with repeats marked valid = False.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.augment import Augment
from pipeline.manifest import LoaderError, ManifestError, read_manifest, split_shards  # noqa: F401 (re-exported)

LOADERS = ("dali", "torch")  # and "synthetic": random tensors, to time the model alone




@dataclass(frozen=True)
class Plan:
    """What one rank reads: the split's shards and where its part of the samples lies."""

    tars: list[str]
    indexes: list[str]
    counts: list[int]  # samples per shard
    samples: int  # in the whole split
    rank: int
    world_size: int
    batch_size: int
    train: bool

    @property
    def part(self) -> tuple[int, int]:
        """[start, end) of this rank's samples in shard order: DALI's own split, floor(N·r/w)."""
        n, r, w = self.samples, self.rank, self.world_size
        return n * r // w, n * (r + 1) // w

    @property
    def largest_part(self) -> int:
        return math.ceil(self.samples / self.world_size)

    @property
    def batches(self) -> int:
        if self.train:
            return self.samples // self.world_size // self.batch_size
        return math.ceil(self.largest_part / self.batch_size)


def plan(shards: str | os.PathLike, split: str, batch_size: int, rank: int, world_size: int, train: bool) -> Plan:
    manifest = read_manifest(shards)
    entries = split_shards(manifest, split)
    folder = Path(shards)
    for e in entries:  # cheap checks here, so a damaged set fails now and not inside DALI
        for name in (e["tar"], e["index"]):
            if not (folder / name).is_file():
                raise ManifestError(f"{folder / name} is missing; run `depthcli verify {folder}`.")
        size = (folder / e["tar"]).stat().st_size
        if size != e["bytes"]:
            raise ManifestError(f"{folder / e['tar']} has {size} bytes, the manifest says {e['bytes']}; "
                                f"run `depthcli verify {folder}`.")
    p = Plan([str(folder / e["tar"]) for e in entries], [str(folder / e["index"]) for e in entries],
             [e["samples"] for e in entries], sum(e["samples"] for e in entries), rank, world_size, batch_size, train)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if p.batches == 0 or p.samples < world_size:
        raise ManifestError(f"the {split} split has {p.samples} samples, too few for one batch of {batch_size} "
                            f"on each of {world_size} ranks; lower the batch size.")
    return p


def valid_mask(plan: Plan, batch_index: int, batch_size: int) -> torch.Tensor:
    """Which samples of a batch are real: all in training; in validation the rank's part may be
    one shorter than the largest, and its last batch is filled with repeats."""
    if plan.train:
        return torch.ones(batch_size, dtype=torch.bool)
    start, end = plan.part
    first = batch_index * plan.batch_size
    return torch.arange(first, first + batch_size) < (end - start)


def to_contract(bg: torch.Tensor, fg_bg: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> dict:
    """Both loaders' tensors (labels = mask and depth, 2 channels) as the batch contract."""
    return {"bg": bg, "fg_bg": fg_bg, "mask": labels[:, 0:1], "depth": labels[:, 1:2], "valid": valid.to(bg.device)}


def build_loader(shards: str | os.PathLike, split: str = "train", res: int = 224, batch_size: int = 64,
                 loader: str = "dali", device: str = "cpu", train: bool | None = None, augment: Augment | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int | None = None):
    """An iterable of batch dicts with len() = batches per epoch; see the module docstring.
    `train` defaults to split == "train"; `augment` to the reference settings when training;
    `workers` is CPU threads (dali) or processes (torch) for this rank."""
    train = split == "train" if train is None else train
    augment = (augment or Augment()) if train else Augment.off()
    if res % 4 or res < 16:
        raise ValueError(f"--res must be a multiple of 4 and at least 16, got {res}")
    if loader == "synthetic":
        return SyntheticLoader(res, batch_size, device)
    p = plan(shards, split, batch_size, rank, world_size, train)
    workers = workers or max(1, (os.cpu_count() or 1) // world_size)
    if loader == "dali":
        from pipeline.dali_pipeline import DaliLoader

        return DaliLoader(p, res, augment, device, seed, workers)
    if loader == "torch":
        from pipeline.torch_loader import TorchLoader

        return TorchLoader(p, res, augment, device, seed, workers)
    raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)} or synthetic")


class SyntheticLoader:
    """The batch contract filled with random tensors made once on the device, `batches` a
    pass: what the trainer does when loading costs nothing, to time the model alone."""

    def __init__(self, res: int, batch_size: int, device: str, batches: int = 50):
        g = torch.Generator().manual_seed(0)
        shapes = {"bg": 3, "fg_bg": 3, "mask": 1, "depth": 1}
        self.batch = {k: torch.rand(batch_size, c, res, res, generator=g).to(device) for k, c in shapes.items()}
        self.batch["valid"] = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.batches = batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            yield self.batch


def available_loaders() -> list[str]:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return ["torch"]
    return list(LOADERS)
