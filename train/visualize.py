"""Pictures of predictions: a grid of bg, fg_bg, mask, mask_pred, depth, depth_pred per sample,
as the reference's visualizations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLUMNS = ("bg", "fg_bg", "mask", "mask_pred", "depth", "depth_pred")


def to_rgb(t: torch.Tensor) -> np.ndarray:
    """C×H×W in [0, 1] (C = 1 or 3) → H×W×3 uint8."""
    a = (t.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def grid(samples: dict[str, torch.Tensor], title: str = "") -> Image.Image:
    """One row per sample, one column per entry of COLUMNS, with a header of column names."""
    n, _, h, w = samples["bg"].shape
    rows = [np.concatenate([to_rgb(samples[c][i]) for c in COLUMNS], axis=1) for i in range(n)]
    top = 14 if title else 0  # the title gets a line of its own above the column names
    header = Image.new("RGB", (w * len(COLUMNS), top + 14), "white")
    draw = ImageDraw.Draw(header)
    if title:
        draw.text((2, 1), title, fill="gray")
    for j, name in enumerate(COLUMNS):
        draw.text((j * w + 2, top + 1), name, fill="black")
    body = Image.fromarray(np.concatenate(rows, axis=0))
    out = Image.new("RGB", (body.width, body.height + header.height), "white")
    out.paste(header, (0, 0))
    out.paste(body, (0, header.height))
    return out


def save_grid(path: str | Path, samples: dict[str, torch.Tensor], title: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(samples, title).save(path)
    return path
