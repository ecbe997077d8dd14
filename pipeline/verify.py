"""Check a shard folder against its manifest.

    depthcli verify shards/ [--decode]
    depthcli verify s3://bucket/prefix        # each shard fetched into the node's shard cache once

Every shard present with the manifest's size and sha256; its index agrees with the tar member for
member (name, data offset, size); sample counts match; every sample has its four images (jpg or
png, as the bytes say) and its json. `--decode` also decodes every image. Stops at the first bad
shard and names it.

From s3://, when the set fits the shard cache's budget, shards are checked as the loaders will
read them: fetched into the cache (sha256 checked on the way) unless already there, then checked
there, so that training after it reads nothing from the store; `--cache-dir off` (or a set too
large for the budget) streams each shard from the store instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

from tqdm import tqdm

from pipeline import store
from pipeline.errors import DepthsegError
from pipeline.manifest import ROLES, SPLITS, read_manifest
from pipeline.source import BadSample, check_image, image_format
from pipeline.tar_index import parse_index
from pipeline.workers import cpu_share, ordered, worker_pool


class VerifyError(DepthsegError):
    """The first problem found; the message is one sentence for the user."""


class _HashingReader:
    """Hashes every byte tarfile reads, so the shard is read from disk once."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def read(self, size=-1):
        b = self.f.read(size)
        self.sha.update(b)
        self.n += len(b)
        return b

    def drain(self):
        while self.read(1 << 20):
            pass


def _check_sample(key: str, members: dict[str, bytes], decode: bool) -> None:
    images = {m.split(".", 1)[0]: m for m in members if m != "json"}
    if "json" not in members or set(images) != set(ROLES) or len(members) != len(ROLES) + 1:
        raise BadSample(f"sample {key} holds {', '.join(sorted(members))}, not the bg, fg_bg, mask and depth images and json")
    for role, name in images.items():
        fmt = name.split(".", 1)[1]
        if image_format(members[name]) != fmt:
            raise BadSample(f"sample {key}: {name} does not hold {fmt} bytes")
        if decode:
            check_image(members[name], f"sample {key}: {role}")
    try:
        json.loads(members["json"])
    except ValueError:
        raise BadSample(f"sample {key}: its json is not valid") from None


def verify_shard(folder: Path | str, entry: dict, decode: bool, cache: tuple | None = None) -> str | None:
    """None when the shard is good, else what is wrong with it. `folder` may be an s3:// prefix;
    then `cache` (root, limit) checks the shard in the node's shard cache, fetched if missing."""
    if store.is_remote(folder) and cache is not None:
        return _verify_cached(folder, entry, decode, cache)
    if store.is_remote(folder):
        url = store.join(folder, entry["tar"])
        try:
            with store.errors(url):  # a stream broken midway, too
                return _verify_stream(store.open_stream(url), store.join(folder, entry["index"]), entry, decode)
        except store.StoreError as e:
            return str(e).rstrip(".")
    tar_path, idx_path = Path(folder) / entry["tar"], Path(folder) / entry["index"]
    for p in (tar_path, idx_path):
        if not p.is_file():
            return f"{p.name} is missing"
    if tar_path.stat().st_size != entry["bytes"]:
        return f"{tar_path.name} has {tar_path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    with open(tar_path, "rb") as f:
        return _verify_stream(f, idx_path, entry, decode)


def _verify_cached(folder: str, entry: dict, decode: bool, cache: tuple) -> str | None:
    from pipeline.cache import Cache, Shard
    from pipeline.fetch import BadShard, ShardSet

    shard = Shard(entry["tar"], entry["index"], entry["bytes"], entry["index_bytes"], entry["sha256"], entry["samples"])
    sset = ShardSet(Cache(*cache), str(folder), [shard])
    try:
        sset.fetch(shard)
    except BadShard as e:
        return e.problem
    except store.StoreError as e:
        return str(e).rstrip(".")
    with open(sset.tar(shard), "rb") as f:
        return _verify_stream(f, sset.index(shard), entry, decode)


