"""Whole shards from object storage into the node's cache (pipeline.cache), checked on the way.

A fetch takes the shard's fetch lock (a second process waits, then finds the shard there: one
fetch per node), reserves its bytes in the budget, downloads the tar and its index under
temporary names (pipeline.store.download: one GET, or ranged GETs in parallel for a large
shard), hashes the tar as it is written, checks size, sha256 and that the index belongs to the
tar, and only then has the cache install them (pipeline.cache.CachedSet: renamed into place,
stamped). A process killed midway leaves part files that the next fetch of that shard (or an
eviction) deletes, never a shard under its final name.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import store
from pipeline.cache import Cache, CachedSet, CacheError, Shard, disk_full, is_disk_full, unlock
from pipeline.tar_index import index_matches, parse_index

FETCH_THREADS = 4  # shards in flight per process


class BadShard(CacheError):
    """The store's copy of a shard does not match the manifest; `problem` says how, for verify."""

    def __init__(self, url: str, problem: str):
        self.problem = problem
        super().__init__(f"{url}: {problem}; run `depthcli verify {url.rsplit('/', 1)[0]}`.")


class _HashingWriter:
    """What the transfer manager writes, hashed and counted; not seekable, so it writes in order."""

    def __init__(self, f, limit: int):
        self.f, self.sha, self.n, self.limit = f, hashlib.sha256(), 0, limit

    def write(self, data: bytes) -> int:
        self.n += len(data)
        if self.n > self.limit:  # a wrong object must not outgrow the room reserved for it
            raise _TooLong()
        self.sha.update(data)
        return self.f.write(data)

    def seekable(self) -> bool:
        return False


class _TooLong(Exception):
    pass


class ShardSet(CachedSet):
    """A shard set's copy in the cache (pipeline.cache.CachedSet: stamps, pins), filled here:
    shards fetched from the store, checked, then installed."""

    def __init__(self, cache: Cache, url: str, shards: list[Shard]):
        super().__init__(cache, url)
        self.shards = shards
        self.fetched = 0  # shards this object downloaded (the rest were there)
        self._count = threading.Lock()

    def fetch_all(self, shards: list[Shard], stop: threading.Event | None = None) -> None:
        """Every shard there, several fetched at once, in the order given (the order they are read)."""
        if all(self.hit(s) for s in shards):
            for s in shards:
                self.touch(s)
            return
        with ThreadPoolExecutor(min(FETCH_THREADS, len(shards))) as pool:
            futures = [pool.submit(self.fetch, s, stop) for s in shards]
            try:
                for f in futures:
                    f.result()
            finally:
                for f in futures:
                    f.cancel()

    def fetch(self, s: Shard, stop: threading.Event | None = None) -> None:
        """Make the shard a hit (the caller has pinned it or the set)."""
        if self.hit(s):
            return self.touch(s)
        fd = self.fetch_lock(s, stop)
        try:
            if self.hit(s):  # another process fetched it while this one waited
                return self.touch(s)
            self._download(s)
            with self._count:
                self.fetched += 1
        finally:
            unlock(fd)

    def _download(self, s: Shard) -> None:
        """Under the fetch lock: the tar and index to part files, checked, then installed."""
        parts = self.part_files(s)
        try:
            sha = self._get(store.join(self.url, s.tar), parts[0], s.bytes)
            self._get(store.join(self.url, s.index), parts[1], s.index_bytes or 1 << 30)
            self._check(s, parts, sha)
            self.install(s, parts)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.cache.root) from None
            raise CacheError(f"cannot write to the shard cache {self.folder} ({e.strerror or e}).") from None
        finally:
            for p in parts:
                p.unlink(missing_ok=True)

    def _get(self, url: str, part: Path, limit: int) -> str:
        """The object into `part`: its sha256. A stream broken midway is fetched again, up to the
        store's attempts (a request that fails at once botocore has retried already)."""
        attempts = store.TIMEOUTS["retries"]["total_max_attempts"]
        for attempt in range(attempts):
            with open(part, "wb") as f:
                writer = _HashingWriter(f, limit)
                try:
                    store.download(url, writer, limit)
                    break
                except _TooLong:
                    raise BadShard(url, f"{url.rsplit('/', 1)[1]} has more than the {limit} bytes the manifest says") from None
                except store.StoreError:
                    if writer.n == 0 or attempt == attempts - 1:
                        raise
            time.sleep(0.5 * 2**attempt)
        if writer.n != limit and url.endswith(".tar"):
            raise BadShard(url, f"{url.rsplit('/', 1)[1]} has {writer.n} bytes, the manifest says {limit}")
        return writer.sha.hexdigest()

    def _check(self, s: Shard, parts: tuple[Path, Path], sha: str) -> None:
        url = store.join(self.url, s.tar)
        if sha != s.sha256:
            raise BadShard(url, f"{s.tar} does not match its sha256 in the manifest")
        try:
            samples = parse_index(s.index, parts[1].read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise BadShard(url, str(e)) from None
        if len(samples) != s.samples:
            raise BadShard(url, f"{s.index} lists {len(samples)} samples, the manifest says {s.samples}")
        if not index_matches(parts[0], samples, s.bytes):
            raise BadShard(url, f"{s.index} does not agree with {s.tar}")
