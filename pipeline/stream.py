"""DALI's input when a shard set does not fit the node's cache: one pipeline for the whole run,
fed by fn.external_source from cached shards that a prefetch thread fetches ahead of it.

DALI's webdataset reader opens every file of its list when it is built, so a pipeline over the
whole set needs the whole set on disk; one pipeline per window of shards would cost a build per
window (0.25 s, some 270 samples of work at 64 px on this CPU: BENCHMARKS.md) and restart the
shuffle at every window. Instead the order is made here, as DALI's reader makes it:

- rank r reads, in epoch e, slice (r + e) mod w of the split's samples in shard order (DALI
  without stick_to_shard), validation its own part every epoch, padded with its last sample;
- the slice is cut into groups of consecutive shards of at most `group_bytes` (at least a batch,
  at most SHUFFLE_BUFFER samples) and the samples of a group are shuffled: the reader's shuffle
  buffer, bounded by the budget instead of 1,024 samples.

WINDOW groups are pinned at once (the one or two a batch reads, and the next, fetched while
those are read); used groups are unpinned and evicted as room is needed. budget() picks the
largest groups whose window fits the loader's share of the budget, over every slice. The order
is a function of (seed, rank, epoch, group_bytes) and a batch of its (epoch, iteration), which
DALI's checkpoint restores for a BatchInfo source: exact resume.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from pipeline.cache import CacheError, Shard, mb
from pipeline.epoch import SHUFFLE_BUFFER, Plan, derive_seed
from pipeline.fetch import ShardSet
from pipeline.manifest import ROLES
from pipeline.store import StoreError
from pipeline.tar_index import parse_index

WINDOW = 3  # groups pinned at once


@dataclass(frozen=True)
class Group:
    shards: tuple[int, ...]  # indexes into the plan's shards
    samples: np.ndarray  # (n, 2): shard index, sample within the shard, in reading order


def slice_of(plan: Plan, epoch: int) -> tuple[int, int]:
    """[start, end) of the samples the rank reads in `epoch`, as DALI's reader does."""
    if not plan.train:
        return plan.part
    s, n, w = (plan.rank + epoch) % plan.world_size, plan.samples, plan.world_size
    return n * s // w, n * (s + 1) // w


