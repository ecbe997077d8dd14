"""Pairs/s of `depthcli predict`: PyTorch against onnxruntime, batch 1 and 32, in one run.

    .venv/bin/python scripts/bench_predict.py --pairs 32 --res 224 --rounds 2 --threads 1

Makes --pairs synthetic pairs (--size JPEGs, like downscaled photos), a checkpoint of random
weights (speed does not depend on the weights) and its ONNX export (float32, and --fp16), then
runs train.predict.predict, the code behind `depthcli predict`, on every configuration: torch
and onnx at batch 1 and 32, the fp16 file at 32, and "io only" (the same reads, resizes and
writes with a model that returns zeros: the ceiling that reading and writing alone allow; and
so without the side-by-side picture, --no-side).
Configurations are interleaved round by round, so load from other processes on a shared machine
falls on all of them alike; the report gives the median pairs/s over rounds and each one's ratio
to torch at batch 1. --threads is the model's CPU threads (torch and onnxruntime alike).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import checkpoint, predict  # noqa: E402
from train.export import export  # noqa: E402
from train.model import build_model  # noqa: E402


def make_pairs(root: Path, n: int, size: tuple[int, int]) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    bgs, scenes = root / "bgs", root / "scenes"
    bgs.mkdir()
    scenes.mkdir()
    w, h = size
    for i in range(n):
        # Smooth gradients plus noise: JPEGs about as costly to decode as photos.
        yy, xx = np.mgrid[0:h, 0:w]
        bg = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, i % 256)], -1)
        bg = np.clip(bg + rng.normal(0, 12, bg.shape), 0, 255).astype(np.uint8)
        Image.fromarray(bg).save(bgs / f"p{i:04d}.jpg", quality=90)
        bg[h // 3:2 * h // 3, w // 3:w // 2] = (230, 40, 40)
        Image.fromarray(bg).save(scenes / f"p{i:04d}.jpg", quality=90)
    return bgs, scenes


class ZeroRunner:
    """No model: what reading, resizing and writing alone allow."""

    name = "io only"

    def __init__(self, res: int):
        self.res = res

    def __call__(self, bg: np.ndarray, fg_bg: np.ndarray):
        zeros = np.zeros((len(bg), 1, *bg.shape[2:]), np.float32)
        return zeros, zeros


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="pairs per configuration and round (default: 64)")
    p.add_argument("--res", type=int, default=224, help="model resolution (default: 224)")
    p.add_argument("--size", type=int, nargs=2, default=(640, 480), help="input image width and height (default: 640 480)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all configurations (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="model CPU threads; 0 = the library's default (default: 1)")
    p.add_argument("--workers", type=int, default=2, help="predict's read/write threads (default: 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    bgs, scenes = make_pairs(root, args.pairs, tuple(args.size))
    torch.manual_seed(0)
    ckpt = root / "random.pt"
    checkpoint.save(ckpt, {"model": "reference", "model_args": {}, "res": args.res,
                           "state_dict": build_model("reference").state_dict(), "step": 0, "epoch": 0})
    for fp16 in (False, True):
        export(str(ckpt), str(root / f"model{'_fp16' if fp16 else ''}.onnx"), fp16=fp16, samples=2)

    configs = {  # name -> (predict's model arguments, batch size)
        "torch b1": ({"checkpoint_path": str(ckpt)}, 1),
        "onnx b1": ({"checkpoint_path": None, "onnx_path": str(root / "model.onnx")}, 1),
        "torch b32": ({"checkpoint_path": str(ckpt)}, 32),
        "onnx b32": ({"checkpoint_path": None, "onnx_path": str(root / "model.onnx")}, 32),
        "onnx fp16 b32": ({"checkpoint_path": None, "onnx_path": str(root / "model_fp16.onnx")}, 32),
        "io only b32": ({"checkpoint_path": str(ckpt)}, 32),
        "io only b32 no side": ({"checkpoint_path": str(ckpt), "side": False}, 32),
    }
    real_runner = predict.runner
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (model_args, batch) in configs.items():
            predict.runner = (lambda *a: (ZeroRunner(args.res), args.res)) if name.startswith("io") else real_runner
            out = predict.predict(bg=str(bgs), fg_bg=str(scenes), out=str(root / "out"), device="cpu",
                                  batch_size=batch, workers=args.workers, threads=args.threads, **model_args)
            rates[name].append(out["pairs"] / out["seconds"])
            print(f"round {r + 1} {name:20s} {rates[name][-1]:7.2f} pairs/s", file=sys.stderr)
    predict.runner = real_runner

    base = statistics.median(rates["torch b1"])
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads available",
              "command": " ".join(sys.argv), "pairs": args.pairs, "res": args.res, "size": list(args.size),
              "threads": args.threads, "workers": args.workers,
              "pairs_per_s": {k: statistics.median(v) for k, v in rates.items()},
              "all_rounds": rates}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.pairs} pairs of {args.size[0]}x{args.size[1]} JPEGs at {args.res}px, {args.threads or 'default'} model "
          f"thread(s), {args.workers} io threads, median of {args.rounds} interleaved rounds")
    print(f"{'config':21s}{'pairs/s':>9s}{'vs torch b1':>13s}   rounds")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name:21s}{med:9.2f}{med / base:12.2f}x   " + " ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
