"""Predictions on the user's own images: a mask and a depth map per (bg, fg_bg) pair, at the
input's size, and a side-by-side picture.

    depthcli predict --checkpoint runs/r224/best.pt --bg bg.jpg --fg-bg scene.jpg --out preds/
    depthcli predict --onnx model.onnx --bg bgs/ --fg-bg scenes/ --out preds/ --batch-size 32

--bg and --fg-bg may be files or folders: one bg for a folder of fg_bg images, or two folders
paired by file name (stem). Pairs run `--batch-size` at a time, in PyTorch (a checkpoint) or in
onnxruntime (a file from `depthcli export`), with the same preprocessing and the same files out;
a few threads decode and resize the next batches and write the finished ones meanwhile.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.epoch import check_res
from pipeline.errors import DepthsegError
from train import checkpoint, precision

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class PredictError(DepthsegError):
    """Bad input; the message is one sentence for the user."""


def _images(folder: Path) -> dict[str, Path]:
    """Images by stem; two with one stem (a.jpg, a.png) would make pairing ambiguous."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            if p.stem in found:
                raise PredictError(f"{folder} holds both {found[p.stem].name} and {p.name}; pairs are matched by name.")
            found[p.stem] = p
    return found


def pairs(bg: str | Path, fg_bg: str | Path) -> list[tuple[Path, Path]]:
    """(bg, fg_bg) paths: file + file, file + folder of fg_bg, or two folders matched by stem."""
    bg, fg_bg = Path(bg), Path(fg_bg)
    for p in (bg, fg_bg):
        if not p.exists():
            raise PredictError(f"{p} does not exist.")
    if fg_bg.is_file():
        if bg.is_dir():
            raise PredictError(f"--bg {bg} is a folder but --fg-bg {fg_bg} is one file; give one bg file.")
        return [(bg, fg_bg)]
    fgs = _images(fg_bg)
    if not fgs:
        raise PredictError(f"{fg_bg} holds no images.")
    if bg.is_file():
        return [(bg, f) for f in fgs.values()]
    bgs = _images(bg)
    missing = sorted(set(fgs) - set(bgs))
    if missing:
        raise PredictError(f"{fg_bg} has {len(missing)} image(s) without a bg of the same name in {bg}, e.g. {missing[0]}.")
    return [(bgs[k], f) for k, f in fgs.items()]


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise PredictError(f"{path} is not a readable image ({e}).") from None


def _array(img: Image.Image, res: int) -> np.ndarray:
    """3×res×res float32 in [0, 1]: what the model and the ONNX file take (README's example too)."""
    return (np.asarray(img.resize((res, res), Image.BILINEAR), dtype=np.float32) / 255).transpose(2, 0, 1)


