"""Shards in object storage: a real S3-compatible server (moto's standalone server, in its own
process on 127.0.0.1, with credentials checked: conftest.moto), `depthcli upload`, `verify` and
`evaluate` from s3:// (through the node's shard cache; tests/test_cache.py tests the cache
itself), a 2-rank torchrun training run from s3://, and the bad-input cases; with the cache off,
DALI reading s3:// itself and the torch loader streaming through webdataset and boto3, as both
do (the torch loader) or can (DALI, --cache-dir off) when a set does not fit the cache."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import BUCKET, free_port, one_sentence
from pipeline import store
from pipeline.augment import Augment
from train.cli import main as cli
from pipeline.loaders import build_loader
from pipeline.manifest import LoaderError
from pipeline.store import StoreError

ROOT = Path(__file__).resolve().parent.parent


def test_upload_puts_the_manifest_last_and_verify_reads_the_store(s3_env, s3_shards, exact_shards, monkeypatch):
    r = CliRunner().invoke(cli, ["verify", s3_shards, "--decode", "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert re.fullmatch(r"ok: 9 shards, 64 samples, [0-9.]+ MB, every image decoded, in the shard cache \S+",
                        r.stdout.strip().splitlines()[-1]), r.stdout
    assert one_sentence(CliRunner().invoke(cli, ["upload", str(exact_shards), s3_shards])).endswith(
        f"{s3_shards} already holds a shard set; pass --overwrite to replace it.")
    order = []
    client = store.client()
    real = client.upload_file
    monkeypatch.setattr(client, "upload_file", lambda src, bucket, key, **kw: (order.append(key), real(src, bucket, key, **kw)))
    r = CliRunner().invoke(cli, ["upload", str(exact_shards), s3_shards, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert len(order) == 19 and order[-1] == "exact/manifest.json"
    assert CliRunner().invoke(cli, ["verify", s3_shards]).exit_code == 0


def test_verify_names_a_damaged_shard_in_the_store(s3_env, exact_shards, tmp_path):
    url = f"s3://{BUCKET}/damaged"
    assert CliRunner().invoke(cli, ["upload", str(exact_shards), url]).exit_code == 0
    bucket, key = store.split(url)
    store.client().put_object(Bucket=bucket, Key=key + "/train-000001.tar", Body=b"\0" * 10240)
    out = one_sentence(CliRunner().invoke(cli, ["verify", url]))
    assert "bad shard train-000001.tar: train-000001.tar has 10240 bytes, the manifest says" in out


@pytest.mark.parametrize("case, says", [
    ("no_bucket", "the bucket nosuchbucket does not exist at http://127.0.0.1:"),
    ("no_key", f"s3://{BUCKET}/nothing/manifest.json does not exist"),
    ("bad_secret", "refused access to s3://depthseg/exact/manifest.json (SignatureDoesNotMatch); check"),
    ("bad_key_id", "(InvalidAccessKeyId); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("dead_endpoint", "does not answer; check AWS_ENDPOINT_URL"),
    ("silent_endpoint", "failed for s3://depthseg/exact/manifest.json (Read timeout on endpoint URL"),
])
def test_bad_store_input_is_one_sentence_in_bounded_time(s3_env, s3_shards, monkeypatch, case, says):
    url = {"no_bucket": "s3://nosuchbucket/x", "no_key": f"s3://{BUCKET}/nothing"}.get(case, s3_shards)
    if case == "bad_secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    if case == "bad_key_id":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")
    if case == "dead_endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    silent = socket.socket()  # accepts connections (the kernel's backlog) but never answers
    if case == "silent_endpoint":
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setitem(store.TIMEOUTS, "read_timeout", 1)  # 3 attempts × 1 s, not × 10 s
    t0 = time.time()
    with silent:
        out = one_sentence(CliRunner().invoke(cli, ["verify", url]))
        assert says in out, out
        out = one_sentence(CliRunner().invoke(cli, ["bench", "--shards", url, "--loader", "dali", "--res", "32"]))
        assert says in out, out
    assert time.time() - t0 < 30


def test_evaluate_from_the_store_with_both_loaders(s3_env, s3_shards, exact_shards, trained_from_s3):
    for loader in ("dali", "torch"):
        args = ["evaluate", "--checkpoint", str(trained_from_s3 / "last.pt"), "--loader", loader, "--batch-size", "8", "--json"]
        r = CliRunner().invoke(cli, args + ["--shards", s3_shards])
        assert r.exit_code == 0, r.output
        local = CliRunner().invoke(cli, args + ["--shards", str(exact_shards)])
        assert json.loads(r.stdout) == json.loads(local.stdout)  # the same samples, the same figures
        assert json.loads(r.stdout)["samples"] == 25


@pytest.fixture(scope="module")
def trained_from_s3(s3_server, s3_shards, tmp_path_factory) -> Path:
    """2 ranks under torchrun read s3:// with the torch loader (DALI's S3 reads are slow against
    moto's server: BENCHMARKS.md; DALI from s3:// is test_evaluate_from_the_store's)."""
    out = tmp_path_factory.mktemp("s3run") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "train" / "main.py"), "--shards", s3_shards, "--out", str(out), "--device", "cpu",
           "--res", "32", "--batch-size", "4", "--epochs", "1", "--workers", "1", "--log-every", "2", "--loader", "torch"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **s3_server, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rank(s) on cpu" in r.stdout and "4 steps per epoch" in r.stdout
    return out


def test_two_ranks_train_from_the_store(trained_from_s3):
    records = [json.loads(line) for line in (trained_from_s3 / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert [r["samples"] for r in records if r["kind"] == "val"] == [25]


def fingerprint(batch: dict) -> str:
    return hashlib.sha1(b"".join(batch[k].cpu().numpy().tobytes() for k in ("bg", "fg_bg", "mask", "depth"))).hexdigest()


def test_dali_trains_from_the_store_as_from_disk_and_resumes_exactly(s3_env, s3_shards, exact_shards):
    """DALI from the store (through the cache, which holds the whole set: DALI reads the cached
    files) in training, shuffled, checkpointing on: the batches of the folder, and a loader
    restored from a state taken mid-epoch goes on with exactly the rest."""
    kw = {"split": "train", "res": 32, "batch_size": 8, "loader": "dali", "augment": Augment.off(), "seed": 5,
          "workers": 1, "rank": 1, "world_size": 2}
    local = build_loader(exact_shards, **kw)
    whole = [[fingerprint(b) for b in local] for _ in range(3)]
    assert len(whole[0]) == 2 and whole[0] != whole[1]  # 19 samples of rank 1 / 8: 2 batches an epoch
    remote = build_loader(s3_shards, **kw)
    assert [fingerprint(b) for b in remote] == whole[0]
    for b in remote:  # killed after the second epoch's first batch
        first = fingerprint(b)
        state = remote.state()
        break
    resumed = build_loader(s3_shards, state=state, **kw)
    assert [first] + [fingerprint(b) for b in resumed] == whole[1]
    assert [fingerprint(b) for b in resumed] == whole[2]


COPIES = itertools.count()


@pytest.fixture
def doomed_shards(s3_env, exact_shards) -> str:
    """A copy of the shard set of its own in the store, for a test that deletes a tar."""
    url = f"s3://{BUCKET}/doomed-{next(COPIES)}"
    r = CliRunner().invoke(cli, ["upload", str(exact_shards), url, "--overwrite"])
    assert r.exit_code == 0, r.output
    return url


def delete(url: str) -> None:
    store.client().delete_object(Bucket=BUCKET, Key=store.split(url)[1])


@pytest.mark.parametrize("split", ["train", "val"])
def test_torch_loader_names_a_tar_gone_from_the_store(doomed_shards, split):
    """Deleted after the manifest was read, streamed (as a set too large for the cache is): the
    worker's StoreError arrives as its one sentence."""
    loader = build_loader(doomed_shards, split=split, loader="torch", res=32, batch_size=4, workers=1, cache_dir="off")
    delete(f"{doomed_shards}/{split}-000001.tar")
    with pytest.raises(StoreError) as e:
        list(loader)
    assert str(e.value) == (f"{doomed_shards}/{split}-000001.tar does not exist (no such key or bucket at "
                            f"{os.environ['AWS_ENDPOINT_URL']}).")


