"""Make a dataset in the original layout, the way the reference set was made: every foreground
pasted at `placements` random positions on every background, flipped and not, its mask pasted at
the same place, everything saved as JPEG (quality 65 by default).

    depthcli make-dataset --out data/dataset.zip --num-bg 100 --num-fg 100 --placements 20

Backgrounds and foregrounds are procedural unless folders are given: scenes with a ground plane,
a horizon and boxes whose depth is known exactly, and figure-like textured cut-outs. Depth is
8-bit grey, near = bright. An object stands on the ground at its foot point, takes the ground's
depth there, and is scaled by it (nearer is larger), so size, position and depth agree.
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from pipeline.errors import DepthsegError
from pipeline.source import IMAGE_EXTS
from pipeline.workers import cpu_share, ordered, worker_pool


class DatasetError(DepthsegError):
    """Bad settings or inputs; the message is one sentence for the user."""


@dataclass(frozen=True)
class MakeSettings:
    out: str
    bg_dir: str | None = None
    fg_dir: str | None = None
    num_bg: int | None = None  # None: 100 procedural, or every image of --bg-dir
    num_fg: int | None = None
    placements: int = 20
    size: int = 224
    quality: int = 65
    seed: int = 0
    workers: int = field(default_factory=cpu_share)
    overwrite: bool = False


# --- assets: backgrounds (rgb, depth, ground profile) and foregrounds (rgb, alpha) -----------

@dataclass
class Background:
    rgb: np.ndarray  # H×W×3 uint8
    depth: np.ndarray  # H×W float32 in [0, 1], near = 1
    ground: np.ndarray  # per row: depth of the ground there (where an object's foot may stand)
    first_row: int  # the first row where the ground can carry an object


def _smooth_noise(rng, h, w, cells, channels=1) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
    out = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255
    return out[..., None] if channels == 1 else out


def _palette(rng, n) -> np.ndarray:
    """n colours, saturated enough to tell apart, as float RGB in [0, 1]."""
    hsv = np.stack([rng.random(n), 0.3 + 0.6 * rng.random(n), 0.35 + 0.6 * rng.random(n)], 1)
    img = Image.fromarray((hsv[None] * 255).astype(np.uint8), "HSV").convert("RGB")
    return np.asarray(img, dtype=np.float32)[0] / 255


def procedural_background(seed: int, index: int, size: int) -> Background:
    """A ground plane under a sky, with boxes standing on it; disparity is exact by construction."""
    rng = np.random.default_rng([seed, 1, index])
    s = size
    horizon = int(s * rng.uniform(0.25, 0.55))
    rows = np.arange(s, dtype=np.float32)[:, None]
    cols = np.arange(s, dtype=np.float32)[None, :]
    # Ground: disparity grows linearly below the horizon (a flat plane seen by a level camera).
    ground = np.clip((rows[:, 0] - horizon) / (s - horizon), 0, 1)
    depth = np.broadcast_to(ground[:, None], (s, s)).copy()
    sky_top, sky_low, ground_col, *box_cols = _palette(rng, 3 + 6)
    t = np.clip(rows / max(horizon, 1), 0, 1)[..., None]
    rgb = (1 - t) * sky_top + t * (0.5 * sky_low + 0.5)
    rgb = rgb + 0.15 * (_smooth_noise(rng, s, s, 6) - 0.5)  # clouds
    # Ground texture: a perspective checkerboard and noise, so the plane's depth can be seen.
    dist = 1.0 / np.maximum(ground[:, None], 1e-3)
    u, v = (cols - s / 2) / s * dist * 4, dist * 2
    checker = ((np.floor(u) + np.floor(v)) % 2)[..., None]
    ground_rgb = ground_col * (0.75 + 0.2 * checker) + 0.25 * (_smooth_noise(rng, s, s, 24) - 0.5)
    ground_rgb = ground_rgb * (0.7 + 0.3 * ground[:, None, None])  # fog: far is dimmer
    below = (rows > horizon)[..., None]
    rgb = np.where(below, ground_rgb, rgb)
    # Boxes, far to near, each at the depth of the ground at its foot.
    for k, foot in enumerate(sorted(rng.integers(horizon + 4, s, size=rng.integers(2, 7)))):
        d = ground[foot]
        w = int(s * (0.1 + 0.35 * rng.random()) * (0.3 + d))
        h = int(s * (0.1 + 0.4 * rng.random()) * (0.3 + d))
        x0 = int(rng.integers(-w // 2, s - w // 2))
        y0, x1 = max(foot - h, 0), min(x0 + w, s)
        x0 = max(x0, 0)
        if x1 <= x0 or foot <= y0:
            continue
        shade = 0.6 + 0.4 * _smooth_noise(rng, foot - y0, x1 - x0, 4)
        rgb[y0:foot, x0:x1] = box_cols[k % len(box_cols)] * shade
        depth[y0:foot, x0:x1] = d
    rgb = np.clip(rgb, 0, 1)
    return Background((rgb * 255).astype(np.uint8), depth.astype(np.float32), ground, horizon + 4)


def _figure_alpha(rng, w, h) -> Image.Image:
    """A binary silhouette: a person, a four-legged animal or a lumpy object."""
    a = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(a)
    kind = rng.integers(3)
    if kind == 0:  # person: head, torso, arms and legs as thick lines
        cx = w / 2
        head = h * rng.uniform(0.1, 0.14)
        d.ellipse([cx - head * 0.8, 0, cx + head * 0.8, 2 * head], fill=255)
        sh, hip = 2 * head + h * 0.03, h * rng.uniform(0.5, 0.6)
        tw = w * rng.uniform(0.18, 0.3)
        d.rounded_rectangle([cx - tw, sh, cx + tw, hip], radius=tw * 0.5, fill=255)
        lw = max(2, int(w * 0.1))
        for side in (-1, 1):
            d.line([(cx + side * tw * 0.6, hip - 2), (cx + side * w * rng.uniform(0.05, 0.3), h - 1)], fill=255, width=lw)
            d.line([(cx + side * tw, sh + 4), (cx + side * w * rng.uniform(0.3, 0.48), sh + h * rng.uniform(0.0, 0.35))], fill=255, width=max(2, lw - 2))
    elif kind == 1:  # animal: body, neck and head, four legs
        top, bottom = h * rng.uniform(0.2, 0.35), h * rng.uniform(0.55, 0.7)
        d.ellipse([w * 0.15, top, w * 0.85, bottom], fill=255)
        d.ellipse([w * 0.72, 0, w * 0.98, top + (bottom - top) * 0.4], fill=255)
        lw = max(2, int(w * 0.07))
        for x in rng.uniform(0.2, 0.8, 4):
            d.line([(w * x, bottom - 4), (w * x + rng.uniform(-4, 4), h - 1)], fill=255, width=lw)
    else:  # object: a smooth random star polygon
        n = int(rng.integers(5, 11))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(0.55, 1.0, n)
        pts = [(w / 2 + np.cos(t) * w / 2 * q, h / 2 + np.sin(t) * h / 2 * q) for t, q in zip(ang, r)]
        d.polygon(pts, fill=255)
        a = a.filter(ImageFilter.GaussianBlur(2)).point(lambda v: 255 if v > 127 else 0)
    return a


def procedural_foreground(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured figure-like cut-out: (rgb H×W×3 uint8, alpha H×W bool), about size/2 tall."""
    rng = np.random.default_rng([seed, 2, index])
    h = size // 2
    w = int(h * rng.uniform(0.5, 1.0))
    alpha = np.asarray(_figure_alpha(rng, w, h)) > 127
    base, stripe = _palette(rng, 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang, freq = rng.uniform(0, np.pi), rng.uniform(0.1, 0.4)
    stripes = (np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * freq) > 0)[..., None]
    rgb = np.where(stripes, base, stripe) * (0.7 + 0.5 * _smooth_noise(rng, h, w, 5))
    shade = 0.75 + 0.25 * np.cos((xx / w - 0.4) * np.pi)[..., None]  # lit from the left
    return (np.clip(rgb * shade, 0, 1) * 255).astype(np.uint8), alpha


