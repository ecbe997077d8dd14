"""Which CPUs should train in bf16: whole training steps in float32 and in bf16 autocast (both
channels_last), with oneDNN capped at older instruction sets, as a CPU without them would run.

    python scripts/bench_precision.py --model unet --res 64 --batch-size 32 --rounds 2
    python scripts/bench_precision.py --model diff --res 64 --batch-size 32 --caps AVX2,ALL

Each (cap, precision) runs in a fresh process (oneDNN reads ONEDNN_MAX_CPU_ISA once): --steps
steps after 2 of warm-up of the trainer's step on random tensors (forward under autocast, the
default recipe's loss in float32, backward, fused AdamW), one process, --threads threads.
Rounds interleave the configurations, so a drifting machine load falls on all alike; the table
gives each round's samples/s and bf16's ratio to float32 under the same cap. This is the
measurement behind train/precision.py's rule (bf16 only with AMX).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAPS = ("AVX2", "AVX512_CORE", "AVX512_CORE_BF16", "ALL")  # ALL: this CPU's best (AMX where it has it)


def steps_per_s(model: str, res: int, batch: int, bf16: bool, steps: int) -> float:
    """In this process: samples/s of the trainer's whole step."""
    sys.path.insert(0, str(ROOT))
    import torch

    from train.losses import LossWeights, total_loss
    from train.model import build_model
    from train.precision import Precision

    p = Precision("cpu", bf16, True)
    net = p.prepare(build_model(model, dropout=0.0))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    x = p.input(torch.rand(batch, 6, res, res, generator=g))
    mask, depth = (torch.rand(batch, 1, res, res, generator=g) for _ in range(2))
    weights = LossWeights(w_dice=1.0, mask_image_terms=False)

    def step():
        with p.autocast():
            m, d = net(x)
        loss, _ = total_loss(m, d, mask, depth, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def measure(cap: str, bf16: bool, a) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if cap != "ALL":
        env["ONEDNN_MAX_CPU_ISA"] = cap
    cmd = [sys.executable, __file__, "--one", json.dumps([a.model, a.res, a.batch_size, bf16, a.steps])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{cap} {'bf16' if bf16 else 'float32'} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--caps", default=",".join(CAPS), help=f"oneDNN ISA caps, comma-separated (default: {','.join(CAPS)})")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement in this process
    a = p.parse_args()
    if a.one:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
        print(steps_per_s(*json.loads(a.one)))
        return
    caps = a.caps.split(",")
    rates = {(c, b): [] for c in caps for b in (False, True)}
    for r in range(a.rounds):
        for key in rates:
            rates[key].append(measure(*key, a))
            print(f"round {r + 1}: {key[0]:17s} {'bf16' if key[1] else 'float32':8s} {rates[key][-1]:7.1f} samples/s",
                  file=sys.stderr, flush=True)
    print(f"{a.model}, {a.res} px, batch {a.batch_size}, {a.threads} threads, {a.steps} steps, {a.rounds} rounds "
          "(samples/s per round)\n")
    print("| oneDNN cap | float32 | bf16 | bf16 / float32 |\n|---|---|---|---|")
    for c in caps:
        f32, b16 = rates[(c, False)], rates[(c, True)]
        ratios = ", ".join(f"{b / f:.2f}" for f, b in zip(f32, b16))
        print(f"| {c} | {', '.join(f'{v:.1f}' for v in f32)} | {', '.join(f'{v:.1f}' for v in b16)} | {ratios} |")


if __name__ == "__main__":
    main()
