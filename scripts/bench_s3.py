"""Loaders and training reading shards from a local S3-compatible server against the same shards
on local disk, in one run: the goals of the node-local shard cache (issue 17) as ratios.

    python scripts/bench_s3.py --shards /tmp/s3bench/shards --res 64 --batch-size 16 --batches 150 \
        --rounds 3 --train-steps 40 --train-rounds 2

moto's standalone server in its own process on 127.0.0.1 (scripts/s3_server.py), `depthcli
upload`, then per round, configurations interleaved, pipeline.bench.bench_loader (what `depthcli
bench` runs: samples/s over --batches after 2 warm-up batches, full augmentation), with the wall
time of the loader's build and those batches (for a cold cache, the downloads are in it: with
--batches one epoch, `wall s` is a cold first epoch against the disk's)
and the shard GETs that moto's request log counts:

    dali disk              the baseline
    dali s3 cold           a fresh cache that the set fits: groups of shards fetched ahead of the reader
    dali s3 warm           the same cache again (a second epoch, or run): no GETs
    dali s3 streamed       a budget of --stream-fraction of the train split (default a half): groups
                           cut to fit it (pipeline.stream); the cache's size sampled every 5 ms,
                           peak vs budget
    torch disk / s3 cold / s3 warm / s3 off (--cache-dir off: a ranged GET a sample)
    dali s3 off            optional (--uncached-batches N): DALI with the cache off

With --epoch-rounds N, first (and alone, with --epochs-only): one epoch of the train split as a
whole `depthcli bench` process, from disk and from s3:// with a fresh cache, interleaved, for
this checkout and a --baseline checkout beside it (the goal of issue 22: a cold first epoch at
0.9x the disk's speed or better).

Then, with --train-steps, train/main.py under torchrun (2 ranks sharing the node's cache) from
disk and from s3:// with a cold cache, interleaved over --train-rounds: samples/s after the
first logged interval and the wall time of the whole run. The CPU column counts this process's
threads, so it is DALI's whole cost but not the torch loader's (its workers are processes). moto is a test server written in Python, not a storage system; it shares
the CPU with the loaders here, so s3 rows also pay for the server's work.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_train import train_rate
from s3_server import MotoServer

from pipeline.bench import bench_loader
from pipeline.manifest import read_manifest

BUCKET, PREFIX = "bench", "shards"
URL = f"s3://{BUCKET}/{PREFIX}"


class Peak:
    """The largest total size of the files under a folder, sampled every few ms while it runs."""

    def __init__(self, root: Path):
        self.root, self.bytes, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for dirpath, _, names in os.walk(self.root):
                for n in names:
                    try:
                        total += os.stat(os.path.join(dirpath, n)).st_size
                    except OSError:  # removed while counted
                        pass
            self.bytes = max(self.bytes, total)
            time.sleep(0.005)

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def part_bytes(shards: str) -> int:
    """Bytes of the train split's tars and indexes: a single rank's part."""
    entries = read_manifest(shards)["splits"]["train"]["shards"]
    return sum(e["bytes"] + os.path.getsize(Path(shards) / e["index"]) for e in entries)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(server: MotoServer, name: str, loader: str, where: str, args, cache: dict) -> dict:
    """One row: bench_loader's samples/s, and for the whole row (build included) its wall time,
    the CPU seconds of this process (the loader's threads, its prefetch) and of the server."""
    mark, cpu0, server0 = server.mark(), time.process_time(), cpu_seconds(server.proc.pid)
    with Peak(Path(cache["cache_dir"])) if cache.get("cache_dir") not in (None, "off") else _nothing() as peak:
        t0 = time.perf_counter()
        r = bench_loader(where, loader, res=args.res, batch_size=args.batch_size, batches=args.batches, warmup=2,
                         workers=args.workers, **cache)
        wall = time.perf_counter() - t0
    gets = server.gets(mark, BUCKET, PREFIX + "/")
    return {"config": name, "samples_per_s": r["samples_per_s"], "wall_s": round(wall, 2), "shard_gets": sum(gets.values()),
            "cpu_s": round(time.process_time() - cpu0, 2), "server_cpu_s": round(cpu_seconds(server.proc.pid) - server0, 2),
            "peak_cache_bytes": peak.bytes if peak else None, "cache_limit": cache.get("cache_limit")}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *_):
        pass