def _image_files(folder: str) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"{folder} holds no .jpg or .png images.")
    return files


def _square(img: Image.Image, size: int, resample=Image.BILINEAR) -> Image.Image:
    """Centre-crop to a square and resize, as the reference's 224×224 backgrounds were."""
    w, h = img.size
    s = min(w, h)
    return img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), resample)


def file_background(path: Path, size: int) -> Background:
    """A user's background; depth from depth/<stem>.* beside it, else a ground-plane prior."""
    rgb = np.asarray(_square(Image.open(path).convert("RGB"), size))
    found = [p for p in path.parent.joinpath("depth").glob(path.stem + ".*") if p.suffix.lower() in IMAGE_EXTS]
    if found:
        depth = np.asarray(_square(Image.open(found[0]).convert("L"), size), dtype=np.float32) / 255
    else:  # far at the top, near at the bottom
        depth = np.broadcast_to(np.linspace(0, 1, size, dtype=np.float32)[:, None], (size, size)).copy()
    ground = np.median(depth, axis=1)
    return Background(rgb, depth, ground, int(size * 0.4))


def file_foreground(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A user's cut-out: an RGBA image, or RGB with masks/<stem>.* beside it."""
    img = Image.open(path)
    masks = [p for p in path.parent.joinpath("masks").glob(path.stem + ".*") if p.suffix.lower() in IMAGE_EXTS]
    if masks:
        alpha = Image.open(masks[0]).convert("L")
    elif img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
    else:
        raise DatasetError(f"{path} has no transparency and no mask in masks/{path.stem}.png.")
    bbox = alpha.point(lambda v: 255 if v > 127 else 0).getbbox()
    if bbox is None:
        raise DatasetError(f"{path} is fully transparent.")
    rgb, alpha = img.convert("RGB").crop(bbox), alpha.crop(bbox)
    scale = (size // 2) / max(rgb.size)  # about half the scene, as procedural figures
    new = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
    return np.asarray(rgb.resize(new, Image.BILINEAR)), np.asarray(alpha.resize(new, Image.BILINEAR)) > 127


# --- one task: a (background, foreground) pair, all its flips and placements ------------------

_SETTINGS: MakeSettings | None = None
_BG_FILES: list[Path] = []
_FG_FILES: list[Path] = []


def _init_worker(settings: MakeSettings, bg_files: list[Path], fg_files: list[Path]):
    global _SETTINGS, _BG_FILES, _FG_FILES
    _SETTINGS, _BG_FILES, _FG_FILES = settings, bg_files, fg_files


@lru_cache(maxsize=4)  # tasks come background-major, so a few suffice
def _background(i: int) -> Background:
    s = _SETTINGS
    return file_background(_BG_FILES[i], s.size) if _BG_FILES else procedural_background(s.seed, i, s.size)


@lru_cache(maxsize=4096)
def _foreground(i: int) -> tuple[np.ndarray, np.ndarray]:
    s = _SETTINGS
    return file_foreground(_FG_FILES[i], s.size) if _FG_FILES else procedural_foreground(s.seed, i, s.size)


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def paste(bg: Background, fg_rgb, fg_alpha, foot_row: int, x_frac: float):
    """Paste a cut-out standing at foot_row, scaled by the ground's depth there.
    Returns (fg_bg rgb, mask bool, depth float, x, y)."""
    s = bg.rgb.shape[0]
    d = float(bg.ground[foot_row - 1])
    scale = 0.35 + 1.0 * d  # nearer is larger
    h = max(4, min(s, int(fg_rgb.shape[0] * scale)))
    w = max(2, min(s, int(fg_rgb.shape[1] * scale)))
    rgb = np.asarray(Image.fromarray(fg_rgb).resize((w, h), Image.BILINEAR))
    alpha = np.asarray(Image.fromarray(fg_alpha.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)) > 127
    y = max(0, foot_row - h)
    x = int(x_frac * (s - w))
    h = min(h, s - y)
    rgb, alpha = rgb[:h], alpha[:h]
    # Nearer boxes hide the object, unless they would hide most of it.
    visible = alpha & (bg.depth[y:y + h, x:x + w] <= d + 1 / 255)
    alpha = visible if visible.sum() * 2 >= alpha.sum() else alpha
    out, mask, depth = bg.rgb.copy(), np.zeros((s, s), bool), bg.depth.copy()
    out[y:y + h, x:x + w][alpha] = rgb[alpha]
    mask[y:y + h, x:x + w] = alpha
    depth[y:y + h, x:x + w][alpha] = d
    return out, mask, depth, x, y


def bg_name(i: int, n: int) -> str:
    return f"bg{i + 1:0{max(3, len(str(n)))}d}"


def fg_name(i: int, n: int) -> str:
    return f"fg{i + 1:0{max(3, len(str(n)))}d}"


def make_pair(task: tuple[int, int, int, int]) -> tuple[int, list[tuple[str, bytes]], list[str]]:
    """All samples of one (bg, fg) pair: returns (bg index, files, label lines)."""
    b, f, n_bg, n_fg = task
    s = _SETTINGS
    bg = _background(b)
    fg_rgb, fg_alpha = _foreground(f)
    rng = np.random.default_rng([s.seed, 3, b, f])
    bname = bg_name(b, n_bg)
    files, labels = [], []
    if f == 0:
        files.append((f"bg/{bname}.jpg", _jpeg(bg.rgb, s.quality)))
    for flip_i, flip in enumerate(("F", "T")):
        rgb, alpha = (fg_rgb[:, ::-1], fg_alpha[:, ::-1]) if flip == "T" else (fg_rgb, fg_alpha)
        for p in range(s.placements):
            foot = int(rng.integers(bg.first_row, s.size + 1))
            out, mask, depth, x, y = paste(bg, np.ascontiguousarray(rgb), np.ascontiguousarray(alpha), foot, rng.random())
            n = (f * 2 + flip_i) * s.placements + p
            stem = f"{bname}_{fg_name(f, n_fg)}_{flip}_{n:06d}"
            files.append((f"fg_bg/{bname}/{stem}.jpg", _jpeg(out, s.quality)))
            files.append((f"fg_bg_masks/{bname}/{stem}.jpg", _jpeg(mask.astype(np.uint8) * 255, s.quality)))
            files.append((f"fg_bg_depth/{bname}/{stem}.jpg", _jpeg((depth * 255 + 0.5).astype(np.uint8), s.quality)))
            labels.append(f"{stem}.jpg\t{x}\t{y}")
    return b, files, labels


# --- output: a zip or a folder, visible under its final name only when complete ---------------

class ZipOutput:
    """Stored (JPEG does not compress), with a fixed timestamp so a seed gives identical bytes."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED)

    def write(self, name: str, data: bytes):
        self.zip.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)

    def commit(self):
        self.zip.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.zip.close()
        self.tmp.unlink(missing_ok=True)


class FolderOutput:
    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, name: str, data: bytes):
        target = self.tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def commit(self):
        """Swap the new folder in; an old one is removed only once the new one is in place."""
        old = self.path.with_name(self.path.name + ".old")
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def _check_assets(bg_files: list[Path], fg_files: list[Path]) -> None:
    """Open every user image here, so a bad one is one sentence before any work starts."""
    for path, load in [(p, file_background) for p in bg_files] + [(p, file_foreground) for p in fg_files]:
        try:
            load(path, 32)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise DatasetError(f"{path} is not a readable image ({e}).") from None


def _check_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise DatasetError(f"{out} already exists; pass --overwrite to replace it.")
    if out.is_dir() and not (out / "fg_bg").is_dir():
        raise DatasetError(f"{out} is a folder but not a dataset (no fg_bg/); not replacing it.")
    if out.is_file() and out.suffix.lower() != ".zip":
        raise DatasetError(f"{out} is a file but not a zip; not replacing it.")


def _assets(s: MakeSettings) -> tuple[list[Path], list[Path], int, int]:
    bg_files = _image_files(s.bg_dir) if s.bg_dir else []
    fg_files = _image_files(s.fg_dir) if s.fg_dir else []
    n_bg = s.num_bg if s.num_bg is not None else (len(bg_files) or 100)
    n_fg = s.num_fg if s.num_fg is not None else (len(fg_files) or 100)
    for files, n, what in ((bg_files, n_bg, "--bg-dir"), (fg_files, n_fg, "--fg-dir")):
        if files and n > len(files):
            raise DatasetError(f"{what} holds {len(files)} images but {n} were asked for.")
    if min(n_bg, n_fg, s.placements) < 1 or s.size < 32 or not 1 <= s.quality <= 100:
        raise DatasetError("--num-bg, --num-fg and --placements must be at least 1, --size at least 32 and --quality 1 to 100.")
    return bg_files[:n_bg], fg_files[:n_fg], n_bg, n_fg


def make_dataset(s: MakeSettings) -> dict:
    """Write the dataset; returns a summary. Memory stays flat: at most a few pairs are in flight."""
    bg_files, fg_files, n_bg, n_fg = _assets(s)
    _check_assets(bg_files, fg_files)
    out = Path(s.out)
    _check_output(out, s.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = ZipOutput(out) if out.suffix.lower() == ".zip" else FolderOutput(out)
    total = n_bg * n_fg * 2 * s.placements
    labels: dict[int, list[str]] = {}
    nbytes = 0
    tasks = ((b, f, n_bg, n_fg) for b in range(n_bg) for f in range(n_fg))
    with worker_pool(s.workers, __name__, _init_worker, (s, bg_files, fg_files)) as pool, \
            tqdm(total=total, unit="sample", desc="make-dataset", smoothing=0.05) as bar:
        try:
            for b, files, lines in ordered(pool, make_pair, tasks, window=4 * max(1, s.workers)):
                for name, data in files:
                    writer.write(name, data)
                    nbytes += len(data)
                labels.setdefault(b, []).extend(lines)
                if len(labels[b]) == n_fg * 2 * s.placements:  # the background is complete
                    writer.write(f"labels/{bg_name(b, n_bg)}_label_info.txt", ("\n".join(labels.pop(b)) + "\n").encode())
                bar.update(len(lines))
        except BaseException:
            writer.abort()  # nothing half-written is left behind; an old output stays as it was
            raise
    writer.commit()
    return {"out": str(out), "samples": total, "backgrounds": n_bg, "foregrounds": n_fg, "bytes": nbytes}
