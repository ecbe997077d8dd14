"""Shard sets in object storage (S3 or any S3-compatible store): every access in one module.

    depthcli upload shards/ s3://bucket/prefix            # tars and indexes first, manifest last
    depthcli verify s3://bucket/prefix
    torchrun ... train/main.py --shards s3://bucket/prefix

The endpoint, region and credentials come from the standard AWS settings, as for every AWS tool:
AWS_ENDPOINT_URL (for a store other than AWS), AWS_REGION or AWS_DEFAULT_REGION,
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws. boto3 does every access (the manifest,
sizes, the cache's downloads, streams for `verify`, the loaders' ranged reads with the cache
off, uploads), with bounded timeouts and retries so a store that
does not answer is one sentence and not a hang.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import DepthsegError

SCHEME = "s3://"
# Connect and read timeouts (s) and total attempts: a dead endpoint fails in seconds, a silent
# one within 3 × 10 s.
TIMEOUTS = {"connect_timeout": 3, "read_timeout": 10, "retries": {"total_max_attempts": 3, "mode": "standard"}}


class StoreError(DepthsegError):
    """The object store cannot be used as asked; the message is one sentence for the user."""


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith(SCHEME)


def join(base: str | os.PathLike, name: str) -> str:
    """A file of a shard set, local or remote."""
    return f"{str(base).rstrip('/')}/{name}" if is_remote(base) else str(Path(base) / name)


def split(url: str) -> tuple[str, str]:
    """s3://bucket/key → (bucket, key)."""
    bucket, _, key = url[len(SCHEME):].partition("/")
    if not 3 <= len(bucket) <= 63:
        raise StoreError(f"{url} names no bucket (3 to 63 characters); write s3://BUCKET/PREFIX.")
    return bucket, key


_clients: dict = {}
_making = threading.Lock()  # a cache's fetch threads ask at once: one client is made, not one each
# Whole-shard downloads (pipeline.cache): parts of this size, several at once, for large shards.
PART_BYTES = 32 << 20
DOWNLOAD_THREADS = 8


def client(kind: str = "plain"):
    """One boto3 client of each kind per process (clients must not cross a fork: DataLoader
    workers, pools). "transfer": for downloads whose sha256 the caller checks itself, so a
    download starts with its first ranged GET instead of a HEAD (botocore's own checksums off)."""
    key = (os.getpid(), kind)
    if key in _clients:
        return _clients[key]
    with _making:
        return _clients[key] if key in _clients else _make(key, kind)


def _make(key: tuple, kind: str):
    import boto3
    from botocore.config import Config

    if {k[0] for k in _clients} - {key[0]}:
        _clients.clear()
    extra = {"response_checksum_validation": "when_required", "max_pool_connections": 2 * DOWNLOAD_THREADS}
    _clients[key] = boto3.session.Session().client("s3", config=Config(**TIMEOUTS, **(extra if kind == "transfer" else {})))
    return _clients[key]


def _new_lock() -> None:
    """A forked child (a DataLoader worker) gets a lock of its own: the parent's may have been
    held by a thread the fork did not copy."""
    global _making
    _making = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


