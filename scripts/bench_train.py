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


def train_rate(loader: str, out: Path, shards: str, res: int, batch_size: int, steps: int, log_every: int = 5,
               ranks: int = 1, device: str = "cpu", train_args: list[str] = (), timeout: float | None = None) -> dict:
    """One train/main.py run under torchrun: samples/s of all ranks together after the first
    logged interval, and the last logged GPU memory figures. Raises RuntimeError with the end
    of the run's output if it fails."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), str(ROOT / "train" / "main.py"),
           "--shards", shards, "--out", str(out), "--loader", loader, "--res", str(res), "--batch-size", str(batch_size),
           "--max-steps", str(steps), "--log-every", str(log_every), "--epochs", "1000", "--device", device,
           "--vis-samples", "0", *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{loader} at {res}px ran past {timeout:.0f} s") from None
    if done.returncode:
        raise RuntimeError(f"{loader} at {res}px exited {done.returncode}: {done.stdout[-600:]}")
    logged = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    rates = [r["samples_per_s"] for r in logged[1:]] or [logged[-1]["samples_per_s"]]
    memory = {k: logged[-1][k] for k in ("gpu_peak_gb", "gpu_other_gb") if k in logged[-1]}
    return {"samples_per_s": round(sum(rates) / len(rates), 1), **memory}


def run(loader: str, a, out: Path) -> float:
    r = train_rate(loader, out, a.shards, a.res, a.batch_size, a.steps, a.log_every, a.ranks, a.device, a.train_args.split())
    if "gpu_peak_gb" in r:
        print(f"{loader}: peak GPU memory {r['gpu_peak_gb']:.1f} GB (torch), {r['gpu_other_gb']:.1f} GB beside it (DALI, CUDA)")
    return r["samples_per_s"]


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
