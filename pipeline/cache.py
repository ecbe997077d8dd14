"""The node-local shard cache: whole shards from object storage on local disk, checked against
the manifest, shared by every process of a node, within a byte budget.

    <root>/                       --cache-dir, DEPTHSEG_CACHE_DIR, else $XDG_CACHE_HOME/depthseg/shards
      .lock                       held while space is counted, reserved or freed
      <set>/                      one shard set: a hash of the endpoint and the s3:// prefix
        source.json               {"url", "endpoint"}, for `depthcli cache show`
        train-000000.tar, .idx    complete, checked shards under their own names
        train-000000.tar.ok       stamp: the manifest's sha256, the files' sizes and mtimes
        .train-000000.tar.<bytes>.<pid>.part   a download under way (its final size in the name)
        .pins/                    flock files: set.pin (verify holds the whole set), <tar>.pin
                                  (in use or about to be read), <tar>.fetch (being fetched)

A shard is a hit when its stamp holds the manifest's sha256 and the tar and index still have the
sizes and mtimes it recorded: two stats and a small read, no hashing; a truncated or edited file,
or another set uploaded under the same prefix, is a miss and is fetched again. Fetching (in
pipeline.fetch) takes the shard's fetch lock, so each shard is fetched once per node whatever the
number of processes. The budget counts every byte under the root, downloads under way at their
final size; room is made by evicting the least recently used shards that no process has pinned.
flock locks go with their process, so a killed process never leaves a shard locked.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline import store
from pipeline.manifest import LoaderError, write_json_atomic

ENV_DIR, ENV_LIMIT = "DEPTHSEG_CACHE_DIR", "DEPTHSEG_CACHE_LIMIT"
# --cache-dir and --cache-limit, for depthcli and the trainer alike.
CACHE_DIR_HELP = ("node-local cache of s3:// shards, shared by the node's processes; off = none (then each sample is "
                  "a ranged GET, slowly); empty = $DEPTHSEG_CACHE_DIR, else $XDG_CACHE_HOME/depthseg/shards, else "
                  "~/.cache/depthseg/shards")
CACHE_LIMIT_HELP = ("bytes the shard cache may hold, e.g. 500MB or 20GB; a set larger than this is streamed through "
                    "it; empty = $DEPTHSEG_CACHE_LIMIT, else what it holds plus the free disk, less 5 per cent of the disk")
OFF = "off"  # --cache-dir off: no cache (DALI then reads s3:// itself, one small GET per member)
STAMP, PART = ".ok", ".part"
# How long a process waits for room that other processes' pins hold, before it says so.
ROOM_WAIT_S = 60.0
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class CacheError(LoaderError):
    """The shard cache cannot do what was asked (disk full, budget too small); one sentence."""


def default_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get(ENV_DIR) or Path(xdg) / "depthseg" / "shards")


def parse_size(text: str | int | None) -> int | None:
    """'20GB', '512MiB', '1.5t' or a number of bytes; None or '' for the default."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise CacheError(f"--cache-limit {text} is not a size such as 500MB, 20GB or 1.5TiB.")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def lock(path: Path, mode: int, wait: bool = True) -> int | None:
    """An flock on path (made if missing): its fd, to close when done; None if not free and not
    `wait`. Each call opens its own fd, so threads of one process exclude each other too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def unlock(fd: int | None) -> None:
    """Release, then close: a child forked meanwhile (a torch loader's worker) shares the fd's open
    file description, and closing ours alone would leave the lock held as long as the child lives."""
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass(frozen=True)
class Shard:
    """A shard as the manifest and the store's listing describe it."""

    tar: str
    index: str
    bytes: int
    index_bytes: int
    sha256: str
    samples: int

    @property
    def total(self) -> int:
        return self.bytes + self.index_bytes


class Cache:
    """The cache root on this node and its budget in bytes."""

    def __init__(self, root: str | os.PathLike | None = None, limit: str | int | None = None):
        self.root = Path(root) if root else default_dir()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot make the shard cache {self.root} ({e.strerror}); choose another --cache-dir.") from None
        given = parse_size(limit if limit not in (None, "") else os.environ.get(ENV_LIMIT))
        self.limit = given if given is not None else self._disk_limit()

    def fits(self, set_bytes: int) -> bool:
        """Does a whole set (the tars and indexes of every split) fit the budget?"""
        return set_bytes <= self.limit

    def _disk_limit(self) -> int:
        """By default the cache may use what it holds now plus the free disk, less 5 % of the disk."""
        disk = shutil.disk_usage(self.root)
        return max(0, self.used() + disk.free - disk.total // 20)

    def sets(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (p / "source.json").is_file())

    def used(self) -> int:
        """Bytes under the root, a download under way counted at its final size. Exact under
        locked(): files appear (parts, commits) and go (evictions) only under it."""
        total = 0
        for d in [self.root, *self.sets()]:
            for f in os.scandir(d):
                try:
                    if f.is_file(follow_symlinks=False):
                        total += max(f.stat().st_size, _part_size(f.name))
                except FileNotFoundError:  # a failed download's part, removed meanwhile
                    pass
        return total

    @contextmanager
    def locked(self):
        """The root lock, held while space is counted, reserved, committed or freed."""
        fd = lock(self.root / ".lock", fcntl.LOCK_EX)
        try:
            yield
        finally:
            unlock(fd)

    def reserve(self, need: int, make_parts) -> None:
        """Room for `need` more bytes, then make_parts() (the download's part files, which hold
        the room from then on) under the same lock: evict unpinned shards, least recently used
        first; wait while the pins of other processes hold the room, up to ROOM_WAIT_S."""
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            with self.locked():
                if self._make_room(need):
                    make_parts()
                    return
            if time.monotonic() > deadline:
                raise CacheError(f"the shard cache {self.root} has no room for {mb(need)} more: its budget of "
                                 f"{mb(self.limit)} is held by shards in use; raise --cache-limit.")
            time.sleep(0.2)

    def _make_room(self, need: int) -> bool:
        """Under the root lock: evict until `need` fits the budget and the disk."""
        if need > self.limit:
            raise CacheError(f"a shard of {mb(need)} does not fit the shard cache's budget of {mb(self.limit)}; "
                             f"raise --cache-limit.")
        while True:
            free = shutil.disk_usage(self.root).free
            if self.used() + need <= self.limit and need <= free:
                return True
            if not self._evict_one():
                if need > free:
                    raise disk_full(self.root)
                return False

    def _evict_one(self) -> bool:
        """Delete one shard nobody pins: left-overs (a killed download, a file without its stamp)
        first, then the least recently used."""
        order = []
        for d in self.sets():
            for tar in shard_names(d):
                try:
                    used = (d / (tar + STAMP)).stat().st_mtime
                except OSError:
                    used = 0.0  # no stamp: not a usable shard
                order.append((used, str(d), tar))
        return any(ShardFiles(Path(d), tar).remove_if_unused() for _, d, tar in sorted(order))

    def show(self) -> list[dict]:
        """What each cached set holds, for `depthcli cache show`."""
        out = []
        for d in self.sets():
            source = json.loads((d / "source.json").read_text())
            stamps = list(d.glob(f"*{STAMP}"))
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            last = max((p.stat().st_mtime for p in stamps), default=0.0)
            in_use = any(ShardFiles(d, tar).in_use() for tar in shard_names(d))
            out.append({"url": source["url"], "endpoint": source["endpoint"], "dir": str(d), "shards": len(stamps),
                        "bytes": size, "last_used": last, "in_use": in_use})
        return out

    def clear(self, url: str | None = None) -> tuple[int, int]:
        """Remove every shard (of one set, with url) that no process uses: (removed, kept in use)."""
        removed = kept = 0
        with self.locked():
            for d in self.sets():
                if url and json.loads((d / "source.json").read_text())["url"] != url.rstrip("/"):
                    continue
                for tar in shard_names(d):
                    if ShardFiles(d, tar).remove_if_unused():
                        removed += 1
                    else:
                        kept += 1
        return removed, kept


def disk_full(root: Path) -> CacheError:
    free = shutil.disk_usage(root).free
    return CacheError(f"the disk of the shard cache {root} is full ({mb(free)} free); free some space, lower "
                      f"--cache-limit or choose another --cache-dir.")


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _part_size(name: str) -> int:
    """The final size a download's part file will reach (it is in its name), else 0."""
    m = re.fullmatch(rf"\..+\.(\d+)\.\d+{re.escape(PART)}", name)
    return int(m.group(1)) if m else 0


def shard_names(folder: Path) -> list[str]:
    """The tars a set's folder holds any file of (a shard, its index, stamp or a download)."""
    return sorted({_tar_of(f.name) for f in folder.iterdir() if f.is_file() and f.name != "source.json"})


def _tar_of(name: str) -> str:
    """The tar a cache file belongs to: x.tar.ok, .x.tar.123.45.part, .x.idx.67.45.part -> x.tar."""
    if name.endswith(PART):
        name = name[1:].rsplit(".", 3)[0]
    name = name.removesuffix(STAMP)
    return name[:-4] + ".tar" if name.endswith(".idx") else name


class ShardFiles:
    """The files and locks of one shard (by its tar's name) in a set's folder."""

    def __init__(self, folder: Path, tar: str):
        self.folder, self.tar = folder, tar
        self.pins = folder / ".pins"

    @property
    def index(self) -> str:
        return self.tar[:-4] + ".idx"

    def parts(self) -> list[Path]:
        return [*self.folder.glob(f".{self.tar}.*{PART}"), *self.folder.glob(f".{self.index}.*{PART}")]

    def _free(self) -> list[int] | None:
        """Exclusive locks on the set's pin and the shard's pin and fetch lock, or None (nothing
        held) if a process pins the set or the shard, or fetches it."""
        fds = []
        for name in ("set.pin", f"{self.tar}.pin", f"{self.tar}.fetch"):
            fd = lock(self.pins / name, fcntl.LOCK_EX, wait=False)
            if fd is None:
                for f in fds:
                    unlock(f)
                return None
            fds.append(fd)
        return fds

    def in_use(self) -> bool:
        fds = self._free()
        for fd in fds or []:
            unlock(fd)
        return fds is None

    def remove_if_unused(self) -> bool:
        """Delete the shard's files unless it is in use."""
        fds = self._free()
        if fds is None:
            return False
        try:
            for p in [self.folder / (self.tar + STAMP), self.folder / self.tar, self.folder / self.index, *self.parts()]:
                p.unlink(missing_ok=True)  # the stamp first: a half-removed shard is a miss
            return True
        finally:
            for fd in fds:
                unlock(fd)


def set_folder(cache: Cache, url: str) -> Path:
    """The folder of a shard set in the cache: one per endpoint and prefix."""
    url = url.rstrip("/")
    name = hashlib.sha1(f"{store.endpoint()}|{url}".encode()).hexdigest()[:16]
    folder = cache.root / name
    (folder / ".pins").mkdir(parents=True, exist_ok=True)
    source = folder / "source.json"
    if not source.is_file():
        tmp = folder / f"source.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"url": url, "endpoint": store.endpoint()}) + "\n")
        os.replace(tmp, source)
    return folder


class Pin:
    """A shared flock that keeps shards from eviction while it is held (until close or collection)."""

    def __init__(self, path: Path):
        fd = lock(path, fcntl.LOCK_SH)
        self._close = weakref.finalize(self, unlock, fd)

    def close(self) -> None:
        self._close()


class CachedSet:
    """One shard set's copy in the cache: its files, their stamps (hit or miss) and pins, and the
    installing of a checked download (pipeline.fetch's ShardSet downloads and checks)."""

    def __init__(self, cache: Cache, url: str):
        self.cache, self.url = cache, url.rstrip("/")
        self.folder = set_folder(cache, self.url)

    def tar(self, s: Shard) -> Path:
        return self.folder / s.tar

    def index(self, s: Shard) -> Path:
        return self.folder / s.index

    def hit(self, s: Shard) -> bool:
        """The stamp holds the manifest's sha256, and the files the sizes and mtimes it recorded."""
        try:
            stamp = json.loads((self.folder / (s.tar + STAMP)).read_text())
            t, i = self.tar(s).stat(), self.index(s).stat()
        except (OSError, ValueError):
            return False
        return (stamp.get("sha256") == s.sha256 and t.st_size == s.bytes and t.st_mtime_ns == stamp.get("mtime_ns")
                and i.st_size == stamp.get("index_bytes") and i.st_mtime_ns == stamp.get("index_mtime_ns")
                and (not s.index_bytes or i.st_size == s.index_bytes))

    def touch(self, s: Shard) -> None:
        """Mark the shard used now: eviction takes the least recently used first."""
        try:
            os.utime(self.folder / (s.tar + STAMP))
        except OSError:
            pass

    def pin_set(self) -> Pin:
        return Pin(self.folder / ".pins" / "set.pin")

    def pin(self, s: Shard) -> Pin:
        return Pin(self.folder / ".pins" / f"{s.tar}.pin")

    def fetch_lock(self, s: Shard, stop: threading.Event | None) -> int:
        """The shard's fetch lock (its fd): one fetch per shard per node, whatever the processes."""
        path = self.folder / ".pins" / f"{s.tar}.fetch"
        while (fd := lock(path, fcntl.LOCK_EX, wait=False)) is None:
            if stop is not None and stop.is_set():
                raise CacheError("the shard cache's prefetch was stopped.")
            time.sleep(0.02)
        return fd

    def part_files(self, s: Shard) -> tuple[Path, Path]:
        """Under the fetch lock: the tar's and index's download names, with room reserved for them
        in the budget; the parts a killed process left are deleted first."""
        for p in ShardFiles(self.folder, s.tar).parts():
            p.unlink(missing_ok=True)
        pid = os.getpid()
        parts = (self.folder / f".{s.tar}.{s.bytes}.{pid}{PART}", self.folder / f".{s.index}.{s.index_bytes}.{pid}{PART}")
        self.cache.reserve(s.total, lambda: [p.touch() for p in parts])
        return parts

    def install(self, s: Shard, parts: tuple[Path, Path]) -> None:
        """Checked downloads renamed into place, then the stamp that makes them a hit."""
        with self.cache.locked():  # so that a count of the cache never sees a file twice or not at all
            os.replace(parts[0], self.tar(s))
            os.replace(parts[1], self.index(s))
            t, i = self.tar(s).stat(), self.index(s).stat()
            write_json_atomic(self.folder / (s.tar + STAMP), {
                "sha256": s.sha256, "bytes": t.st_size, "mtime_ns": t.st_mtime_ns, "index_bytes": i.st_size,
                "index_mtime_ns": i.st_mtime_ns, "samples": s.samples})


def localize(url: str | os.PathLike, cache_dir, cache_limit) -> Cache | None:
    """The one entry to the cache, for build_loader and verify alike: the node's cache for the
    shards at `url`, or None when they take none (a folder, or --cache-dir off). A set that fits
    (Cache.fits) is fetched whole and read as a folder; a larger one streams through it."""
    if not store.is_remote(url) or str(cache_dir).lower() == OFF:
        return None
    return Cache(cache_dir or None, cache_limit)