def _verify_stream(f, idx_path: Path | str, entry: dict, decode: bool) -> str | None:
    """The checks of verify_shard on an open tar stream, read once from its start."""
    tar_name, idx_name = entry["tar"], entry["index"]
    try:
        text = store.read_bytes(idx_path).decode() if store.is_remote(idx_path) else None
        index = parse_index(idx_path, text)
    except (ValueError, UnicodeDecodeError) as e:
        return str(e)
    seen: list[list[tuple[str, int, int]]] = []
    try:
        reader = _HashingReader(f)
        key, members = None, {}
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for m in tar:
                k, ext = m.name.split(".", 1)
                if k != key:
                    if key is not None:
                        _check_sample(key, members, decode)
                    key, members = k, {}
                    seen.append([])
                members[ext] = tar.extractfile(m).read()
                seen[-1].append((m.name, m.offset_data, m.size))
            if key is not None:
                _check_sample(key, members, decode)
        reader.drain()
    except BadSample as e:
        return f"{tar_name}: {e}"
    except (tarfile.TarError, ValueError, OSError) as e:
        return f"{tar_name} is not a readable tar ({e})"
    if reader.n != entry["bytes"]:
        return f"{tar_name} has {reader.n} bytes, the manifest says {entry['bytes']}"
    if reader.sha.hexdigest() != entry["sha256"]:
        return f"{tar_name} does not match its sha256 in the manifest"
    if seen != index:
        return f"{idx_name} does not agree with {tar_name}"
    if len(seen) != entry["samples"]:
        return f"{tar_name} holds {len(seen)} samples, the manifest says {entry['samples']}"
    return None


def _verify_star(args):
    return args[1]["tar"], verify_shard(*args)


def _through_cache(folder: str, entries: list[dict], cache_dir, cache_limit):
    """(root, limit) of the shard cache for an s3:// set that fits it, and a pin on the set; else None."""
    from pipeline.cache import CachedSet, localize

    cache = localize(folder, cache_dir, cache_limit)
    if cache is None:
        return None, None
    sizes = store.sizes(str(folder))
    for e in entries:
        e["index_bytes"] = sizes.get(e["index"], 0)
    if not cache.fits(sum(e["bytes"] + e["index_bytes"] for e in entries)):
        return None, None
    return (str(cache.root), cache.limit), CachedSet(cache, str(folder)).pin_set()


def verify(folder: str | os.PathLike, decode: bool = False, workers: int | None = None,
           cache_dir: str | None = None, cache_limit: str | int | None = None) -> dict:
    """Raise VerifyError naming the first bad shard; return a summary when all are good."""
    folder = folder if store.is_remote(folder) else Path(folder)
    manifest = read_manifest(folder)
    entries = [e for split in SPLITS for e in manifest["splits"].get(split, {}).get("shards", [])]
    for split in SPLITS:
        part = manifest["splits"].get(split, {"samples": 0, "shards": []})
        if part["samples"] != sum(e["samples"] for e in part["shards"]):
            raise VerifyError(f"the manifest's {split} sample count disagrees with its shards.")
    t = manifest["totals"]
    if t["packed"] + t["skipped"] != t["found"] or t["skipped"] != len(manifest["skipped"]):
        raise VerifyError("the manifest's totals do not add up (packed + skipped != found).")
    sizes = {e["tar"]: e["bytes"] for e in entries}
    cache, pin = _through_cache(folder, entries, cache_dir, cache_limit)
    with worker_pool(min(workers or cpu_share(), len(entries)), __name__) as pool, \
            tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="verify") as bar:
        for name, problem in ordered(pool, _verify_star, [(folder, e, decode, cache) for e in entries], window=64):
            if problem:
                raise VerifyError(f"bad shard {name}: {problem}.")
            bar.update(sizes[name])
    if pin is not None:
        pin.close()
    return {"shards": len(entries), "samples": t["packed"], "bytes": sum(sizes.values()), "decoded": decode,
            "cache": cache[0] if cache else None}
