"""Shards of object storage read through the node's cache while they arrive: a prefetch thread
fetches the groups of pipeline.epoch's order ahead of the reader, so a run trains as soon as
its first groups are cached, and a set larger than the cache's budget streams through it.

Every rank reads the same groups at the same time (the order is dealt a global batch at a
time), so the node's processes share one window of them: each pins the groups its batch needs
and the next WINDOW, fetched while those are read; a group the reader has moved past (by one
group: the torch loader's workers still read it) is unpinned, to be evicted when room is
needed. When the set fits the budget, nothing is ever evicted and the next epoch reads the
cache alone; when it does not, groups are cut by bytes (budget()) so the window fits.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from pipeline.cache import CacheError, Shard
from pipeline.epoch import Deal
from pipeline.fetch import ShardSet
from pipeline.store import StoreError

WINDOW = 1  # groups fetched ahead of the ones the reader needs now


def budget(shards: list[Shard], share: int, min_samples: int) -> int | None:
    """group_bytes for the training window's `share` of the cache: the groups being read (two, at
    a group's edge), the one behind and WINDOW ahead must fit; None if not even groups of
    min_samples do."""
    group = share // (WINDOW + 3)
    return group if largest_group(shards, min_samples) <= group else None


def largest_group(shards: list[Shard], min_samples: int) -> int:
    """The most bytes a group of at least min_samples samples may need: as many shards as the
    fewest-sample shards take to reach it, each of the largest shard's bytes."""
    counts, n = sorted(s.samples for s in shards), 0
    for taken, count in enumerate(counts, 1):
        n += count
        if n >= min_samples:
            break
    return taken * max(s.total for s in shards)


def window_bytes(shards: list[Shard], min_samples: int) -> int:
    """What a process pins at most with the smallest groups possible (validation's: a shard each),
    never more than the split."""
    return min((WINDOW + 3) * largest_group(shards, min_samples), sum(s.total for s in shards))


class Window:
    """The groups of a Deal's epochs fetched ahead of its reader, in the cache. `wait(epoch,
    positions)` returns once the shards of those positions are cached and pinned; `reader`, if
    given, is told to close the files of shards it releases."""

    def __init__(self, deal: Deal, sset: ShardSet, shards: list[Shard], limit: int, reader=None):
        self.deal, self.sset, self.shards, self.limit, self.reader = deal, sset, shards, limit, reader
        self.order = deal.order
        self._pins: dict[int, tuple[object, int]] = {}  # shard -> (pin, groups holding it)
        self._ready: dict[tuple[int, int], tuple[int, ...]] = {}  # (epoch, group) -> its shards, fetched
        self._at = self._first()  # the first group the reader still needs
        self._error: BaseException | None = None
        self._cond = threading.Condition()  # guards all of the above
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Fetching from now on (at the latest at the first wait). The thread holds only a weak
        reference: the reader's end is its end."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=_prefetch, args=(weakref.ref(self),), name="shard-prefetch",
                                                daemon=True)
                self._thread.start()

    def _first(self) -> tuple[int, int]:
        epoch = self.deal.first[0]
        if self.deal.batches(epoch) == 0:
            return epoch + 1, 0
        return epoch, int(self.order.group_of(epoch, self.deal.positions(epoch, 0)[:1])[0])

    def tar(self, k: int) -> str:
        return str(self.sset.tar(self.shards[k]))

    def index(self, k: int) -> str:
        return str(self.sset.index(self.shards[k]))

    def wait(self, epoch: int, positions: np.ndarray) -> None:
        needed = sorted(set(self.order.group_of(epoch, positions).tolist()))
        self.start()
        with self._cond:
            self._at = max(self._at, (epoch, needed[0]))
            self._release_before((self._at[0], self._at[1] - 1))
            self._cond.notify_all()
            while not all((epoch, g) in self._ready for g in needed):
                if self._error is not None:
                    raise self._error
                self._cond.wait(0.5)

    def _release_before(self, at: tuple[int, int]) -> None:
        for key in [k for k in self._ready if k < at]:
            for k in self._ready.pop(key):
                pin, users = self._pins[k]
                if users > 1:
                    self._pins[k] = (pin, users - 1)
                    continue
                del self._pins[k]
                if self.reader is not None:
                    self.reader.close(k)
                pin.close()

    def _next(self, epoch: int, g: int) -> tuple[int, int]:
        return (epoch, g + 1) if g + 1 < len(self.order.groups(epoch)) else (epoch + 1, 0)

    def next_wanted(self) -> tuple[int, int] | None:
        """The first group from the reader's position on that is not fetched, within the window
        (its needed groups, WINDOW more) and, for a budget the set does not fit, its bytes."""
        with self._cond:
            at, pinned = self._at, sum(self.shards[k].total for k in self._pins)
            for ahead in range(WINDOW + 2):
                if at not in self._ready:
                    new = sum(self.shards[k].total for k in self.order.groups(at[0])[at[1]].shards if k not in self._pins)
                    return at if ahead < 2 or pinned + new <= self.limit else None
                at = self._next(*at)
            return None

    def fetch_group(self, epoch: int, g: int) -> None:
        """Pin, fetch (several at once) and hand over the group's shards."""
        shards = self.order.groups(epoch)[g].shards
        with self._cond:
            new = [k for k in shards if k not in self._pins]
            for k in set(shards) - set(new):  # held from now on, so no release closes them meanwhile
                pin, users = self._pins[k]
                self._pins[k] = (pin, users + 1)
        pins = {k: self.sset.pin(self.shards[k]) for k in new}
        try:
            self.sset.fetch_all([self.shards[k] for k in new], self._stop)
        except BaseException:
            for pin in pins.values():
                pin.close()
            raise
        with self._cond:
            if self._stop.is_set():  # closed meanwhile: nothing may stay pinned after close
                for pin in pins.values():
                    pin.close()
                return
            self._pins.update({k: (pin, 1) for k, pin in pins.items()})  # only this thread adds shards
            self._ready[(epoch, g)] = tuple(shards)
            self._release_before((self._at[0], self._at[1] - 1))  # the reader may have moved past it meanwhile
            self._cond.notify_all()

    def fail(self, e: BaseException) -> None:
        with self._cond:
            self._error = e
            self._cond.notify_all()

    def idle(self) -> None:
        with self._cond:
            self._cond.wait(0.2)

    def close(self) -> None:
        """Stop fetching and unpin everything; from another thread, wait (briefly) for the
        prefetch thread to finish the group it holds, so that its pins are gone on return."""
        self._stop.set()
        with self._cond:
            self._release_before((1 << 62, 0))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def __del__(self):
        self.close()


def _prefetch(ref) -> None:
    """The prefetch thread: fetch what the window will want next, until the window is gone."""
    while (window := ref()) is not None and not window._stop.is_set():
        try:
            want = window.next_wanted()
            if want is None:
                window.idle()
            else:
                window.fetch_group(*want)
        except (StoreError, CacheError) as e:
            return window.fail(e)
        except Exception as e:  # noqa: BLE001 - anything else still reaches the trainer as one line
            return window.fail(CacheError(f"the shard cache's prefetch failed ({type(e).__name__}: {e})."))
        finally:
            del window
