"""Time make-dataset, shard and verify on one dataset size. Same-run baselines: a plain copy of
the source zip (the page cache and disk alone) and the sharding script users write by hand
(zipfile + webdataset.ShardWriter in one process, then wds2idx on every tar, no checks).

    python scripts/bench_dataset.py --num-bg 25 --num-fg 20 --placements 20 --work /tmp/bench

Prints one line per step (seconds, samples/s, MB/s, peak RSS of the step's process tree) and the
projection to 400,000 samples; --json for scripts.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str]) -> dict:
    """Run a command; wall seconds and the peak RSS of its largest process (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f"{' '.join(cmd)} failed")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024}


def naive_shard(zip_path: Path, out: Path) -> None:
    """The hand-written way: read each quadruple with zipfile, write with ShardWriter, index."""
    import zipfile

    import webdataset as wds
    from wds2idx import IndexCreator

    out.mkdir()
    with zipfile.ZipFile(zip_path) as zf, wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for name in zf.namelist():
            if name.startswith("fg_bg/"):
                rest, key = name[len("fg_bg/"):], name.rsplit("/", 1)[1][:-4]
                sink.write({"__key__": key, "bg.jpg": zf.read(f"bg/{key[:5]}.jpg"), "fg_bg.jpg": zf.read(name),
                            "mask.jpg": zf.read("fg_bg_masks/" + rest), "depth.jpg": zf.read("fg_bg_depth/" + rest)})
    for tar in sorted(out.glob("*.tar")):
        with IndexCreator(str(tar), str(tar.with_suffix(".idx")), verbose=False) as ic:
            ic.create_index()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-bg", type=int, default=25)
    p.add_argument("--num-fg", type=int, default=20)
    p.add_argument("--placements", type=int, default=20)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--work", default="/tmp/depthseg-bench")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    n = a.num_bg * a.num_fg * 2 * a.placements
    cli = [str(Path(sys.executable).with_name("depthcli"))]
    zip_path, shards = work / "data.zip", work / "shards"
    rows = {}
    rows["make-dataset"] = timed(cli + ["make-dataset", "--out", str(zip_path), "--num-bg", str(a.num_bg), "--num-fg", str(a.num_fg),
                                        "--placements", str(a.placements), "--workers", str(a.workers)])
    rows["make-dataset"]["bytes"] = zip_path.stat().st_size
    t0 = time.perf_counter()
    shutil.copyfile(zip_path, work / "copy.zip")  # baseline: the disk and page cache alone
    rows["copy source (baseline)"] = {"seconds": time.perf_counter() - t0, "bytes": zip_path.stat().st_size, "peak_rss_mb": None}
    (work / "copy.zip").unlink()
    rows["shard"] = timed(cli + ["shard", "--src", str(zip_path), "--out", str(shards), "--workers", str(a.workers)])
    rows["shard"]["bytes"] = sum(f.stat().st_size for f in shards.iterdir())
    rows["verify"] = timed(cli + ["verify", str(shards), "--workers", str(a.workers)])
    rows["verify --decode"] = timed(cli + ["verify", str(shards), "--decode", "--workers", str(a.workers)])
    for r in ("verify", "verify --decode"):
        rows[r]["bytes"] = rows["shard"]["bytes"]
    t0 = time.perf_counter()  # last: a fork after this would inherit its memory
    naive_shard(zip_path, work / "naive")
    rows["hand-written shard (baseline)"] = {"seconds": time.perf_counter() - t0, "peak_rss_mb": None,
                                             "bytes": sum(f.stat().st_size for f in (work / "naive").iterdir())}
    shutil.rmtree(work / "naive")
    for name, r in rows.items():
        r["samples_per_s"] = n / r["seconds"]
        r["mb_per_s"] = r["bytes"] / r["seconds"] / 1e6
        r["projected_400k_s"] = r["seconds"] * 400_000 / n
    if a.json:
        print(json.dumps({"samples": n, "workers": a.workers, "steps": rows}, indent=1))
        return
    print(f"{n:,} samples, {a.workers} workers, {os.cpu_count()} cores")
    for name, r in rows.items():
        rss = f"{r['peak_rss_mb']:,.0f} MB" if r["peak_rss_mb"] else "-"
        print(f"{name:30s} {r['seconds']:7.1f} s  {r['samples_per_s']:8,.0f} samples/s  {r['mb_per_s']:7,.1f} MB/s  "
              f"peak {rss:>8s}  -> 400k in {r['projected_400k_s'] / 60:5.1f} min")
    print(f"shard is {rows['hand-written shard (baseline)']['seconds'] / rows['shard']['seconds']:.2f}x the hand-written script")


if __name__ == "__main__":
    main()
