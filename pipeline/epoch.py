"""What both loaders share, below them both: which samples a rank reads, how many batches an
epoch has, and the batch contract's dict. pipeline.loaders (build_loader) sits above it and the
two loaders; see its docstring for the epoch rules.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import store
from pipeline.errors import DepthsegError
from pipeline.manifest import ManifestError, read_manifest, split_shards

# Sides the models can run at: their two stride-2 stages and two x2 upsamplings meet their skips
# only at multiples of 4. A loader, the trainer, predict and export all ask check_res.
RES_MULTIPLE, RES_MIN = 4, 16


class ResolutionError(DepthsegError, ValueError):
    """A --res the models cannot run at."""


def check_res(res: int) -> int:
    """`res` when the models can run at it, else one sentence."""
    if res % RES_MULTIPLE or res < RES_MIN:
        raise ResolutionError(f"--res must be a multiple of {RES_MULTIPLE} and at least {RES_MIN}, got {res}.")
    return res

# Samples a training reader shuffles among: DALI's initial_fill, the torch loader's buffer, the
# cap of a streamed group. Small is enough: the packer already shuffled samples across shards.
SHUFFLE_BUFFER = 1024


def derive_seed(purpose: str, seed: int, *keys: int) -> int:
    """The one seed rule: a 63-bit seed (DALI, numpy, random and torch all take it) for `purpose`
    from the run's seed and keys such as rank, epoch, worker. A hash of them all, so distinct
    inputs never meet by arithmetic, as seed * 1000 + rank did (seed 0 rank 1000 was seed 1
    rank 0; by chance, 1 pair in 2**63), and two purposes never share a stream."""
    digest = hashlib.blake2b(repr((purpose, int(seed), *map(int, keys))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
    shards: str = ""  # the folder or s3:// prefix it was made from (tars may be cached copies)
    entries: tuple = ()  # the split's manifest entries, each with "index_bytes" (the index's size) added
    set_bytes: int = 0  # tars and indexes of every split: what caching the whole set takes

    @property
    def part(self) -> tuple[int, int]:
        """[start, end) of this rank's samples in shard order: DALI's own split, floor(N·r/w)."""
        n, r, w = self.samples, self.rank, self.world_size
        return n * r // w, n * (r + 1) // w

    @property
    def starts(self) -> list[int]:
        """Where each shard's samples begin in shard order, one per shard."""
        return list(itertools.accumulate(self.counts[:-1], initial=0))

    @property
    def part_shards(self) -> list[int]:
        """The shards (by position) holding some of this rank's part: what a reader of the part
        alone opens."""
        lo, hi = self.part
        return [k for k, (a, n) in enumerate(zip(self.starts, self.counts)) if a < hi and a + n > lo]

    @property
    def largest_part(self) -> int:
        return math.ceil(self.samples / self.world_size)

    @property
    def batches(self) -> int:
        if self.train:
            return self.samples // self.world_size // self.batch_size
        return math.ceil(self.largest_part / self.batch_size)


def _sizes(shards: str | os.PathLike, names: list[str]) -> dict[str, int]:
    """Sizes of the named files that exist: stat for a folder, one listing for an s3:// prefix."""
    if store.is_remote(shards):
        try:
            return store.sizes(str(shards))
        except store.StoreError as e:
            raise ManifestError(str(e)) from None
    return {n: (Path(shards) / n).stat().st_size for n in names if (Path(shards) / n).is_file()}


def plan(shards: str | os.PathLike, split: str, batch_size: int, rank: int, world_size: int, train: bool) -> Plan:
    """Shards may be a folder or an s3:// prefix: DALI opens s3:// itself, webdataset through
    pipeline.store."""
    manifest = read_manifest(shards)
    entries = split_shards(manifest, split)
    every = [e[k] for v in manifest["splits"].values() for e in v.get("shards", []) for k in ("tar", "index")]
    sizes = _sizes(shards, every)
    for e in entries:  # cheap checks here, so a damaged set fails now and not inside DALI
        for name in (e["tar"], e["index"]):
            if name not in sizes:
                raise ManifestError(f"{store.join(shards, name)} is missing; run `depthcli verify {shards}`.")
        if sizes[e["tar"]] != e["bytes"]:
            raise ManifestError(f"{store.join(shards, e['tar'])} has {sizes[e['tar']]} bytes, the manifest says "
                                f"{e['bytes']}; run `depthcli verify {shards}`.")
    if store.is_remote(shards):
        store.use_with_webdataset()
    p = Plan([store.join(shards, e["tar"]) for e in entries], [store.join(shards, e["index"]) for e in entries],
             [e["samples"] for e in entries], sum(e["samples"] for e in entries), rank, world_size, batch_size, train,
             str(shards), tuple({**e, "index_bytes": sizes[e["index"]]} for e in entries), sum(sizes.get(n, 0) for n in every))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if p.batches == 0 or p.samples < world_size:
        raise ManifestError(f"the {split} split has {p.samples} samples, too few for one batch of {batch_size} "
                            f"on each of {world_size} ranks; lower the batch size.")
    return p


def valid_mask(plan: Plan, batch_index: int, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which samples of a batch are real: all in training; in validation the rank's part may be
    one shorter than the largest, and its last batch is filled with repeats. Made on `device`
    itself: a pageable host-to-device copy per batch would be a stream synchronization."""
    if plan.train:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    start, end = plan.part
    first = batch_index * plan.batch_size
    return torch.arange(first, first + batch_size, device=device) < (end - start)


def to_contract(bg: torch.Tensor, fg_bg: torch.Tensor, labels: torch.Tensor, plan: Plan, batch_index: int) -> dict:
    """Both loaders' tensors (labels = mask and depth, 2 channels) as the batch contract."""
    return {"bg": bg, "fg_bg": fg_bg, "mask": labels[:, 0:1], "depth": labels[:, 1:2],
            "valid": valid_mask(plan, batch_index, len(bg), bg.device)}
