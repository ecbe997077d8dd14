"""The node-local shard cache (pipeline.cache, fetch, stream) against the local S3 server of
conftest, whose request log counts the GETs: a second run reads nothing from the store, two
processes fetch each shard once, a changed cached shard is fetched again, kill -9 mid-download
leaves no shard under its final name, a full disk and a budget too small are one sentence, the
store going away mid-epoch is one sentence (or nothing at all, when the set is cached), and when
the set does not fit, DALI streams it within the budget, every sample once an epoch, exactly
again after a resume."""

from __future__ import annotations

import gc
import hashlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import BUCKET, MotoServer, one_sentence, server_env, upload
from pipeline import store
from pipeline.augment import Augment
from pipeline.cli import main as cli
from pipeline.loaders import build_loader

ROOT = Path(__file__).resolve().parent.parent
KW = {"split": "train", "res": 32, "batch_size": 4, "loader": "dali", "augment": Augment.off(), "seed": 5, "workers": 1}
COPIES = itertools.count()


def fingerprint(batch: dict) -> str:
    return hashlib.sha1(b"".join(batch[k].cpu().numpy().tobytes() for k in ("bg", "fg_bg", "mask", "depth"))).hexdigest()


def epochs(loader, n: int = 1) -> list[list[str]]:
    return [[fingerprint(b) for b in loader] for _ in range(n)]


@pytest.fixture
def fresh(s3_env, exact_shards) -> str:
    """A copy of exact_shards in the store under a prefix of its own."""
    url = f"s3://{BUCKET}/cache-{next(COPIES)}"
    upload(s3_env, exact_shards, url)
    return url


def cached_files(cache: Path, pattern: str) -> list[Path]:
    return sorted(cache.glob(f"*/{pattern}"))


def test_a_second_run_reads_nothing_from_the_store(moto, fresh, exact_shards, tmp_path):
    """DALI (rank 1 of 2) from s3:// with the set fitting the cache: each train shard is fetched
    once, the batches are the folder's, and a second epoch and a second loader GET nothing."""
    kw = {**KW, "rank": 1, "world_size": 2}
    local = epochs(build_loader(exact_shards, **kw), 2)
    prefix = fresh.split("/", 3)[3] + "/"
    mark = moto.mark()
    loader = build_loader(fresh, cache_dir=tmp_path, **kw)
    assert epochs(loader, 2) == local
    assert moto.gets(mark, BUCKET, prefix) == {f"{prefix}train-00000{i}.tar": 1 for i in range(5)}
    mark = moto.mark()
    assert epochs(build_loader(fresh, cache_dir=tmp_path, **kw), 2) == local
    assert moto.gets(mark, BUCKET, prefix) == {} and moto.gets(mark, BUCKET, prefix, ".idx") == {}
    torch_kw = {**kw, "loader": "torch"}  # the torch loader reads its part of the same cached files
    assert epochs(build_loader(fresh, cache_dir=tmp_path, **torch_kw)) == epochs(build_loader(exact_shards, **torch_kw))
    assert moto.gets(mark, BUCKET, prefix) == {}


CLI = """
import os, sys, time
from pathlib import Path
from pipeline import fetch, store
from pipeline.cli import main

real_download, real_write = store.download, fetch._HashingWriter.write
how, arg = os.environ.get("TEST_PATCH", ""), Path(os.environ.get("TEST_PATH", "."))


def slow(url, fileobj, size=0):  # every download takes a while, so that two processes' fetches overlap
    time.sleep(0.3)
    real_download(url, fileobj, size)


def stall(self, data):  # the first bytes of a shard are written, then the process waits to be killed
    n = real_write(self, data)
    self.f.flush()
    arg.touch()
    time.sleep(600)
    return n


def fill(self, data):  # another program fills the disk while the first shard is written
    if not arg.exists():
        arg.touch()
        with (Path(self.f.name).parent.parent / "filler").open("wb") as f:
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass
    return real_write(self, data)


# From the environment: verify's workers (a fork server's) import this script too.
if how == "slow":
    store.download = slow
if how == "stall":
    fetch._HashingWriter.write = stall
if how == "fill":
    fetch._HashingWriter.write = fill

if __name__ == "__main__":
    barrier = arg if how == "slow" else None
    if barrier:  # wait for the other process, so that both start fetching at once
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < 2:
            time.sleep(0.01)
    sys.argv[0] = "depthcli"
    main()
"""