@contextmanager
def errors(url: str):
    """boto3's exceptions as one sentence each."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
    from s3transfer.exceptions import RetriesExceededError as S3TransferError

    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        bucket = url[len(SCHEME):].split("/", 1)[0]
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and url.rstrip("/") == SCHEME + bucket):
            raise StoreError(f"the bucket {bucket} does not exist at {endpoint()}.") from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise StoreError(f"{url} does not exist (no such key or bucket at {endpoint()}).") from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            raise StoreError(f"{endpoint()} refused access to {url} ({code}); check AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY.") from None
        raise StoreError(f"{endpoint()} answered {code or 'an error'} for {url}.") from None
    except NoCredentialsError:
        raise StoreError(f"no credentials for {url}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         f"(or ~/.aws/credentials).") from None
    except EndpointConnectionError:
        raise StoreError(f"the object store at {endpoint()} does not answer; check AWS_ENDPOINT_URL.") from None
    except BotoCoreError as e:  # timeouts, bad endpoint URLs, ...
        raise StoreError(f"the object store at {endpoint()} failed for {url} ({e}).") from None
    except S3TransferError as e:  # s3transfer's retries of a broken stream, spent
        cause = getattr(e, "last_exception", None) or e
        raise StoreError(f"the object store at {endpoint()} failed for {url} ({cause}).") from None


def download(url: str, fileobj, size: int = 0) -> None:
    """The whole object into fileobj.write(), in order: one streamed GET, or, for an object of
    `size` PART_BYTES or more, ranged GETs of PART_BYTES in parallel (boto3's transfer manager;
    fileobj is not seekable, so it puts the parts back in order and the caller can hash what it
    writes). A transfer manager per object costs more CPU than a small object's GET itself."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split(url)
    with errors(url):
        if size < PART_BYTES:
            body = client("transfer").get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(1 << 20):
                fileobj.write(chunk)
            return
        config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                max_concurrency=DOWNLOAD_THREADS, num_download_attempts=TIMEOUTS["retries"]["total_max_attempts"])
        client("transfer").download_fileobj(bucket, key, fileobj, Config=config)


def read_bytes(url: str) -> bytes:
    bucket, key = split(url)
    with errors(url):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def read_range(url: str, start: int, size: int) -> bytes:
    """Bytes [start, start + size) of the object: one ranged GET."""
    bucket, key = split(url)
    with errors(url):
        return client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + size - 1}")["Body"].read()


def open_stream(url: str, *_, **__):
    """A file-like object that streams the object (read() only), for tarfile's stream mode."""
    bucket, key = split(url)
    with errors(url):
        return _Stream(client().get_object(Bucket=bucket, Key=key)["Body"], url)


class _Stream:
    """An object's body whose read() fails as opening it does: one StoreError naming the object
    (a connection reset or a read timeout midway is a BotoCoreError, or worse, urllib3's)."""

    def __init__(self, body, url: str):
        self.body, self.url = body, url

    def read(self, n: int = -1) -> bytes:
        with errors(self.url):
            return self.body.read(None if n is None or n < 0 else n)

    def close(self) -> None:
        self.body.close()


def sizes(prefix: str) -> dict[str, int]:
    """Names (relative to prefix) and sizes of the objects under prefix/, in one listing."""
    bucket, key = split(prefix)
    key = key.rstrip("/") + "/" if key.strip("/") else ""
    found = {}
    with errors(prefix):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            found.update({o["Key"][len(key):]: o["Size"] for o in page.get("Contents", [])})
    return found


def _key(prefix: str, name: str) -> tuple[str, str]:
    bucket, key = split(prefix)
    return bucket, (key.rstrip("/") + "/" + name) if key.strip("/") else name


def make_room(prefix: str, manifest: str, overwrite: bool) -> None:
    """Before an upload: the bucket exists, and a shard set already there is refused, or with
    `overwrite` made unfinished (its manifest deleted) so that no reader uses it while it changes."""
    bucket, key = _key(prefix, manifest)
    with errors(SCHEME + bucket):
        client().head_bucket(Bucket=bucket)
    with errors(prefix):
        if manifest in sizes(prefix):
            if not overwrite:
                raise StoreError(f"{prefix} already holds a shard set; pass --overwrite to replace it.")
            client().delete_object(Bucket=bucket, Key=key)


def upload(folder: Path, prefix: str, names: list[str], manifest: str, progress) -> int:
    """Copy a finished shard set after make_room: the files in `names`, then the manifest last,
    so a reader never takes a half-copied set for a finished one. Returns the bytes sent."""
    sent = 0
    with errors(prefix):
        for name in [*names, manifest]:
            client().upload_file(str(folder / name), *_key(prefix, name), Callback=progress)
            sent += (folder / name).stat().st_size
    return sent