def configs(args, work: Path, budget: int):
    """(name, loader, shards, cache options) per row, fresh cache folders for the cold rows."""
    cold = lambda tag: {"cache_dir": str(_fresh(work / tag))}  # noqa: E731
    rows = [("dali disk", "dali", args.shards, {}),
            ("dali s3 cold", "dali", URL, cold("dali")),
            ("dali s3 warm", "dali", URL, {"cache_dir": str(work / "dali")}),
            ("dali s3 streamed", "dali", URL, {**cold("streamed"), "cache_limit": budget}),
            ("torch disk", "torch", args.shards, {}),
            ("torch s3 cold", "torch", URL, cold("torch")),
            ("torch s3 warm", "torch", URL, {"cache_dir": str(work / "torch")}),
            ("torch s3 off", "torch", URL, {"cache_dir": "off"})]
    if args.uncached_batches:
        rows.append(("dali s3 off", "dali", URL, {"cache_dir": "off"}))
    return rows


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def loaders(server: MotoServer, args, work: Path) -> list[dict]:
    budget = int(part_bytes(args.shards) * args.stream_fraction)
    for loader in ("dali", "torch"):  # not counted: a process's first build pays for imports and constants
        one(server, "warm-up", loader, args.shards, args, {})
    results = []
    for rnd in range(args.rounds):
        for name, loader, where, cache in configs(args, work, budget):
            batches = args.uncached_batches if name == "dali s3 off" else args.batches
            r = one(server, name, loader, where, argparse.Namespace(**{**vars(args), "batches": batches}), cache)
            results.append({**r, "round": rnd})
            print(json.dumps(results[-1]), flush=True)
    return results


def epoch_process(checkout: Path, shards: str, args, cache_dir: str) -> float:
    """Wall seconds of a whole `depthcli bench` process (imports, build, downloads) over one
    epoch of the train split, run from `checkout` (this one, or a --baseline beside it)."""
    batches = args.epoch_batches or sum(e["samples"] for e in read_manifest(args.shards)["splits"]["train"]["shards"]) // args.batch_size
    cmd = [sys.executable, "-c", "import sys; from train.cli import main; sys.argv[0] = 'depthcli'; main()", "bench",
           "--shards", shards, "--loader", args.epoch_loader, "--res", str(args.res), "--batch-size", str(args.batch_size),
           "--batches", str(batches - 1), "--warmup", "1", "--cache-dir", cache_dir]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, check=True, capture_output=True)
    return time.perf_counter() - t0


