"""A shard set's samples read one at a time at the offsets of their DALI indexes: what both
loaders read through, in the order pipeline.epoch deals. A sample's members are adjacent in its
tar, so a sample is one read (os.pread; a ranged GET for an s3:// shard read without the cache),
and the header in front of each member must carry the index's name for it: an index that does
not belong to its tar stops with one sentence instead of mixing members of different samples.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from pipeline import store
from pipeline.manifest import ROLES, LoaderError
from pipeline.tar_index import HEADER, header_names, parse_index


class SampleReader:
    """Samples by (shard, sample within it) from the tars and indexes given (paths or s3:// URLs;
    for a cached set, the cache's files). `keep_open`: file descriptors kept between reads (the
    most recently used); 0 opens and closes a tar per read, so a shard the cache evicts frees its
    disk at once. Picklable: a torch worker opens its own files."""

    def __init__(self, tars: list[str], indexes: list[str], origin: str, keep_open: int = 64):
        self.tars, self.indexes, self.origin, self.keep_open = list(tars), list(indexes), origin, keep_open
        self._members: dict[int, list] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_members": {}, "_fds": OrderedDict()}

    def __del__(self):
        self.close()

    def members(self, k: int) -> list[list[tuple[str, int, int]]]:
        """Shard k's samples as lists of (member name, offset, size), its index read once."""
        if k not in self._members:
            idx = self.indexes[k]
            try:
                text = store.read_bytes(idx).decode() if store.is_remote(idx) else None
                self._members[k] = parse_index(idx, text)
            except OSError as e:
                raise LoaderError(f"could not read {idx} ({e.strerror or e}); run `depthcli verify {self.origin}`.") from None
            except (ValueError, UnicodeDecodeError) as e:
                raise LoaderError(f"could not read {idx} ({e}); run `depthcli verify {self.origin}`.") from None
        return self._members[k]

    def key(self, k: int, i: int) -> str:
        """The sample's key, as in the shards: <key> of <key>.fg_bg.jpg."""
        return self.members(k)[i][0][0].split(".", 1)[0]

    def read(self, k: int, i: int) -> list[bytes]:
        """The sample's encoded bg, fg_bg, mask and depth."""
        members = self.members(k)[i]
        lo = min(off for _, off, _ in members) - HEADER
        hi = max(off + size for _, off, size in members)
        data = self._read(k, lo, hi - lo, members)
        found = {}
        for name, off, size in members:
            if not header_names(data[off - HEADER - lo:off - lo], name):
                raise LoaderError(f"{self.indexes[k]} does not agree with {self.tars[k]}; run `depthcli verify {self.origin}`.")
            found[name.split(".")[1]] = data[off - lo:off - lo + size]
        missing = [r for r in ROLES if r not in found]
        if missing:
            raise LoaderError(f"sample {self.key(k, i)} in {self.tars[k]} has no {missing[0]} image; "
                              f"run `depthcli verify {self.origin}`.")
        return [found[r] for r in ROLES]

    def _read(self, k: int, start: int, size: int, members: list) -> bytes:
        tar = self.tars[k]
        if store.is_remote(tar):
            data = store.read_range(tar, start, size)
        else:
            try:
                data = os.pread(self._fd(k), size, start)
            except OSError as e:
                self.close(k)
                raise LoaderError(f"could not read {tar} ({e.strerror or e}); run `depthcli verify {self.origin}`.") from None
            finally:
                if not self.keep_open:
                    self.close(k)
        if len(data) != size:
            inside = next(name for name, off, n in members if off + n > start + len(data))
            raise LoaderError(f"could not read {tar} (it ends inside {inside}); run `depthcli verify {self.origin}`.")
        return data

    def _fd(self, k: int) -> int:
        if k in self._fds:
            self._fds.move_to_end(k)
            return self._fds[k]
        fd = self._fds[k] = os.open(self.tars[k], os.O_RDONLY)
        while len(self._fds) > max(1, self.keep_open):
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self, k: int | None = None) -> None:
        """Shard k's file (every file: None) closed, until it is read again."""
        for j in list(self._fds) if k is None else [k]:
            fd = self._fds.pop(j, None)
            if fd is not None:
                os.close(fd)
