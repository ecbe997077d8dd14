"""What both loaders share, below them both: which samples a rank reads, in what order, how many
batches an epoch has, and the batch contract's dict. pipeline.loaders (build_loader) sits above
it and the two loaders; see its docstring for the epoch rules.

The training order (Order, Deal) is the same for both loaders and every world size: a function
of the run's seed and the epoch only, dealt to the ranks a global batch at a time, with the
position kept in samples (as MosaicML streaming's canonical order), so a run resumes exactly on
the same ranks and elastically on others:

- the split's shards are permuted (seed, epoch) and cut into groups of consecutive shards of at
  least GROUP_SAMPLES samples (a quarter of a smaller set; or at most `group_bytes`, for a cache
  too small for those);
- the samples of each group are permuted: a shuffle buffer with a hard bound on the shards it
  holds, which is what lets a node fetch the groups ahead of its readers;
- global step k of an epoch that starts at sample `start` trains positions
  start + k·W·B ... start + (k+1)·W·B, rank r the r-th B of them; the tail of fewer than W·B is
  left out (DDP never waits on a rank that ran out).

Validation: shard order, rank r its part [N·r/W, N·(r+1)/W), padded with its last sample.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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

# Samples a training group holds at least: the span of the shuffle. The packer already shuffled
# samples across shards and the shard order changes every epoch; what the span sets is how often
# two samples share a batch again the next epoch (with 1,000-sample shards, 4,096 is 4 shards a
# group: BENCHMARKS.md, "Exact and elastic resume"), against the cache's window (5 groups).
GROUP_SAMPLES = 4096
# Groups an epoch has at least, so that a cold cache needs a part of a small set, not all of it,
# before the first batch (pipeline.stream).
MIN_GROUPS = 4


def derive_seed(purpose: str, seed: int, *keys: int) -> int:
    """The one seed rule: a 63-bit seed (DALI, numpy, random and torch all take it) for `purpose`
    from the run's seed and keys such as rank, epoch, worker. A hash of them all, so distinct
    inputs never meet by arithmetic, as seed * 1000 + rank did (seed 0 rank 1000 was seed 1
    rank 0; by chance, 1 pair in 2**63), and two purposes never share a stream."""
    digest = hashlib.blake2b(repr((purpose, int(seed), *map(int, keys))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Plan:
    """A rank's view of a split: its shards, and the rank, world and batch that deal them."""

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
        """[start, end) of this rank's validation samples in shard order, floor(N·r/w)."""
        n, r, w = self.samples, self.rank, self.world_size
        return n * r // w, n * (r + 1) // w

    @property
    def largest_part(self) -> int:
        return math.ceil(self.samples / self.world_size)

    @property
    def batches(self) -> int:
        """Per rank and epoch, the same on every rank: training, full global batches (the tail
        left out); validation, the largest part's, padded."""
        if self.train:
            return self.samples // (self.world_size * self.batch_size)
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
    """Shards may be a folder or an s3:// prefix (read through the node's cache or pipeline.store)."""
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


@dataclass(frozen=True)
class Group:
    """Shards read together: their samples in reading order, as (shard, sample within it) rows."""

    shards: tuple[int, ...]  # positions in the plan's shards
    samples: np.ndarray