def cut(plan: Plan, shards: list[Shard], lo: int, hi: int, group_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Samples [lo, hi) in shard order as groups of (shard, first, end) segments: consecutive
    shards up to group_bytes (or SHUFFLE_BUFFER samples), but never fewer than a batch."""
    out, cur, size, count = [], [], 0, 0
    for k, (a, n) in enumerate(zip(plan.starts, plan.counts)):
        if a >= hi or a + n <= lo:
            continue
        if cur and count >= plan.batch_size and (size + shards[k].total > group_bytes or count >= SHUFFLE_BUFFER):
            out.append(cur)
            cur, size, count = [], 0, 0
        cur.append((k, max(lo, a) - a, min(hi, a + n) - a))
        size, count = size + shards[k].total, count + cur[-1][2] - cur[-1][1]
    return [*out, cur]


def groups(plan: Plan, shards: list[Shard], epoch: int, seed: int, group_bytes: int) -> list[Group]:
    """The epoch's groups in reading order, the samples of each shuffled when training."""
    rng = np.random.default_rng(derive_seed("stream", seed, plan.rank, epoch))
    out = []
    for segs in cut(plan, shards, *slice_of(plan, epoch), group_bytes):
        samples = np.concatenate([np.stack([np.full(b - a, k), np.arange(a, b)], 1) for k, a, b in segs])
        out.append(Group(tuple(k for k, _, _ in segs), samples[rng.permutation(len(samples))] if plan.train else samples))
    return out


def window_bytes(plan: Plan, shards: list[Shard], group_bytes: int) -> int:
    """The most bytes the shards of WINDOW consecutive groups hold, over every epoch's slice and
    on into the next (the slices come round again after world_size epochs)."""
    epochs = plan.world_size if plan.train else 1
    seq = [{k for k, _, _ in g} for e in range(epochs) for g in cut(plan, shards, *slice_of(plan, e), group_bytes)]
    n = len(seq)
    windows = [set().union(*(seq[(i + j) % n] for j in range(min(WINDOW, n)))) for i in range(n)]
    return max(sum(shards[k].total for k in w) for w in windows)


def budget(plan: Plan, shards: list[Shard], share: int) -> int | None:
    """The largest group_bytes whose window of groups fits `share` bytes, over every slice (down
    to groups of one batch); None if not even those fit."""
    group = max(0, share // WINDOW)
    while window_bytes(plan, shards, group) > share:
        if group == 0:
            return None
        group //= 2
    return group


class _Open:
    """A pinned, cached shard open for reading: its fd and each sample's image members."""

    def __init__(self, sset: ShardSet, s: Shard, pin):
        self.pin, self.fd = pin, os.open(sset.tar(s), os.O_RDONLY)
        self._close = weakref.finalize(self, os.close, self.fd)
        self.members = [{name.split(".")[1]: (off, size) for name, off, size in m} for m in parse_index(sset.index(s))]
        self.users = 0

    def read(self, sample: int) -> list[np.ndarray]:
        m = self.members[sample]
        return [np.frombuffer(os.pread(self.fd, m[r][1], m[r][0]), np.uint8) for r in ROLES]

    def close(self) -> None:
        self._close()
        self.pin.close()


class StreamSource:
    """The external_source callable: BatchInfo -> the batch's encoded bg, fg_bg, mask, depth.
    DALI calls it from the thread that iterates, a few batches ahead of the trainer; a prefetch
    thread keeps the next WINDOW groups fetched and pinned."""

    def __init__(self, plan: Plan, sset: ShardSet, shards: list[Shard], seed: int, group_bytes: int):
        self.plan, self.sset, self.shards, self.seed, self.group_bytes = plan, sset, shards, seed, group_bytes
        self._groups: dict[int, list[Group]] = {}
        self._open: dict[int, _Open] = {}  # shard index -> open shard, while a pinned group uses it
        self._pinned: dict[tuple[int, int], Group] = {}  # (epoch, group) -> group, fetched
        self._at = (0, 0)  # the first group the source still needs
        self._error: BaseException | None = None
        self._cond = threading.Condition()  # guards all of the above
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, info):
        if info.iteration >= self.plan.batches:
            raise StopIteration
        epoch, b = info.epoch_idx, self.plan.batch_size
        picks = self._positions(epoch, info.iteration * b, (info.iteration + 1) * b)
        needed = sorted({g for g, _ in picks})
        self._wait_for(epoch, needed)
        out = [[] for _ in ROLES]
        for _, (k, sample) in picks:
            for role, data in zip(out, self._open[k].read(sample)):
                role.append(data)
        return tuple(out)

    def _positions(self, epoch: int, start: int, end: int) -> list[tuple[int, tuple[int, int]]]:
        """(group, (shard, sample)) of positions [start, end); validation pads with its last sample."""
        gs = self.epoch_groups(epoch)
        bounds = np.cumsum([len(g.samples) for g in gs])
        picks = []
        for p in range(start, end):
            p = min(p, int(bounds[-1]) - 1)
            g = int(np.searchsorted(bounds, p, side="right"))
            picks.append((g, tuple(int(x) for x in gs[g].samples[p - (int(bounds[g - 1]) if g else 0)])))
        return picks

    def epoch_groups(self, epoch: int) -> list[Group]:
        with self._cond:
            if epoch not in self._groups:
                self._groups = {e: g for e, g in self._groups.items() if e >= epoch - 1}
                self._groups[epoch] = groups(self.plan, self.shards, epoch, self.seed, self.group_bytes)
            return self._groups[epoch]

    def _wait_for(self, epoch: int, needed: list[int]) -> None:
        with self._cond:
            self._at = (epoch, needed[0])
            self._release_before(self._at)
            self._cond.notify_all()
            if self._thread is None:  # the thread holds only a weak reference: the loader's end is its end
                self._thread = threading.Thread(target=_prefetch, args=(weakref.ref(self),), name="shard-prefetch",
                                                daemon=True)
                self._thread.start()
            while not all((epoch, g) in self._pinned for g in needed):
                if self._error is not None:
                    raise self._error
                self._cond.wait(0.5)

    def _release_before(self, at: tuple[int, int]) -> None:
        for key in [k for k in self._pinned if k < at]:
            for k in self._pinned.pop(key).shards:
                shard = self._open[k]
                shard.users -= 1
                if shard.users == 0:
                    shard.close()
                    del self._open[k]

    def next_wanted(self) -> tuple[int, int] | None:
        """The first of the WINDOW groups from the consumer's position that is not fetched yet."""
        with self._cond:
            epoch, g = self._at
            for _ in range(WINDOW):
                if (epoch, g) not in self._pinned:
                    return epoch, g
                g += 1
                if g == len(self.epoch_groups(epoch)):
                    epoch, g = epoch + 1, 0
            return None

    def fetch_group(self, epoch: int, g: int) -> None:
        """Pin, fetch (several at once) and open the group's shards, then hand the group over."""
        group = self.epoch_groups(epoch)[g]
        with self._cond:
            new = [k for k in group.shards if k not in self._open]
            for k in set(group.shards) - set(new):  # held from now on, so no release closes them meanwhile
                self._open[k].users += 1
        pins = {k: self.sset.pin(self.shards[k]) for k in new}
        try:
            self.sset.fetch_all([self.shards[k] for k in new], self._stop)
            opened = {k: _Open(self.sset, self.shards[k], pins[k]) for k in new}
        except BaseException:
            for pin in pins.values():
                pin.close()
            raise
        with self._cond:
            self._open.update(opened)  # only this thread adds shards, so none of `new` appeared meanwhile
            for k in new:
                self._open[k].users += 1
            self._pinned[(epoch, g)] = group
            self._release_before(self._at)  # the consumer may have moved past it meanwhile
            self._cond.notify_all()

    def feed(self) -> "_Feed":
        """What to give DALI's external_source: DALI's graph keeps its callable in reference
        cycles until some later garbage collection, so it gets only a weak reference, and the
        loader that owns this source frees it (and its pins) as soon as the loader goes."""
        return _Feed(weakref.ref(self))

    def fail(self, e: BaseException) -> None:
        with self._cond:
            self._error = e
            self._cond.notify_all()

    def idle(self) -> None:
        with self._cond:
            self._cond.wait(0.2)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._release_before((1 << 62, 0))


class _Feed:
    def __init__(self, ref):
        self.ref = ref

    def __call__(self, info):
        source = self.ref()
        if source is None:  # the loader is gone; DALI may still be running ahead
            raise StopIteration
        return source(info)


def _prefetch(ref) -> None:
    """The prefetch thread: fetch what the source will want next, until the source is gone."""
    while (source := ref()) is not None and not source._stop.is_set():
        try:
            want = source.next_wanted()
            if want is None:
                source.idle()
            else:
                source.fetch_group(*want)
        except (StoreError, CacheError) as e:
            return source.fail(e)
        except Exception as e:  # noqa: BLE001 - anything else still reaches the trainer as one line
            return source.fail(CacheError(f"the shard cache's prefetch failed ({type(e).__name__}: {e})."))
        finally:
            del source
