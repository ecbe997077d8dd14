"""bf16 autocast against float32 on this CPU: whole training steps of the model, as the trainer's
`--precision auto` times them (train.precision.time_steps), in rounds, per oneDNN cap.

    python scripts/bench_precision.py --model unet --res 64 --batch-size 32 --rounds 2 --caps ALL
    python scripts/bench_precision.py --model unet --res 224 --batch-size 8 --rounds 1 --caps ALL
    python scripts/bench_precision.py --model unet --res 64 --batch-size 32 --caps AVX2,AVX512_CORE,ALL

Each (round, cap) is a fresh process (oneDNN reads ONEDNN_MAX_CPU_ISA once) that times --steps
steps of each precision, interleaved after a warm-up (forward under autocast, the default
recipe's loss in float32, backward, fused AdamW), one process, --threads threads, and keeps the
least time of each. A cap makes oneDNN act as an older CPU would, which is not always what such
a CPU does (BENCHMARKS.md, "Precision chosen by measurement"): measure real machines where you
can. --infer times forward passes in eval mode instead (what evaluate and predict run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAPS = ("AVX2", "AVX512_CORE", "AVX512_CORE_BF16", "ALL")  # ALL: this CPU's best (AMX where it has it)


def measure(cap: str, a) -> tuple[float, float]:
    """Samples/s in float32 and in bf16, in a fresh process under the cap."""
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if cap != "ALL":
        env["ONEDNN_MAX_CPU_ISA"] = cap
    one = json.dumps([a.model, a.res, a.batch_size, not a.infer, a.steps])
    done = subprocess.run([sys.executable, __file__, "--one", one], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{cap} failed:\n{done.stderr[-2000:]}")
    return tuple(a.batch_size / s for s in json.loads(done.stdout.splitlines()[-1]))


def one(spec: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from train import precision

    model, res, batch, train, steps = json.loads(spec)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    precision.TIMING_BUDGET_S = float("inf")  # every step asked for, however long
    print(json.dumps(precision.time_steps(precision.Probe(model, res, batch, train), True, steps)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--infer", action="store_true", help="forward passes in eval mode (evaluate, predict)")
    p.add_argument("--caps", default=",".join(CAPS), help=f"oneDNN ISA caps, comma-separated (default: {','.join(CAPS)})")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement in this process
    a = p.parse_args()
    if a.one:
        return one(a.one)
    caps = a.caps.split(",")
    rates = {c: [] for c in caps}
    for r in range(a.rounds):
        for c in caps:
            rates[c].append(measure(c, a))
            print(f"round {r + 1}: {c:17s} float32 {rates[c][-1][0]:7.1f}  bf16 {rates[c][-1][1]:7.1f} samples/s",
                  file=sys.stderr, flush=True)
    print(f"{a.model}, {a.res} px, batch {a.batch_size}, {a.threads} threads, {'forward' if a.infer else 'training'} steps, "
          f"least of {a.steps} each, {a.rounds} rounds (samples/s per round)\n")
    print("| oneDNN cap | float32 | bf16 | bf16 / float32 |\n|---|---|---|---|")
    for c in caps:
        f32, b16 = (", ".join(f"{r[i]:.1f}" for r in rates[c]) for i in (0, 1))
        print(f"| {c} | {f32} | {b16} | {', '.join(f'{r[1] / r[0]:.2f}' for r in rates[c])} |")


if __name__ == "__main__":
    main()