class Order:
    """The split's samples in each epoch's order (the module docstring): a function of (seed,
    epoch) and, for a cache too small for groups of GROUP_SAMPLES, of `group_bytes` (groups of
    at most that, never fewer than `min_samples`). `sizes`: each shard's bytes."""

    def __init__(self, counts: list[int], seed: int, train: bool, sizes: list[int] | None = None,
                 group_bytes: int = 0, min_samples: int = 1):
        self.counts, self.seed, self.train = list(counts), seed, train
        self.sizes, self.group_bytes, self.min_samples = sizes or [0] * len(counts), group_bytes, min_samples
        self._epochs: dict[int, tuple[list[Group], np.ndarray, np.ndarray]] = {}

    @property
    def params(self) -> dict:
        """What the order depends on besides seed and epoch: a resumed loader must use the same."""
        return {"group_bytes": self.group_bytes, "min_samples": self.min_samples}

    def groups(self, epoch: int) -> list[Group]:
        return self._epoch(epoch)[0]

    def sequence(self, epoch: int) -> np.ndarray:
        """(N, 2): the epoch's samples in order."""
        return self._epoch(epoch)[1]

    def group_of(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The group each position of the epoch's sequence lies in."""
        return np.searchsorted(self._epoch(epoch)[2], positions, side="right")

    def _epoch(self, epoch: int):
        got = self._epochs.get(epoch)
        if got is None:  # the reader and its prefetch thread both ask: computing twice is harmless
            groups = self._make(epoch)
            got = groups, np.concatenate([g.samples for g in groups]), np.cumsum([len(g.samples) for g in groups])
            self._epochs = {**{e: v for e, v in self._epochs.items() if e >= epoch - 1}, epoch: got}
        return got

    def _rows(self, k: int) -> np.ndarray:
        return np.stack([np.full(self.counts[k], k), np.arange(self.counts[k])], 1)

    def _make(self, epoch: int) -> list[Group]:
        if not self.train:  # shard order, a group per shard
            return [Group((k,), self._rows(k)) for k in range(len(self.counts))]
        rng = np.random.default_rng(derive_seed("order", self.seed, epoch))
        span = min(GROUP_SAMPLES, sum(self.counts) // MIN_GROUPS)
        cuts, cur, n, size = [], [], 0, 0
        for k in rng.permutation(len(self.counts)).tolist():
            full = n >= span or (self.group_bytes and size + self.sizes[k] > self.group_bytes)
            if cur and full and n >= self.min_samples:
                cuts.append(cur)
                cur, n, size = [], 0, 0
            cur, n, size = cur + [k], n + self.counts[k], size + self.sizes[k]
        if cuts and not self.group_bytes and n < span // 2:  # no small last group when bytes allow
            cur = cuts.pop() + cur
        cuts.append(cur)
        groups = []
        for shards in cuts:
            rows = np.concatenate([self._rows(k) for k in shards])
            groups.append(Group(tuple(shards), rows[rng.permutation(len(rows))]))
        return groups


class Deal:
    """What rank plan.rank reads of each epoch's order, batch by batch (the module docstring).
    `first` = (epoch, samples of it already trained): where a resumed loader starts; later
    epochs start at 0."""

    def __init__(self, plan: Plan, order: Order, first: tuple[int, int] = (0, 0)):
        self.plan, self.order, self.first = plan, order, (int(first[0]), int(first[1]))
        if plan.train and self.left(self.first[1]) == 0:  # saved after the epoch's last step: the next one
            self.first = (self.first[0] + 1, 0)

    @property
    def global_batch(self) -> int:
        return self.plan.batch_size * self.plan.world_size

    def start(self, epoch: int) -> int:
        return self.first[1] if self.plan.train and epoch == self.first[0] else 0

    def batches(self, epoch: int) -> int:
        """This rank's batches in `epoch`: the same on every rank."""
        return self.left(self.start(epoch)) if self.plan.train else self.plan.batches

    def left(self, samples: int) -> int:
        """Global batches an epoch has left after `samples` of it (fewer than one global batch
        of it are never trained)."""
        return (self.plan.samples - samples) // self.global_batch

    def positions(self, epoch: int, i: int) -> np.ndarray:
        """The positions in the epoch's sequence of this rank's batch i."""
        b = self.plan.batch_size
        if self.plan.train:
            first = self.start(epoch) + (i * self.plan.world_size + self.plan.rank) * b
            return np.arange(first, first + b)
        lo, hi = self.plan.part
        return np.minimum(lo + i * b + np.arange(b), hi - 1)  # padded with the part's last sample

    def samples(self, epoch: int, i: int) -> np.ndarray:
        """(B, 2): shard and sample within it of this rank's batch i."""
        return self.order.sequence(epoch)[self.positions(epoch, i)]


def order_for(plan: Plan, seed: int, params: dict | None = None) -> Order:
    """The plan's order; `params`: a saved Order.params, for a resumed run."""
    sizes = [e["bytes"] + e.get("index_bytes", 0) for e in plan.entries] if plan.entries else None
    return Order(plan.counts, seed, plan.train, sizes, **(params or {}))