def _to_image(pred: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """One 1×H×W prediction in [0, 1] as a greyscale image of `size`."""
    return Image.fromarray((np.clip(pred[0], 0, 1) * 255 + 0.5).astype(np.uint8)).resize(size, Image.BILINEAR)


class Loaded(NamedTuple):
    fg_path: Path
    bg: Image.Image
    fg_bg: Image.Image
    x_bg: np.ndarray
    x_fg_bg: np.ndarray


def load_pair(bg_path: Path, fg_path: Path, res: int) -> Loaded:
    """Decode, check and resize one pair (runs in a worker thread: PIL lets go of the GIL)."""
    bg, fg_bg = _open(bg_path), _open(fg_path)
    if bg.size != fg_bg.size:
        raise PredictError(f"{fg_path.name}: bg is {bg.size[0]}x{bg.size[1]} but fg_bg is "
                           f"{fg_bg.size[0]}x{fg_bg.size[1]}; a pair must match.")
    return Loaded(fg_path, bg, fg_bg, _array(bg, res), _array(fg_bg, res))


def save_pair(out_dir: Path, pair: Loaded, mask: np.ndarray, depth: np.ndarray, side: bool = True) -> Path:
    """<stem>_mask.png and <stem>_depth.png at the input's size, and <stem>_side.png
    (bg | fg_bg | mask | depth) if `side`: the widest PNG, most of the writing time."""
    stem = pair.fg_path.stem
    mask_img, depth_img = _to_image(mask, pair.fg_bg.size), _to_image(depth, pair.fg_bg.size)
    mask_img.save(out_dir / f"{stem}_mask.png")
    depth_img.save(out_dir / f"{stem}_depth.png")
    if not side:
        return out_dir / f"{stem}_mask.png"
    side_by_side(pair.bg, pair.fg_bg, mask_img, depth_img).save(out_dir / f"{stem}_side.png")
    return out_dir / f"{stem}_side.png"


def side_by_side(*images: Image.Image) -> Image.Image:
    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB"), (i * w, 0))
    return out


class TorchRunner:
    """The checkpoint's model in PyTorch, in `mode`'s precision (train.precision: auto times
    forward passes of `batch` pairs at `res` on a CPU): (bg, fg_bg) float32 arrays B×3×H×W to
    (mask, depth) float32 B×1×H×W."""

    def __init__(self, checkpoint_path: str, device: str = "cpu", mode: str = "auto", res: int = 0, batch: int = 16):
        ckpt = checkpoint.load(checkpoint_path)
        probe = precision.Probe(ckpt["model"], res or ckpt["res"], batch, train=False)
        self.precision = precision.choose(device, mode, probe=probe)
        self.model = self.precision.prepare(checkpoint.load_model(ckpt, device, name=checkpoint_path))
        self.device, self.res = device, ckpt["res"]
        self.name = f"torch on {device}, {self.precision}"

    @torch.inference_mode()
    def __call__(self, bg: np.ndarray, fg_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.precision.input(torch.from_numpy(np.concatenate([bg, fg_bg], 1)).to(self.device))
        with self.precision.autocast():
            out = self.model(x)
        return tuple(t.float().cpu().numpy() for t in out)


def runner(checkpoint_path: str | None, onnx_path: str | None, device: str, res: int, threads: int = 0,
           mode: str = "auto", batch: int = 16):
    """The model to run and its resolution: a checkpoint in PyTorch, or an exported file in onnxruntime."""
    if bool(checkpoint_path) == bool(onnx_path):
        raise PredictError("give either --checkpoint or --onnx (one of them).")
    if onnx_path:
        from train.export import OnnxRunner

        run = OnnxRunner(onnx_path, device, threads)
        if res and res != run.res and not run.dynamic_hw:
            raise PredictError(f"{onnx_path} was exported for {run.res}x{run.res} inputs (no --dynamic); "
                               f"--res {res} cannot run on it.")
    else:
        run = TorchRunner(checkpoint_path, device, mode, res, batch)
    res = check_res(res or run.res)
    return run, res


def predict(checkpoint_path: str | None, bg: str, fg_bg: str, out: str, device: str = "cpu", res: int = 0,
            batch_size: int = 16, workers: int = 2, onnx_path: str | None = None, threads: int = 0,
            side: bool = True, mode: str = "auto") -> dict:
    """Mask, depth and side-by-side pictures (see save_pair) for every pair into `out`, `batch_size`
    pairs a model call; `workers` threads decode and resize the next batches and write the last
    ones while the model runs; `threads` is the model's CPU threads (0: the library's default).
    Returns {"written": side pictures (masks without `side`), "pairs", "seconds", "runner", "res", "batch_size"}."""
    if batch_size < 1 or workers < 1:
        raise PredictError(f"--batch-size and --workers must be at least 1, got {batch_size} and {workers}.")
    todo = pairs(bg, fg_bg)
    run, res = runner(checkpoint_path, onnx_path, device, res, threads, mode, batch_size)
    torch_threads = torch.get_num_threads()
    if threads and not onnx_path:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    ahead = 2  # batches read ahead and batches being written: enough to keep the model busy
    written: list[Path] = []
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(workers)
    try:
        submit = lambda batch: [pool.submit(load_pair, b, f, res) for b, f in batch]  # noqa: E731
        loading, saving = deque(submit(b) for b in batches[:ahead]), deque()
        with tqdm(total=len(todo), desc="predict", unit="pair", disable=len(todo) < 2) as bar:
            for i in range(len(batches)):
                loaded = [f.result() for f in loading.popleft()]
                if i + ahead < len(batches):
                    loading.append(submit(batches[i + ahead]))
                mask, depth = run(np.stack([p.x_bg for p in loaded]), np.stack([p.x_fg_bg for p in loaded]))
                saving.append([pool.submit(save_pair, out_dir, p, m, d, side) for p, m, d in zip(loaded, mask, depth)])
                while len(saving) > ahead or (saving and i == len(batches) - 1):
                    written += [f.result() for f in saving.popleft()]
                bar.update(len(loaded))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error: drop the reads not started
        torch.set_num_threads(torch_threads)
    return {"written": written, "pairs": len(todo), "seconds": time.perf_counter() - t0, "runner": run.name,
            "res": res, "batch_size": batch_size}
