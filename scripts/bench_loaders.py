"""Loaders side by side, in one process: the loader users write by hand (one file per image,
PIL, albumentations per sample, DataLoader with 2 workers) as the baseline, then depthseg's DALI
and torch loaders on shards of the same data, each with the full training augmentation.

    python scripts/bench_loaders.py --res 224 --work /tmp/bench-loaders
    python scripts/bench_loaders.py --res 64 --loaders hand-written,torch --rounds 3

Each round runs the baseline, then each loader; a loader's ratio is to the baseline of its own
round, so other work on a shared machine moves both sides alike (--rounds repeats to show the
spread). Prints samples/s per loader and the ratio; --json for scripts.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.augment import Augment
from pipeline.loaders import build_loader


class HandWritten(Dataset):
    """The reference's way: four files per sample read with PIL, augmented with albumentations."""

    def __init__(self, root: Path, res: int):
        import albumentations as A
        import cv2

        self.root, self.files = root, sorted((root / "fg_bg").rglob("*.jpg"))
        self.geometry = A.Compose(
            [A.Resize(res, res), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.3),
             A.Rotate(limit=15, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.7)],
            additional_targets={"fg_bg": "image", "depth": "mask"})
        self.photometric = A.Compose([
            A.OneOf([A.RGBShift(20, 20, 20), A.HueSaturationValue(20, 30, 20)], p=0.5),
            A.GaussNoise(std_range=(3 / 255, 7 / 255), p=0.5),
            A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(1 / 6, 1 / 3), hole_width_range=(1 / 8, 1 / 4),
                            fill=0, p=0.5)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        f = self.files[i]
        rel = f.relative_to(self.root / "fg_bg")
        load = lambda p, mode: np.asarray(Image.open(p).convert(mode))  # noqa: E731
        out = self.geometry(image=load(self.root / "bg" / f"{rel.parent}.jpg", "RGB"), fg_bg=load(f, "RGB"),
                            mask=load(self.root / "fg_bg_masks" / rel, "L"), depth=load(self.root / "fg_bg_depth" / rel, "L"))
        bg, fg_bg = self.photometric(image=out["image"])["image"], self.photometric(image=out["fg_bg"])["image"]
        t = lambda a: torch.from_numpy(np.array(a)).float().div_(255)  # noqa: E731
        return {"bg": t(bg).permute(2, 0, 1), "fg_bg": t(fg_bg).permute(2, 0, 1),
                "mask": t(out["mask"])[None], "depth": t(out["depth"])[None]}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, its live children (DataLoader workers) and its
    reaped ones: on a machine shared with other work, samples per CPU-second move far less than
    samples per second. Linux only (/proc)."""
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me:  # fields[1]: parent pid; [11], [12]: utime, stime in ticks
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def timed(name: str, stream, batch_size: int, batches: int, warmup: int) -> dict:
    """Samples per second and per CPU-second over `batches` batches after `warmup`."""
    for _ in range(warmup):
        next(stream)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        b = next(stream)
        float(b["mask"][0, 0, 0, 0])  # touch the data, as a consumer would
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    n = batches * batch_size
    return {"loader": name, "samples_per_s": round(n / seconds, 1), "samples_per_cpu_s": round(n / cpu, 1),
            "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}


def bench_hand_written(root: Path, res: int, batch_size: int, batches: int, warmup: int, workers: int, **_) -> dict:
    loader = DataLoader(HandWritten(root, res), batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    return timed("hand-written", iter(loader), batch_size, batches, warmup)


def bench_ours(shards: Path, loader: str, res: int, batch_size: int, batches: int, warmup: int, workers: int,
               rotate_interp: str) -> dict:
    it = build_loader(shards, split="train", res=res, batch_size=batch_size, loader=loader, device="cpu",
                      augment=Augment(rotate_interp=rotate_interp), workers=workers)
    stream = itertools.chain.from_iterable(iter(it) for _ in itertools.count())  # epochs back to back
    return timed(loader, stream, batch_size, batches, warmup)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=224, help="output side in pixels; the data is stored at 224 (default: 224)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per loader and round (default: 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (default: 3)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers / DALI threads (default: all cores)")
    p.add_argument("--loaders", default="hand-written,dali,torch",
                   help="comma-separated, run in this order each round; hand-written is the baseline (default: all three)")
    p.add_argument("--rounds", type=int, default=1, help="baseline-then-loaders rounds, interleaved (default: 1)")
    p.add_argument("--work", default="/tmp/depthseg-bench-loaders", help="data and shards are made here once (default: %(default)s)")
    p.add_argument("--rotate-interp", default="linear", choices=["linear", "nearest"], help="ours; the baseline: linear")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    a = p.parse_args()
    work = Path(a.work)
    data, shards = work / "data", work / "shards"
    cli = str(Path(sys.executable).with_name("depthcli"))
    if not (shards / "manifest.json").exists():  # 20 x 10 x 2 x 20 = 8,000 samples, as files and as shards
        subprocess.run([cli, "make-dataset", "--out", str(data), "--num-bg", "20", "--num-fg", "10", "--overwrite"], check=True)
        subprocess.run([cli, "shard", "--src", str(data), "--out", str(shards), "--overwrite"], check=True)
    kw = {"res": a.res, "batch_size": a.batch_size, "batches": a.batches, "warmup": a.warmup, "workers": a.workers}
    results = []
    for r in range(a.rounds):
        base = None
        for name in a.loaders.split(","):
            if name == "hand-written":
                out = bench_hand_written(data, **kw)
            else:
                out = bench_ours(shards, name, rotate_interp=a.rotate_interp, **kw)
            base = base or out
            results.append({**out, "round": r + 1, "vs_hand_written": round(out["samples_per_s"] / base["samples_per_s"], 2),
                            "cpu_vs_hand_written": round(out["samples_per_cpu_s"] / base["samples_per_cpu_s"], 2)})
    if a.json:
        print(json.dumps({"res": a.res, "cores": os.cpu_count(), "results": results}))
        return
    print(f"res {a.res}, batch {a.batch_size}, {a.workers} workers/threads, {os.cpu_count()} cores, full augmentation, "
          f"our rotation {a.rotate_interp}")
    for r in results:
        print(f"round {r['round']}  {r['loader']:13s} {r['samples_per_s']:8,.1f} samples/s {r['vs_hand_written']:5.2f}x   "
              f"{r['samples_per_cpu_s']:8,.1f} samples/CPU-s {r['cpu_vs_hand_written']:5.2f}x hand-written")
    for name in a.loaders.split(",")[1:]:
        wall = [r["vs_hand_written"] for r in results if r["loader"] == name]
        cpu = [r["cpu_vs_hand_written"] for r in results if r["loader"] == name]
        print(f"{name}: {min(wall):.2f}-{max(wall):.2f}x hand-written in samples/s, {min(cpu):.2f}-{max(cpu):.2f}x in "
              f"samples/CPU-s, over {len(wall)} round(s)")


if __name__ == "__main__":
    main()
