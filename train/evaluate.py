"""Validation: loss and the reference's metrics over a whole split, across ranks.

Used by the trainer at each epoch's end and by `depthcli evaluate` (evaluate_checkpoint), both
with the run's own loss weights (loss_weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import torch
from tqdm import tqdm

from train.dist import all_reduce_sum
from train.losses import LossWeights, total_loss
from train.metrics import MetricSums
from train.precision import Precision, Probe, choose


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


def loss_weights(settings: Mapping) -> LossWeights:
    """The loss a run was trained with, taken by name from its settings (asdict of TrainSettings,
    a checkpoint's "settings" or settings.json): the validation loss of the trainer and of
    `depthcli evaluate` is then one figure. A weight an older run did not save keeps its default."""
    names = {f.name for f in fields(LossWeights)}
    return LossWeights(**{k: v for k, v in settings.items() if k in names})


def evaluate_checkpoint(ckpt_path: str, shards: str, split: str = "val", res: int = 0, batch_size: int = 32,
                        loader: str = "dali", device: str = "cpu", mode: str = "auto", baseline: bool = False,
                        cache_dir: str | None = None, cache_limit: str | int | None = None) -> dict:
    """`depthcli evaluate`: a checkpoint's metrics over a split at `res` (0: the checkpoint's), the
    model in `mode`'s precision (train.precision: auto times a few batches on a CPU), in
    {"metrics", "res", "model", "step"}; with `baseline`, also the non-learned baselines fitted on
    the train split: "baseline" (their figures, also in metrics as baseline/*) and "threshold"."""
    from pipeline.loaders import build_loader
    from train.checkpoint import load, load_model

    ckpt = load(ckpt_path)
    res = res or ckpt["res"]
    common = {"res": res, "batch_size": batch_size, "loader": loader, "device": device, "train": False,
              "cache_dir": cache_dir, "cache_limit": cache_limit}
    data = build_loader(shards, split=split, **common)
    chosen = choose(device, mode, probe=Probe(ckpt["model"], res, batch_size, train=False))
    metrics, _ = evaluate(load_model(ckpt, device, name=ckpt_path), data, device,
                          loss_weights(ckpt.get("settings", {})), chosen, progress=True)
    out = {"metrics": metrics, "res": res, "model": ckpt["model"], "step": ckpt["step"], "baseline": None}
    if baseline:
        from train import baselines

        fitted = baselines.fit(build_loader(shards, split="train", **common))
        out.update(baseline=baselines.score(fitted, data), threshold=fitted.threshold)
        metrics.update({f"baseline/{k}": v for k, v in out["baseline"].items()}, **{"baseline/threshold": fitted.threshold})
    return out
