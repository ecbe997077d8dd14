"""Validation metrics, the reference's definitions, accumulated over a whole set and across ranks.

    sums = MetricSums(device)
    for batch in loader:
        sums.update(mask_pred, depth_pred, batch["mask"], batch["depth"], valid=batch.get("valid"))
    torch.distributed.all_reduce(sums.tensor)     # when distributed: one call, all the figures
    print(format_table(sums.compute()))

Per head: rms = sqrt(mean (pred − gt)²); with pred and gt clamped to [0.1, 1],
t<1.25^k = fraction of pixels with max(gt/pred, pred/gt) < 1.25^k, k = 1, 2, 3; for the mask
IoU of pred > 0.5 and gt > 0.5; for depth abs-rel = mean |pred − gt| / gt on the same clamped
pair as the ratios (the clamp keeps gt = 0 from dividing by zero). Every mean is over all
pixels of the set (not a mean of per-image figures), and IoU is the set's total intersection
over its total union, so the figures do not depend on how the set was batched or split.
"""

from __future__ import annotations

import math

import torch

# Layout of MetricSums.tensor: sums that add up across batches and ranks.
HEADS = ("mask", "depth")
FIELDS = ("samples", "pixels",
          "mask_sq", "mask_t1", "mask_t2", "mask_t3", "mask_inter", "mask_union",
          "depth_sq", "depth_t1", "depth_t2", "depth_t3", "depth_abs_rel")
_INDEX = {name: i for i, name in enumerate(FIELDS)}
RATIO_KEYS = ("t1", "t2", "t3")
CLAMP = (0.1, 1.0)


def _per_sample(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample (B,) sums for one head, in float64 so a large set's sums stay exact."""
    pred, gt = pred.detach().double().flatten(1), gt.detach().double().flatten(1)
    p, g = pred.clamp(*CLAMP), gt.clamp(*CLAMP)
    ratio = torch.maximum(g / p, p / g)
    out = {"sq": (pred - gt).square().sum(1), "abs_rel": ((p - g).abs() / g).sum(1)}
    for k, key in enumerate(RATIO_KEYS, 1):
        out[key] = (ratio < 1.25 ** k).double().sum(1)
    pm, gm = pred > 0.5, gt > 0.5
    out["inter"], out["union"] = (pm & gm).double().sum(1), (pm | gm).double().sum(1)
    return out


class MetricSums:
    """Sums and counts for the metrics, held in one float64 tensor (`.tensor`) so that a single
    all_reduce combines ranks; `compute()` turns the sums into figures."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.tensor = torch.zeros(len(FIELDS), dtype=torch.float64, device=device)

    def update(self, mask_pred: torch.Tensor, depth_pred: torch.Tensor, mask: torch.Tensor,
               depth: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add a batch (each B×1×H×W). `valid` (B,) bool marks real samples, so the padding
        that evens out the ranks' last batches is not counted. No host sync happens here."""
        b = mask.shape[0]
        m, d = _per_sample(mask_pred, mask), _per_sample(depth_pred, depth)
        cols = {"samples": torch.ones(b, dtype=torch.float64, device=mask.device),
                "pixels": torch.full((b,), float(mask[0].numel()), dtype=torch.float64, device=mask.device)}
        cols.update({f"mask_{k}": m[k] for k in ("sq", *RATIO_KEYS, "inter", "union")})
        cols.update({f"depth_{k}": d[k] for k in ("sq", *RATIO_KEYS, "abs_rel")})
        per_sample = torch.stack([cols[name] for name in FIELDS], 1)  # B × fields
        if valid is not None:
            # where, not multiply: a padded sample's NaN times 0 would still be NaN.
            per_sample = torch.where(valid.to(per_sample.device).view(b, 1), per_sample, 0.0)
        self.tensor += per_sample.sum(0).to(self.tensor.device)

    def compute(self) -> dict[str, float]:
        """Figures as {"mask/rms", "mask/t1", .., "mask/iou", "depth/..", "depth/abs_rel",
        "avg/rms", "avg/t1".., "samples"}. NaN when nothing was counted; IoU is 1.0 when both
        masks are empty everywhere (nothing to get wrong)."""
        s = dict(zip(FIELDS, self.tensor.tolist()))  # the one host sync

        def per_pixel(name: str) -> float:
            return s[name] / s["pixels"] if s["pixels"] else math.nan

        out: dict[str, float] = {"samples": s["samples"]}
        for head in HEADS:
            out[f"{head}/rms"] = math.sqrt(per_pixel(f"{head}_sq"))
            for key in RATIO_KEYS:
                out[f"{head}/{key}"] = per_pixel(f"{head}_{key}")
        out["mask/iou"] = (math.nan if not s["pixels"] else
                           s["mask_inter"] / s["mask_union"] if s["mask_union"] else 1.0)
        out["depth/abs_rel"] = per_pixel("depth_abs_rel")
        for key in ("rms", *RATIO_KEYS):
            out[f"avg/{key}"] = (out[f"mask/{key}"] + out[f"depth/{key}"]) / 2
        return out


COLUMNS = (("rms", "rms"), ("t1", "t<1.25"), ("t2", "t<1.25^2"), ("t3", "t<1.25^3"),
           ("iou", "IoU"), ("abs_rel", "abs-rel"))


def format_table(metrics: dict[str, float]) -> str:
    """The reference's table: rows Mask, Depth, Avg; '-' where a column does not apply."""
    lines = ["       " + "".join(f"{title:>10}" for _, title in COLUMNS)]
    for row in ("mask", "depth", "avg"):
        cells = [f"{metrics[f'{row}/{key}']:>10.4f}" if f"{row}/{key}" in metrics else f"{'-':>10}"
                 for key, _ in COLUMNS]
        lines.append(f"{row.capitalize():<7}" + "".join(cells))
    return "\n".join(lines)
