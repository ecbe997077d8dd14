"""Validation: loss and the reference's metrics over a whole split, across ranks.

Used by the trainer at each epoch's end and by `depthcli evaluate`.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from train.dist import all_reduce_sum
from train.losses import LossWeights, total_loss
from train.metrics import MetricSums
from train.precision import Precision, choose


def model_input(batch: dict) -> torch.Tensor:
    return torch.cat([batch["bg"], batch["fg_bg"]], 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, weights: LossWeights = LossWeights(),
             precision: Precision | None = None, keep: int = 0, progress: bool = False) -> tuple[dict, dict | None]:
    """Metrics (plus "loss", the mean per-sample validation loss) over every valid sample of
    every rank, the model run in `precision` (default: the device's fastest, train.precision);
    and, if keep > 0, the first `keep` samples of this rank's first batch with predictions, for
    pictures. All ranks must call it: it ends with one all_reduce."""
    precision = precision or choose(device)
    model = precision.prepare(model)  # a no-op for the trainer's model, which already is
    was_training = model.training
    model.eval()
    sums, loss = MetricSums(device), torch.zeros(2, dtype=torch.float64, device=device)
    kept = None
    for batch in tqdm(loader, desc="validate", unit="batch", disable=not progress, leave=False):
        with precision.autocast():
            mask_pred, depth_pred = model(precision.input(model_input(batch)))
        mask_pred, depth_pred = mask_pred.float(), depth_pred.float()
        valid = batch["valid"]
        sums.update(mask_pred, depth_pred, batch["mask"], batch["depth"], valid=valid)
        if valid.any():
            v = valid.nonzero().flatten()
            value, _ = total_loss(mask_pred[v], depth_pred[v], batch["mask"][v], batch["depth"][v], weights)
            loss += torch.stack([value.double() * len(v), torch.tensor(float(len(v)), dtype=torch.float64, device=device)])
        if keep and kept is None:
            kept = {k: batch[k][:keep].float().cpu() for k in ("bg", "fg_bg", "mask", "depth")}
            kept.update(mask_pred=mask_pred[:keep].cpu(), depth_pred=depth_pred[:keep].cpu())
    all_reduce_sum(sums.tensor)
    all_reduce_sum(loss)
    model.train(was_training)
    metrics = sums.compute()
    metrics["loss"] = (loss[0] / loss[1]).item() if loss[1] > 0 else float("nan")
    return metrics, kept
