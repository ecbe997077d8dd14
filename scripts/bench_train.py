"""Training throughput per loader, the model alone (synthetic tensors) as the same-run baseline,
so the loader's cost is visible; and against another checkout's trainer, pair by pair.

    python scripts/bench_train.py --shards shards/ --res 64 --ranks 2 --batch-size 16 --steps 30
    python scripts/bench_train.py --loaders synthetic --ranks 1 --res 64 --batch-size 32 \\
        --baseline /work/base --rounds 3          # the defaults against the commit before (a worktree)

Runs train/main.py under torchrun for each loader, one after the other, and reads samples/s
(all ranks together) from its log.jsonl, leaving out the first logged interval (warm-up).
With --baseline, each round runs the other checkout's train/main.py with the same flags just
before this one's and prints the ratio of each pair (A B A B: a drifting machine load falls on
both alike).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_rate(loader: str, out: Path, shards: str, res: int, batch_size: int, steps: int, log_every: int = 5,
               ranks: int = 1, device: str = "cpu", train_args: list[str] = (), timeout: float | None = None,
               checkout: Path = ROOT) -> dict:
    """One train/main.py run under torchrun: samples/s of all ranks together after the first
    logged interval, and the last logged GPU memory figures. Raises RuntimeError with the end
    of the run's output if it fails."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), str(checkout / "train" / "main.py"),
           "--shards", shards, "--out", str(out), "--loader", loader, "--res", str(res), "--batch-size", str(batch_size),
           "--max-steps", str(steps), "--log-every", str(log_every), "--epochs", "1000", "--device", device,
           "--vis-samples", "0", *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // ranks))}  # the CPUs we may use
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise RuntimeError(f"{loader} at {res}px ran past {timeout:.0f} s") from None
    if proc.returncode:
        raise RuntimeError(f"{loader} at {res}px exited {proc.returncode}: {output[-600:]}")
    logged = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    rates = [r["samples_per_s"] for r in logged[1:]] or [logged[-1]["samples_per_s"]]
    memory = {k: logged[-1][k] for k in ("gpu_peak_gb", "gpu_other_gb") if k in logged[-1]}
    rate = sum(rates) / len(rates)
    return {"samples_per_s": round(rate, 1 if rate >= 10 else 3), **memory}  # 3 decimals: a 224 px baseline runs at ~0.6


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it. torchrun starts each worker in a session
    of its own, so killing torchrun's process group would leave a timed-out trainer running
    (on a GPU, beside the runs timed after it). Stopped first, so none starts another."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        _signal(p, signal.SIGSTOP)
        todo += children(p)
    for p in tree:
        _signal(p, signal.SIGKILL)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (tests use it to signal torchrun's workers)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run(loader: str, a, out: Path, checkout: Path = ROOT) -> float:
    r = train_rate(loader, out, a.shards, a.res, a.batch_size, a.steps, a.log_every, a.ranks, a.device, a.train_args.split(),
                   checkout=checkout)
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
    p.add_argument("--baseline", type=Path, help="another checkout whose train/main.py runs before this one's, round by round")
    p.add_argument("--rounds", type=int, default=1, help="rounds of every run (default: 1)")
    a = p.parse_args()
    print(f"res {a.res}, {a.ranks} rank(s) x batch {a.batch_size} on {a.device}, {a.steps} steps, flags '{a.train_args}'")
    for r in range(a.rounds):
        results = {}
        for name in a.loaders.split(","):
            if a.baseline:
                results[f"{name} (baseline)"] = run(name, a, Path(a.work) / f"{name}-baseline", a.baseline)
            results[name] = run(name, a, Path(a.work) / name)
        base = results.get("synthetic")
        for name, rate in results.items():
            vs = f"  {rate / base:5.2f}x the model alone" if base and "baseline" not in name else ""
            if a.baseline and "baseline" not in name:
                vs += f"  {rate / results[name + ' (baseline)']:6.2f}x the baseline's"
            print(f"round {r + 1}: {name:20s} {rate:8.3g} samples/s{vs}", flush=True)


if __name__ == "__main__":
    main()
