"""The training curves of finished runs as one markdown table: each run's mask and depth loss
(the mean over a --log-every interval, all ranks) at the first logged step past given samples seen,
then its final validation figures. For comparing batch sizes at equal samples (BENCHMARKS.md,
issue 23, Study 3), where a picture of 20 runs says less than a table.

    python scripts/loss_curves.py /work/bench/quality/runs/40k-gpu1024-64px-32000 \\
        /work/bench/quality/runs/40k-no-aug26-64px-32000 --at 4k,8k,16k,32k
"""

import argparse
import json
from pathlib import Path

from bench_quality import parse_budget, run_ranks


def ranks(run: Path, default: int) -> int:
    """The torchrun processes of a bench_quality run (its done.json keeps the command), else default."""
    done = run / "done.json"
    return run_ranks(json.loads(done.read_text())["command"]) if done.is_file() else default


def curve(run: Path, default_ranks: int) -> tuple[list[dict], dict, int]:
    """The run's training records, its last validation and its global batch (batch × ranks)."""
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    batch = json.loads((run / "settings.json").read_text())["batch_size"]
    batch = batch[0] if isinstance(batch, list) else batch
    return ([r for r in log if r["kind"] == "train"], [r for r in log if r["kind"] == "val"][-1],
            batch * ranks(run, default_ranks))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with log.jsonl and settings.json)")
    p.add_argument("--at", default="4k,8k,16k,32k", help="samples seen, comma-separated (default: %(default)s)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of a run without bench_quality's done.json (default: %(default)s)")
    a = p.parse_args()
    points = [parse_budget(t) for t in a.at.split(",")]
    print("| run | global batch | " + " | ".join(f"mask / depth loss at {n:,}" for n in points)
          + " | val mask IoU | val depth rms |")
    print("|---|---:|" + "---:|" * (len(points) + 2))
    for run in a.runs:
        train, val, global_batch = curve(run, a.ranks)
        cells = []
        for n in points:
            past = [r for r in train if r["step"] * global_batch >= n] or train[-1:]
            seen = past[0]["step"] * global_batch  # a large batch logs seldom, a short run ends early: say where
            cells.append(f"{past[0]['loss_mask']:.3f} / {past[0]['loss_depth']:.3f}"
                         + ("" if 0.8 * n <= seen <= 1.25 * n else f" (at {seen:,})"))
        print(f"| {run.name} | {global_batch} | " + " | ".join(cells) + f" | {val['mask_iou']:.4f} | {val['depth_rms']:.4f} |")


if __name__ == "__main__":
    main()
