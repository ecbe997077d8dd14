"""Predictions on the user's own images: a mask and a depth map per (bg, fg_bg) pair, at the
input's size, and a side-by-side picture.

    depthcli predict --checkpoint runs/r224/best.pt --bg bg.jpg --fg-bg scene.jpg --out preds/

--bg and --fg-bg may be files or folders: one bg for a folder of fg_bg images, or two folders
paired by file name (stem).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from train import checkpoint

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class PredictError(Exception):
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


def _tensor(img: Image.Image, res: int) -> torch.Tensor:
    arr = np.asarray(img.resize((res, res), Image.BILINEAR), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)


@torch.no_grad()
def predict_pair(model: torch.nn.Module, res: int, bg: Image.Image, fg_bg: Image.Image,
                 device: torch.device | str = "cpu") -> tuple[Image.Image, Image.Image]:
    """Mask and depth as greyscale images at fg_bg's size (the model runs at `res`)."""
    if bg.size != fg_bg.size:
        raise PredictError(f"bg is {bg.size[0]}x{bg.size[1]} but fg_bg is {fg_bg.size[0]}x{fg_bg.size[1]}; a pair must match.")
    x = torch.cat([_tensor(bg, res), _tensor(fg_bg, res)], 0)[None].to(device)
    mask, depth = model(x)
    to_img = lambda t: Image.fromarray((t[0, 0].float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))  # noqa: E731
    return to_img(mask).resize(fg_bg.size, Image.BILINEAR), to_img(depth).resize(fg_bg.size, Image.BILINEAR)


def side_by_side(*images: Image.Image) -> Image.Image:
    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB"), (i * w, 0))
    return out


def predict(checkpoint_path: str, bg: str, fg_bg: str, out: str, device: str = "cpu", res: int = 0) -> list[Path]:
    """Write <stem>_mask.png, <stem>_depth.png and <stem>_side.png (bg | fg_bg | mask | depth) per
    pair into `out`; returns the side-by-side pictures."""
    todo = pairs(bg, fg_bg)
    ckpt = checkpoint.load(checkpoint_path)
    model = checkpoint.load_model(ckpt, device)
    res = res or ckpt["res"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for bg_path, fg_path in tqdm(todo, desc="predict", unit="pair", disable=len(todo) < 2):
        bg_img, fg_img = _open(bg_path), _open(fg_path)
        try:
            mask, depth = predict_pair(model, res, bg_img, fg_img, device)
        except PredictError as e:
            raise PredictError(f"{fg_path.name}: {e}") from None
        mask.save(out_dir / f"{fg_path.stem}_mask.png")
        depth.save(out_dir / f"{fg_path.stem}_depth.png")
        side_by_side(bg_img, fg_img, mask, depth).save(out_dir / f"{fg_path.stem}_side.png")
        written.append(out_dir / f"{fg_path.stem}_side.png")
    return written
