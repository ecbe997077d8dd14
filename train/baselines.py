"""Non-learned baselines that a trained model must beat clearly: the mask as
max over channels |fg_bg − bg| > t (t chosen on the train split), the depth as the train
split's mean depth map. Fitted and scored with the same batches and metrics as the model.

    from train.baselines import fit, score
    b = fit(build_loader(shards, split="train", res=64, batch_size=64, train=False))
    metrics = score(b, build_loader(shards, split="val", res=64, batch_size=64))  # as evaluate()'s
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.dist import all_reduce_sum
from train.metrics import MetricSums

# Candidate thresholds: a hundredth of the 0–255 range at a time, past where JPEG noise lies.
THRESHOLDS = torch.arange(1, 51) / 100


@dataclass
class Baseline:
    threshold: float  # mask = max_c |fg_bg − bg| > threshold
    train_iou: float  # what that threshold scored on the split it was chosen on
    mean_depth: torch.Tensor  # 1×H×W, the train split's mean depth map


def change(batch: dict) -> torch.Tensor:
    """max over channels |fg_bg − bg|, B×1×H×W."""
    return (batch["fg_bg"] - batch["bg"]).abs().amax(1, keepdim=True)


@torch.no_grad()
def fit(loader, thresholds: torch.Tensor = THRESHOLDS) -> Baseline:
    """The threshold with the highest IoU over the whole split (total intersection over total
    union, as the metrics count it) and the per-pixel mean depth, over every valid sample (of
    every rank, when distributed)."""
    inter = union = depth_sum = None
    count = 0.0
    for batch in loader:
        v = batch["valid"]
        d, gt = change(batch)[v], batch["mask"][v] > 0.5
        t = thresholds.to(d.device).view(-1, 1, 1, 1, 1)
        pred = d.unsqueeze(0) > t  # T×B×1×H×W
        i = (pred & gt).flatten(1).sum(1).double()
        u = (pred | gt).flatten(1).sum(1).double()
        s = batch["depth"][v].double().sum(0)
        inter, union = (i, u) if inter is None else (inter + i, union + u)
        depth_sum = s if depth_sum is None else depth_sum + s
        count += float(v.sum())
    if inter is None:
        raise ValueError("the split to fit the baselines on is empty")
    sums = all_reduce_sum(torch.cat([inter, union, depth_sum.flatten(), torch.tensor([count], dtype=torch.float64, device=inter.device)]))
    n = len(thresholds)
    iou = sums[:n] / sums[n:2 * n].clamp(min=1)
    best = int(iou.argmax())
    mean_depth = (sums[2 * n:-1] / sums[-1]).view_as(depth_sum).float()
    return Baseline(float(thresholds[best]), float(iou[best]), mean_depth)


@torch.no_grad()
def predict(b: Baseline, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, depth) as a model would give them, B×1×H×W."""
    mask = (change(batch) > b.threshold).float()
    depth = b.mean_depth.to(mask.device).expand(mask.shape[0], *b.mean_depth.shape)
    return mask, depth


@torch.no_grad()
def score(b: Baseline, loader) -> dict[str, float]:
    """The metrics (train.metrics) of the baseline's predictions over a split, across ranks."""
    sums = None
    for batch in loader:
        sums = sums or MetricSums(batch["mask"].device)
        sums.update(*predict(b, batch), batch["mask"], batch["depth"], valid=batch["valid"])
    if sums is None:
        raise ValueError("the split to score the baselines on is empty")
    all_reduce_sum(sums.tensor)
    return sums.compute()