def cli_process(tmp_path: Path, how: str, arg: Path, *args: str, unshare: list[str] = ()) -> subprocess.Popen:
    """`depthcli ARGS` in a process of its own, the script's patch `how` (with its path `arg`) applied."""
    script = tmp_path / "cli.py"
    script.write_text(CLI)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TEST_PATCH": how, "TEST_PATH": str(arg)}
    return subprocess.Popen([*unshare, sys.executable, str(script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_processes_on_a_node_fetch_each_shard_once(moto, fresh, tmp_path):
    """Two `verify` processes (2 workers each) started at once on one cache: 4 fetchers, slowed
    down so that they overlap, and every shard GET once."""
    (tmp_path / "barrier").mkdir()
    prefix, mark = fresh.split("/", 3)[3] + "/", moto.mark()
    procs = [cli_process(tmp_path, "slow", tmp_path / "barrier", "verify", fresh, "--workers", "2", "--cache-dir",
                         str(tmp_path / "cache")) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert moto.gets(mark, BUCKET, prefix) == {f"{prefix}{s}-00000{i}.tar": 1 for s, n in (("train", 5), ("val", 4))
                                       for i in range(n)}


def _truncate(tar: Path, _) -> None:
    with tar.open("r+b") as f:
        f.truncate(tar.stat().st_size - 512)


def _edit(tar: Path, _) -> None:
    """Another image's bytes in place, same size; the file's mtime moves as any later write's does."""
    st = tar.stat()
    with tar.open("r+b") as f:
        f.seek(2048)
        f.write(b"\xff" * 64)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("change", ["truncated", "edited", "another set"])
def test_a_cached_shard_that_no_longer_matches_is_fetched_again(moto, s3_env, fresh, exact_shards, small_shards,
                                                                 tmp_path, change):
    kw = {**KW, "split": "val", "batch_size": 8}
    epochs(build_loader(fresh, cache_dir=tmp_path, **kw))
    prefix, expected = fresh.split("/", 3)[3] + "/", exact_shards
    if change == "another set":  # a new set uploaded under the same prefix: every shard differs
        upload(s3_env, small_shards, fresh, "--overwrite")
        expected, refetched = small_shards, {f"{prefix}val-00000{i}.tar": 1 for i in range(2)}
    else:
        (tar,) = cached_files(tmp_path, "val-000001.tar")
        (_truncate if change == "truncated" else _edit)(tar, None)
        refetched = {f"{prefix}val-000001.tar": 1}
    mark = moto.mark()
    assert epochs(build_loader(fresh, cache_dir=tmp_path, **kw)) == epochs(build_loader(expected, **kw))
    assert moto.gets(mark, BUCKET, prefix) == refetched


def test_kill_during_a_download_leaves_no_partial_shard(fresh, exact_shards, tmp_path):
    cache, started = tmp_path / "cache", tmp_path / "started"
    proc = cli_process(tmp_path, "stall", started, "verify", fresh, "--workers", "2", "--cache-dir", str(cache))
    try:
        t0 = time.time()
        while not started.exists():
            assert time.time() - t0 < 60 and proc.poll() is None, "the download did not start"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its workers
        proc.communicate()
    parts = cached_files(cache, ".*.part")
    assert any(".tar." in p.name and p.stat().st_size > 0 for p in parts)  # killed mid-download
    assert not [p for pattern in ("*.tar", "*.idx", "*.ok") for p in cached_files(cache, pattern)]
    assert epochs(build_loader(fresh, cache_dir=cache, **KW)) == epochs(build_loader(exact_shards, **KW))
    assert not cached_files(cache, ".*.part") and len(cached_files(cache, "train-*.tar.ok")) == 5


def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _namespaces_work(), reason="needs `unshare -rm` (user namespaces) to mount a small tmpfs")
@pytest.mark.parametrize("when", ["before", "while-writing"])
def test_a_full_disk_is_one_sentence(fresh, tmp_path, when):
    """A real full file system: a 100 KB tmpfs (in a user and mount namespace of its own) holds
    one shard, not the set, though --cache-limit allows it; or it fills while a shard is written."""
    cache = tmp_path / "cache"
    cache.mkdir()
    mount = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=100k none "$0" && exec "$@"', str(cache)]
    t0 = time.time()
    filled = tmp_path / "filled"
    proc = cli_process(tmp_path, "fill" if when == "while-writing" else "", filled, "verify", fresh, "--cache-dir",
                       str(cache), "--cache-limit", "1GB", "--workers", "1", unshare=mount)
    out, err = proc.communicate(timeout=120)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert filled.exists() == (when == "while-writing")  # the disk filled up while a shard was written
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: the disk of the shard cache {cache} is full (") and last.endswith(
        "free); free some space, lower --cache-limit or choose another --cache-dir."), last
    assert time.time() - t0 < 60


def test_a_budget_too_small_is_one_sentence(s3_env, s3_shards, tmp_path):
    out = one_sentence(CliRunner().invoke(cli, ["bench", "--shards", s3_shards, "--loader", "dali", "--res", "32",
                                                "--batch-size", "4", "--cache-dir", str(tmp_path), "--cache-limit", "100KB"]))
    assert out == ("Error: --cache-limit 0.1 MB is too small to stream these shards: with 1 process(es) on this node the "
                   "shards in flight need at least 0.4 MB; raise it, or lower --batch-size.")
    assert one_sentence(CliRunner().invoke(cli, ["bench", "--shards", s3_shards, "--cache-limit", "lots"])) == (
        "Error: --cache-limit lots is not a size such as 500MB, 20GB or 1.5TiB.")


def cache_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


class Sampler:
    """The cache's size on disk, sampled every few milliseconds while the block runs."""

    def __init__(self, root: Path):
        self.root, self.peak, self.stop = root, 0, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, cache_bytes(self.root))
            except OSError:  # a file went while it was measured
                pass
            time.sleep(0.002)

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join()


@pytest.fixture(scope="module")
def many(s3_server, tmp_path_factory) -> tuple[str, Path]:
    """exact's layout in 16 shards of 4 samples (58 train, 6 val), in the store and on disk: a set
    whose groups span several shards when streamed at batch 4."""
    import zipfile

    from conftest import write_layout
    from pipeline.shard import ShardSettings, shard

    root = tmp_path_factory.mktemp("many")
    with zipfile.ZipFile(root / "many.zip", "w") as zf:
        write_layout(zf, n_bg=4, per_bg=16)
    shard(ShardSettings(src=(str(root / "many.zip"),), out=str(root / "shards"), shard_size=4, val_fraction=0.1, workers=1),
          log=lambda *_: None)
    upload(s3_server, root / "shards", f"s3://{BUCKET}/many")
    return f"s3://{BUCKET}/many", root / "shards"


def keys(loader, n: int = 1) -> list[list[str]]:
    return [[k for b in loader for k, ok in zip(b["keys"], b["valid"]) if ok] for _ in range(n)]


@pytest.mark.parametrize("loader, rank, world, batch", [("dali", 0, 1, 4), ("dali", 1, 2, 4), ("torch", 1, 2, 2)])
def test_a_set_larger_than_the_budget_streams_within_it(moto, s3_env, many, tmp_path, loader, rank, world, batch):
    """Three epochs of training and two of validation from s3:// through a cache of 85 % of the
    set: the samples and order of the same loader on the folder, every epoch, while the cache,
    sampled every few ms, never holds more than its budget though more than that came from the
    store."""
    url, local = many
    kw = {**KW, "loader": loader, "rank": rank, "world_size": world, "batch_size": batch}
    limit = int(0.85 * cache_bytes(local))
    prefix, mark = url.split("/", 3)[3] + "/", moto.mark()
    with Sampler(tmp_path) as sampler:
        train = build_loader(url, cache_dir=tmp_path, cache_limit=limit, **kw)
        assert train.deal.order.params["group_bytes"] > 0  # cut to fit the budget
        got = keys(train, 3)
        val = build_loader(url, cache_dir=tmp_path, cache_limit=limit, **{**kw, "split": "val"})
        val_got = keys(val, 2)
    assert got == keys(build_loader(local, order=train.deal.order.params, **kw), 3) and len(set(map(tuple, got))) == 3
    assert val_got == keys(build_loader(local, **{**kw, "split": "val"}), 2)
    fetched = sum((local / key.rsplit("/", 1)[1]).stat().st_size * n for key, n in moto.gets(mark, BUCKET, prefix).items())
    assert sampler.peak <= limit < fetched, (sampler.peak, fetched)  # it evicted to stay within the budget


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_cold_cache_trains_while_the_rest_arrives(moto, s3_env, many, tmp_path, monkeypatch, loader):
    """Groups of 8 samples (2 shards) in a set of 15 train shards that fits the cache: the first
    batch comes when its group and the few ahead are cached, not the whole set; the epoch is the
    folder's, and by its end every shard was fetched once."""
    import pipeline.epoch

    monkeypatch.setattr(pipeline.epoch, "GROUP_SAMPLES", 8)
    url, local = many
    prefix, mark = url.split("/", 3)[3] + "/", moto.mark()
    kw = {**KW, "loader": loader}
    it = iter(train := build_loader(url, cache_dir=tmp_path, **kw))
    got = next(it)["keys"]
    at_first = moto.gets(mark, BUCKET, prefix)
    got += [k for b in it for k in b["keys"]]
    trains = sorted(p.name for p in local.glob("train-*.tar"))
    assert 0 < len(at_first) <= 6 < len(trains) == 15  # at most the first 3 groups: 2 needed, 1 ahead
    assert got == keys(build_loader(local, **kw))[0] and len(train) == 14
    assert moto.gets(mark, BUCKET, prefix) == {f"{prefix}{name}": 1 for name in trains}


def test_streaming_resumes_exactly_from_its_state(s3_env, many, tmp_path):
    """Stopped after the second epoch's first batch, a streaming loader rebuilt from its state and
    order gives the rest of that epoch and the next as the uninterrupted one did, though with
    another budget (which would cut the groups otherwise: the run keeps its order's params)."""
    url, _ = many
    kw = {**KW, "rank": 1, "world_size": 2, "augment": Augment()}
    # A cache folder per loader: each budget is for one loader (pins last as long as loaders do).
    whole = epochs(build_loader(url, cache_dir=tmp_path / "whole", cache_limit=400_000, **kw), 3)
    assert len({tuple(e) for e in whole}) == 3
    loader = build_loader(url, cache_dir=tmp_path / "cut", cache_limit=400_000, **kw)
    assert epochs(loader) == whole[:1]
    for b in loader:
        first, state, order = fingerprint(b), loader.state(), loader.deal.order.params
        break
    assert set(state) == {"dali", "first"}
    other = build_loader(url, cache_dir=tmp_path / "other", cache_limit=510_000, **kw)  # groups of 3 shards, not 2
    assert other.deal.order.params != order and epochs(other, 2)[1] != whole[1]
    resumed = build_loader(url, cache_dir=tmp_path / "resumed", cache_limit=510_000, state=state, order=order,
                           start=tuple(state["first"]), **kw)
    assert [first] + epochs(resumed)[0] == whole[1] and epochs(resumed) == whole[2:]


def test_a_dropped_streaming_loader_leaves_its_room(s3_env, many, tmp_path):
    """A trainer's next --res stage builds new loaders on the same budget: the last stage's, gone,
    hold no pins (the prefetch thread keeps only a weak reference to its window)."""
    kw = {**KW, "cache_dir": tmp_path, "cache_limit": 400_000}
    first = build_loader(many[0], **kw)
    epochs(first)  # now it pins the next epoch's first groups
    del first
    t0 = time.time()  # another epoch's order: other groups, which need the room
    assert len(epochs(build_loader(many[0], **{**kw, "res": 48, "seed": 6, "rank": 1, "world_size": 2}))[0]) == 7
    assert time.time() - t0 < 30  # not the wait for room that others' pins hold


def test_the_store_going_away_mid_epoch(many, tmp_path, monkeypatch):
    """A server of its own, stopped mid-epoch: a set in the cache trains on as if nothing
    happened; a streamed one stops with one sentence in bounded time."""
    server = MotoServer(tmp_path / "requests.log", auth=False)
    try:
        env = server_env(server, auth=False)
        upload(env, many[1], f"s3://{BUCKET}/going")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(store, "_clients", {})
        kw = {**KW, "cache_dir": tmp_path / "cache"}
        cached = build_loader(f"s3://{BUCKET}/going", **kw)
        epochs(cached)  # every shard in the cache
        streamed = build_loader(f"s3://{BUCKET}/going", cache_dir=tmp_path / "small", cache_limit=400_000,
                                **{k: v for k, v in kw.items() if k != "cache_dir"})
        next(iter(streamed))
    finally:
        server.stop()
    assert len(epochs(cached, 2)[1]) == len(cached)
    t0 = time.time()
    with pytest.raises(store.StoreError) as e:
        epochs(streamed, 3)
    assert str(e.value) == f"the object store at {server.url} does not answer; check AWS_ENDPOINT_URL."
    assert time.time() - t0 < 30


def test_cache_show_and_clear(s3_env, fresh, tmp_path):
    """After an epoch every train shard is cached and the loader pins those it reads next: clear
    keeps those, and removes them once the loader is gone."""
    loader = build_loader(fresh, cache_dir=tmp_path, **KW)
    epochs(loader)
    r = CliRunner().invoke(cli, ["cache", "show", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    line, total = r.output.strip().splitlines()
    assert line.startswith(f"{fresh} ({os.environ['AWS_ENDPOINT_URL']}): 5 shards, 0.3 MB, last used 20") and ", in use" in line
    assert total.startswith(f"{tmp_path}: 1 shard set(s), 0.3 MB of a ")
    r = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(tmp_path)])
    removed, kept = map(int, re.fullmatch(rf"removed (\d) shard\(s\) from {tmp_path}; kept (\d) in use; it now holds 0\.\d MB",
                                          r.output.strip()).groups())
    assert removed + kept == 5 and kept > 0, r.output
    del loader
    gc.collect()  # the loader's pins go with it
    r = CliRunner().invoke(cli, ["cache", "clear", fresh, "--cache-dir", str(tmp_path)])
    assert r.output.strip().startswith(f"removed {kept} shard(s) from {tmp_path} ({fresh}); it now holds 0.0 MB"), r.output
    assert not cached_files(tmp_path, "*.tar")


def test_verify_bench_and_evaluate_share_the_cache(moto, fresh, tmp_path):
    """verify fills the cache (each shard checked there), and bench after it GETs nothing."""
    prefix, mark = fresh.split("/", 3)[3] + "/", moto.mark()
    args = ["--cache-dir", str(tmp_path)]
    r = CliRunner().invoke(cli, ["verify", fresh, "--workers", "2", *args])
    assert r.exit_code == 0 and r.output.strip().endswith(f", in the shard cache {tmp_path}"), r.output
    assert sorted(moto.gets(mark, BUCKET, prefix).values()) == [1] * 9
    mark = moto.mark()
    assert CliRunner().invoke(cli, ["verify", fresh, *args]).exit_code == 0
    r = CliRunner().invoke(cli, ["bench", "--shards", fresh, "--loader", "all", "--res", "32", "--batch-size", "4",
                                 "--batches", "2", "--warmup", "1", "--workers", "1", *args])
    assert r.exit_code == 0, r.output
    assert moto.gets(mark, BUCKET, prefix) == {}


def test_the_trainer_passes_its_cache_settings(fresh, tmp_path):
    from train.main import main as train_main

    cache = tmp_path / "cache"
    assert train_main(["--shards", fresh, "--res", "32", "--batch-size", "8", "--workers", "1", "--epochs", "1",
                       "--max-steps", "1", "--no-augment", "--vis-samples", "0", "--device", "cpu", "--out",
                       str(tmp_path / "run"), "--cache-dir", str(cache), "--cache-limit", "50MB"]) == 0
    assert len(cached_files(cache, "*.tar.ok")) == 9  # train and val, in the folder given


# --- one entry point; stamps and pins in cache.py, fetch.py downloads and checks ------------------

def test_one_entry_decides_for_the_loaders_and_verify(tmp_path, monkeypatch):
    """build_loader's and verify's way to the cache is pipeline.cache.localize, and nothing else:
    with it saying "no cache", neither touches the store or the cache."""
    from pipeline import cache, loaders, verify
    from pipeline.epoch import Plan

    assert cache.localize(str(tmp_path), "", "") is None  # a folder takes no cache
    assert cache.localize("s3://b/p", "off", "") is None
    assert cache.localize("s3://b/p", str(tmp_path / "c"), "1MB").fits(10**6)
    asked = []
    monkeypatch.setattr(cache, "localize", lambda url, *a: asked.append(url))
    monkeypatch.setattr(store, "sizes", lambda *a: pytest.fail("the store was asked"))
    p = Plan(tars=[], indexes=[], counts=[], samples=0, rank=0, world_size=1, batch_size=1, train=True, shards="s3://b/p")
    deal, reader, window = loaders.reading(p, "dali", 1, "", "", 0, (0, 0), None)
    assert window is None and reader.tars == p.tars and deal.plan == p
    assert verify._through_cache("s3://b/q", [], "", "") == (None, None)
    assert asked == ["s3://b/p", "s3://b/q"]


def test_the_cache_owns_stamps_and_pins(tmp_path):
    """A checked download installed by the cache is a hit until its files change; fetch.py holds no
    stamp or pin of its own."""
    import inspect

    from pipeline import cache, fetch

    s = cache.Shard("a.tar", "a.idx", 5, 3, "sha", 1)
    cset = cache.CachedSet(cache.Cache(tmp_path / "c", "1MB"), "s3://b/p")
    parts = cset.part_files(s)
    parts[0].write_bytes(b"tar..")
    parts[1].write_bytes(b"idx")
    assert not cset.hit(s)
    cset.install(s, parts)
    assert cset.hit(s) and not parts[0].exists()
    cset.tar(s).write_bytes(b"TAR..")  # edited in place: the same size, another mtime
    os.utime(cset.tar(s), ns=(0, 0))
    assert not cset.hit(s)
    source = inspect.getsource(fetch)
    assert "STAMP" not in source and ".pins" not in source and "flock" not in source


def test_a_lock_is_released_though_a_forked_child_holds_its_fd(tmp_path):
    """A torch worker forked while the prefetch thread held the cache's lock shares its fd: the
    thread's unlock must free it for the node at once, not when the worker exits (a hang)."""
    import fcntl

    from pipeline.cache import lock, unlock

    fd = lock(tmp_path / ".lock", fcntl.LOCK_EX)
    child = os.fork()
    if child == 0:  # the worker: holds the inherited fd until killed
        time.sleep(60)
        os._exit(0)
    try:
        unlock(fd)
        other = lock(tmp_path / ".lock", fcntl.LOCK_EX, wait=False)
        assert other is not None, "the lock stayed with the forked child"
        unlock(other)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
