"""Pairs/s of `depthcli predict`: PyTorch against onnxruntime, batch 1 and 32, in one run.

    .venv/bin/python scripts/bench_predict.py --pairs 32 --res 224 --rounds 2 --threads 1
    python scripts/bench_predict.py --device cuda --batch-sizes 1,256 --pairs 768 --threads 0

Makes --pairs synthetic pairs (--size JPEGs, like downscaled photos), a checkpoint of the
default model (--model) with random weights (speed does not depend on the weights) and its ONNX export (float32, and --fp16), then
runs train.predict.predict, the code behind `depthcli predict`, on every configuration: torch
and onnx at each of --batch-sizes (default 1 and 32), the fp16 file at the largest, and "io only"
(the same reads, resizes and writes with a model that returns zeros: the ceiling that reading
and writing alone allow; and so without the side-by-side picture, --no-side).
PyTorch runs as `depthcli predict` runs it, in the device's precision (train.precision: bf16
autocast on a GPU and on a CPU with AMX); --device cuda runs onnxruntime with its CUDA
provider; without that provider (the plain onnxruntime wheel, or one whose CUDA libraries do not load) the onnx
configurations are left out and the report says why.
Configurations are interleaved round by round, so load from other processes on a shared machine
falls on all of them alike; the report gives the median pairs/s over rounds and each one's ratio
to the first (torch at the smallest batch). --threads is the model's CPU threads (torch and
onnxruntime alike).
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
from train.export import OnnxRunner, export  # noqa: E402
from train.model import MODELS, build_model  # noqa: E402
from train.settings import TrainSettings  # noqa: E402


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


def no_cuda_provider(providers: list[str]) -> str | None:
    """Why onnxruntime cannot run on the GPU here (the plain wheel), or None."""
    if "CUDAExecutionProvider" in providers:
        return None
    return f"this onnxruntime has no CUDAExecutionProvider (it has {', '.join(providers)}); pip install onnxruntime-gpu"


def cuda_provider_fell_back(path: Path) -> str | None:
    """Why an onnxruntime that lists the CUDA provider still cannot run `path` on the GPU, or None:
    when the provider's CUDA or cuDNN libraries do not load, onnxruntime quietly runs on the CPU,
    which at batch 256 and 224 px would take minutes and compare nothing."""
    got = OnnxRunner(path, "cuda").session.get_providers()
    return None if got[0] == "CUDAExecutionProvider" else f"onnxruntime's CUDAExecutionProvider did not load; it ran on {got[0]}"


def configs(args, ckpt: Path, onnx: dict[str, Path], onnx_left_out: str | None = None) -> tuple[dict, dict]:
    """{name: (predict's model arguments, batch size)} in the order they run, and {name: why}
    for what is left out. onnx: the exported files, {"float32": .., "fp16": ..}."""
    torch_name = "torch"
    skipped = {"onnx": onnx_left_out} if onnx_left_out else {}
    with_onnx = not onnx_left_out
    big = max(args.batch_sizes)
    out = {}
    for b in args.batch_sizes:
        out[f"{torch_name} b{b}"] = ({"checkpoint_path": str(ckpt)}, b)
        if with_onnx:
            out[f"onnx b{b}"] = ({"checkpoint_path": None, "onnx_path": str(onnx["float32"])}, b)
    if with_onnx:
        out[f"onnx fp16 b{big}"] = ({"checkpoint_path": None, "onnx_path": str(onnx["fp16"])}, big)
    out[f"io only b{big}"] = ({"checkpoint_path": str(ckpt)}, big)
    out[f"io only b{big} no side"] = ({"checkpoint_path": str(ckpt), "side": False}, big)
    return out, skipped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="pairs per configuration and round (default: 64)")
    p.add_argument("--res", type=int, default=224, help="model resolution (default: 224)")
    p.add_argument("--model", default=TrainSettings.model, choices=tuple(MODELS), help="the network (default: the trainer's, %(default)s)")
    p.add_argument("--size", type=int, nargs=2, default=(640, 480), help="input image width and height (default: 640 480)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all configurations (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="model CPU threads; 0 = the library's default (default: 1)")
    p.add_argument("--workers", type=int, default=2, help="predict's read/write threads (default: 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model runs: cuda = PyTorch on the GPU, onnxruntime's CUDA provider (default: cpu)")
    p.add_argument("--batch-sizes", default="1,32", help="batch sizes, comma-separated (default: 1,32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        p.error(f"--batch-sizes takes numbers like 1,32, not {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes: each must be at least 1")
    return args


def main() -> None:
    import onnxruntime

    args = parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    bgs, scenes = make_pairs(root, args.pairs, tuple(args.size))
    torch.manual_seed(0)
    ckpt = root / "random.pt"
    checkpoint.save(ckpt, {"model": args.model, "model_args": {}, "res": args.res,
                           "state_dict": build_model(args.model).state_dict(), "step": 0, "epoch": 0})
    onnx = {"float32": root / "model.onnx", "fp16": root / "model_fp16.onnx"}
    why = no_cuda_provider(onnxruntime.get_available_providers()) if args.device == "cuda" else None
    if not why:
        for kind, path in onnx.items():
            export(str(ckpt), str(path), fp16=kind == "fp16", samples=2)
        why = cuda_provider_fell_back(onnx["float32"]) if args.device == "cuda" else None
    runs, skipped = configs(args, ckpt, onnx, why)

    real_runner = predict.runner
    rates: dict[str, list[float]] = {name: [] for name in runs}
    runners: dict[str, str] = {}  # what ran: onnxruntime names the provider it got
    for r in range(args.rounds):
        for name, (model_args, batch) in runs.items():
            predict.runner = (lambda *a: (ZeroRunner(args.res), args.res)) if name.startswith("io") else real_runner
            out = predict.predict(bg=str(bgs), fg_bg=str(scenes), out=str(root / "out"), device=args.device,
                                  batch_size=batch, workers=args.workers, threads=args.threads, **model_args)
            rates[name].append(out["pairs"] / out["seconds"])
            runners[name] = out["runner"]
            print(f"round {r + 1} {name:20s} {rates[name][-1]:7.2f} pairs/s", file=sys.stderr)
    predict.runner = real_runner

    first = next(iter(runs))
    base = statistics.median(rates[first])
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads available",
              "command": " ".join(sys.argv), "device": args.device, "pairs": args.pairs, "res": args.res,
              "size": list(args.size), "threads": args.threads, "workers": args.workers, "rounds": args.rounds,
              "pairs_per_s": {k: statistics.median(v) for k, v in rates.items()},
              "runners": runners, "skipped": skipped, "all_rounds": rates}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.pairs} pairs of {args.size[0]}x{args.size[1]} JPEGs at {args.res}px on {args.device}, "
          f"{args.threads or 'default'} model thread(s), {args.workers} io threads, median of {args.rounds} interleaved rounds")
    print(f"{'config':21s}{'pairs/s':>9s}{'vs ' + first:>13s}   rounds")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name:21s}{med:9.2f}{med / base:12.2f}x   " + " ".join(f"{v:.2f}" for v in values))
    for name, why in skipped.items():
        print(f"{name}: left out: {why}")


if __name__ == "__main__":
    main()
