"""Training throughput per loader, the model alone (synthetic tensors) as the same-run baseline,
so the loader's cost is visible.

    python scripts/bench_train.py --shards shards/ --res 64 --ranks 2 --batch-size 16 --steps 30

Runs train/main.py under torchrun for each loader, one after the other, and reads samples/s
(all ranks together) from its log.jsonl, leaving out the first logged interval (warm-up).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(loader: str, a, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.ranks), str(ROOT / "train" / "main.py"),
           "--shards", a.shards, "--out", str(out), "--loader", loader, "--res", str(a.res), "--batch-size", str(a.batch_size),
           "--max-steps", str(a.steps), "--log-every", str(a.log_every), "--epochs", "1000", "--device", a.device,
           *a.train_args.split()]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // a.ranks))})
    logged = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    if "gpu_peak_gb" in logged[-1]:
        print(f"{loader}: peak GPU memory {logged[-1]['gpu_peak_gb']:.1f} GB")
    rates = [r["samples_per_s"] for r in logged[1:]]
    return sum(rates) / len(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="shards")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--loaders", default="synthetic,dali,torch")
    p.add_argument("--work", default="/tmp/depthseg-bench-train")
    p.add_argument("--train-args", default="", help="more train/main.py flags, e.g. '--compile'")
    a = p.parse_args()
    results = {name: run(name, a, Path(a.work) / name) for name in a.loaders.split(",")}
    base = results.get("synthetic")
    print(f"res {a.res}, {a.ranks} rank(s) x batch {a.batch_size} on {a.device}, {a.steps} steps")
    for name, rate in results.items():
        print(f"{name:10s} {rate:8.1f} samples/s" + (f"  {rate / base:5.2f}x the model alone" if base else ""))


if __name__ == "__main__":
    main()
