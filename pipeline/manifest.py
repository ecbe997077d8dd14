"""The `depthseg-wds/1` shard set: names and manifest.json (the DALI index format: pipeline.tar_index).

A shard folder holds `{split}-{NNNNNN}.tar` with `{split}-{NNNNNN}.idx` beside each and
`manifest.json`, written last: its presence means the set is complete. See shards/README.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline import store
from pipeline.errors import DepthsegError

FORMAT = "depthseg-wds/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
# Tar member extensions of one sample, in the order they are written; images are jpg or png.
ROLES = ("bg", "fg_bg", "mask", "depth")


class ManifestError(DepthsegError):
    """A shard folder that cannot be used; the message is one sentence for the user."""


class LoaderError(DepthsegError):
    """A shard whose contents cannot be decoded mid-epoch; the message is one sentence. It lives
    here, not in loaders.py, so that depthcli can name it without importing torch and DALI."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def write_json_atomic(path: Path, data) -> None:
    """A crash leaves either the old file or the new one, never half of one."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a shard folder or of an s3:// prefix (see pipeline.store)."""
    if store.is_remote(folder):
        path = store.join(folder, MANIFEST)
        try:
            text = store.read_bytes(path).decode("utf-8", "replace")
        except store.StoreError as e:
            raise ManifestError(str(e)) from None
    else:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            if not Path(folder).is_dir():
                raise ManifestError(f"{folder} does not exist; make shards with `depthcli shard --out {folder}`.")
            raise ManifestError(f"{folder} has no {MANIFEST}: it is not a finished shard set (run `depthcli shard`).")
        text = path.read_text()
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a {FORMAT} manifest.")
    return manifest


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The shard entries of a split ({"tar", "index", "samples", "bytes", "sha256"})."""
    shards = manifest["splits"].get(split, {}).get("shards", [])
    if not shards:
        have = ", ".join(f"{k} ({v['samples']} samples)" for k, v in manifest["splits"].items() if v["samples"])
        raise ManifestError(f"the shard set has no {split!r} samples; it has {have or 'none'}.")
    return shards