def epochs(args, work: Path) -> list[dict]:
    """A first epoch as a whole process, from disk and from s3:// with a cold cache, interleaved
    over --epoch-rounds, for this checkout and --baseline's."""
    rows, here = [], Path(__file__).resolve().parent.parent
    sides = [("this", here)] + ([("baseline", args.baseline)] if args.baseline else [])
    for rnd in range(args.epoch_rounds):
        for side, checkout in sides:
            disk = epoch_process(checkout, args.shards, args, "off")
            cold = epoch_process(checkout, URL, args, str(_fresh(work / "epoch")))
            rows.append({"config": f"epoch {side}", "disk_s": round(disk, 2), "s3_cold_s": round(cold, 2),
                         "ratio": round(disk / cold, 3), "round": rnd})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def training(server: MotoServer, args, work: Path) -> list[dict]:
    """train/main.py from disk and from s3:// with a cold cache, interleaved over --train-rounds."""
    rows = []
    for rnd in range(args.train_rounds):
        for name, shards, extra in (("train disk", args.shards, []),
                                    ("train s3 cold", URL, ["--cache-dir", str(_fresh(work / "train"))])):
            mark, t0 = server.mark(), time.perf_counter()
            r = train_rate("dali", work / "run", shards, args.res, args.batch_size, args.train_steps, log_every=5,
                           ranks=2, train_args=extra)
            rows.append({"config": name, "samples_per_s": r["samples_per_s"], "wall_s": round(time.perf_counter() - t0, 1),
                         "shard_gets": sum(server.gets(mark, BUCKET, PREFIX + "/").values()), "round": rnd})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def report(results: list[dict], train: list[dict], budget: int) -> None:
    med = {}
    for name in dict.fromkeys(r["config"] for r in results):
        rs = [r for r in results if r["config"] == name]
        med[name] = {k: statistics.median(r[k] for r in rs) for k in ("samples_per_s", "wall_s", "shard_gets", "cpu_s",
                                                                        "server_cpu_s")}
        med[name]["peak"] = max((r["peak_cache_bytes"] or 0) for r in rs)
    print("\nconfig              samples/s  vs disk  wall s  vs disk  CPU s (server)  vs disk  shard GETs  peak cache")
    for name, m in med.items():
        disk = med[f"{name.split()[0]} disk"]
        cpu, disk_cpu = m["cpu_s"] + m["server_cpu_s"], disk["cpu_s"] + disk["server_cpu_s"]
        print(f"{name:18s} {m['samples_per_s']:10,.0f} {m['samples_per_s'] / disk['samples_per_s']:8.2f} {m['wall_s']:7.2f} "
              f"{disk['wall_s'] / m['wall_s']:8.2f} {cpu:8.2f} ({m['server_cpu_s']:4.2f}) {disk_cpu / cpu:8.2f} "
              f"{m['shard_gets']:11.0f}  " + (f"{m['peak'] / 1e6:.2f} MB of {budget / 1e6:.2f}" if name.endswith("streamed") else ""))
    for name in dict.fromkeys(t["config"] for t in train):
        m, d = ({k: statistics.median(t[k] for t in train if t["config"] == c) for k in ("samples_per_s", "wall_s", "shard_gets")}
                for c in (name, "train disk"))
        print(f"{name:18s} {m['samples_per_s']:10,.1f} {m['samples_per_s'] / d['samples_per_s']:8.2f} {m['wall_s']:7.1f} "
              f"{d['wall_s'] / m['wall_s']:8.2f} {'':17s} {m['shard_gets']:11.0f}")
    print("(medians of the rounds; 'wall s' and 'CPU s' are the whole row's, the loader's build and the downloads "
          "of a cold cache included, CPU of this process and the server's; their ratios are disk / s3)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="shards", help="a local shard folder (default: shards)")
    p.add_argument("--res", type=int, default=64, help="resolution (default: 64)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default: 16)")
    p.add_argument("--batches", type=int, default=150, help="timed batches per row (default: 150)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every row, interleaved (default: 3)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="threads / processes (default: all cores)")
    p.add_argument("--train-steps", type=int, default=0, help="also train this many steps from disk and s3 (default: 0)")
    p.add_argument("--train-rounds", type=int, default=2, help="rounds of the two training runs (default: 2)")
    p.add_argument("--epoch-rounds", type=int, default=0,
                   help="also time a first epoch as a whole process, disk against a cold cache, this many rounds")
    p.add_argument("--epoch-loader", default="dali", help="the loader of those epochs (default: dali)")
    p.add_argument("--epoch-batches", type=int, default=0,
                   help="batches of those 'epochs' (default: 0 = a whole epoch; a few: the time to start on a large set)")
    p.add_argument("--epochs-only", action="store_true", help="only those epochs")
    p.add_argument("--baseline", type=Path, help="another checkout whose epochs run beside this one's, round by round")
    p.add_argument("--stream-fraction", type=float, default=0.5,
                   help="the streamed row's cache budget, as a share of the train split (default: 0.5)")
    p.add_argument("--uncached-batches", type=int, default=0,
                   help="also time DALI reading s3:// itself, over this many batches (slow; default: 0, not run)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = MotoServer(work / "requests.log")
    os.environ.update(server.env())
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        subprocess.run([sys.executable, "-m", "train.cli", "upload", args.shards, URL], check=True)
        if args.epoch_rounds:
            rows = epochs(args, work)
            for side in dict.fromkeys(r["config"] for r in rows):
                print(f"{side}: a cold first epoch, whole process, at {statistics.median(r['ratio'] for r in rows if r['config'] == side):.2f}x "
                      f"the disk's speed (median of {args.epoch_rounds} rounds)")
            if args.epochs_only:
                return
        results = loaders(server, args, work)
        train = training(server, args, work) if args.train_steps else []
        report(results, train, int(part_bytes(args.shards) * args.stream_fraction))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