def test_torch_loader_names_a_stream_broken_midway(s3_env, s3_shards, monkeypatch):
    """A connection lost while a sample's ranged GET streams (botocore's error, raised in the worker)."""
    from botocore.exceptions import ResponseStreamingError
    from botocore.response import StreamingBody

    whole = StreamingBody.read

    def broken(self, amt=None):  # an index (about 1 KB) is read whole; a sample (10 KB or more) breaks
        if int(self._content_length or 0) < 4096:
            return whole(self, amt)
        raise ResponseStreamingError(error="Connection broken: reset by peer")

    loader = build_loader(s3_shards, split="val", loader="torch", res=32, batch_size=4, workers=1, cache_dir="off")
    monkeypatch.setattr(StreamingBody, "read", broken)  # the DataLoader's worker is forked: it has it too
    with pytest.raises(StoreError) as e:
        list(loader)
    assert re.fullmatch(rf"the object store at \S+ failed for {s3_shards}/val-00000\d\.tar \(An error occurred "
                        r"while reading from response stream: Connection broken: reset by peer\)\.", str(e.value))


def test_torch_loader_names_a_tar_gone_from_a_folder(exact_shards, tmp_path):
    shards = tmp_path / "s"
    shutil.copytree(exact_shards, shards)
    loader = build_loader(shards, split="val", loader="torch", res=32, batch_size=4, workers=1)
    (shards / "val-000002.tar").unlink()
    with pytest.raises(LoaderError) as e:
        list(loader)
    assert str(e.value) == (f"could not read {shards}/val-000002.tar (No such file or directory); "
                            f"run `depthcli verify {shards}`.")


def test_dali_names_a_tar_gone_from_the_store_midway(doomed_shards):
    """With the cache off each sample is a ranged GET: the next read of the deleted tar names it,
    within a second, as the torch loader's workers do."""
    loader = build_loader(doomed_shards, split="train", loader="dali", res=32, batch_size=8, workers=1,
                          augment=Augment.off(), cache_dir="off")
    assert len(list(loader)) == 4
    delete(f"{doomed_shards}/train-000003.tar")
    t0 = time.time()
    with pytest.raises(StoreError) as e:
        for _ in range(3):  # the pipeline is a batch or two ahead
            list(loader)
    assert str(e.value) == (f"{doomed_shards}/train-000003.tar does not exist (no such key or bucket at "
                            f"{os.environ['AWS_ENDPOINT_URL']}).")
    assert time.time() - t0 < 30


def test_threads_asking_for_a_client_at_once_make_one(monkeypatch):
    """The cache's fetch threads start together: one boto3 client is made, not one each (each
    costs a few hundred ms of Python, which the first batch waited for)."""
    import threading

    import boto3

    made = []

    def slow_client(self, *a, **kw):
        made.append(1)
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(boto3.session.Session, "client", slow_client)
    monkeypatch.setattr(store, "_clients", {})
    got = []
    threads = [threading.Thread(target=lambda: got.append(store.client("transfer"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len({id(c) for c in got}) == 1
