"""Loaders reading shards from a local S3-compatible server against the same shards on local
disk, in one run: moto's standalone server in its own process on 127.0.0.1, `depthcli upload`,
then `depthcli bench` (pipeline.bench) on the folder and on s3:// for both loaders.

    python scripts/bench_s3.py --shards shards/ --res 64 --batch-size 16 --batches 20

moto is a test server written in Python, not a storage system: the ratio shows how a loader
behaves when every read is a request (how many it makes), not what a real store would give.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from pipeline.bench import bench_loader


def start_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("moto_server did not start")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="shards", help="a local shard folder (default: shards)")
    p.add_argument("--res", type=int, default=64, help="resolution (default: 64)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default: 16)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per loader (default: 20)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="threads / processes (default: all cores)")
    args = p.parse_args()
    proc, url = start_server()
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        subprocess.run([sys.executable, "-m", "pipeline.cli", "upload", args.shards, "s3://bench/shards"], check=True)
        rows = []
        for loader in ("torch", "dali"):
            for where in (args.shards, "s3://bench/shards"):
                t0 = time.perf_counter()
                r = bench_loader(where, loader, res=args.res, batch_size=args.batch_size, batches=args.batches,
                                 warmup=2, workers=args.workers)
                r.update(shards=where, wall_s=round(time.perf_counter() - t0, 1))  # with pipeline build
                rows.append(r)
                print(json.dumps(r), flush=True)
        for local, s3 in zip(rows[0::2], rows[1::2]):
            print(f"{local['loader']:5s}: disk {local['samples_per_s']:,.0f} samples/s, s3 {s3['samples_per_s']:,.0f} "
                  f"samples/s, s3 / disk = {s3['samples_per_s'] / local['samples_per_s']:.2f} "
                  f"(wall with build: {local['wall_s']} s vs {s3['wall_s']} s)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
