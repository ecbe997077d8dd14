"""One stage of a run: the model in its precision, the optimizer, the learning-rate schedule,
and the state a checkpoint holds (saved collectively, restored for --resume). Built in order,
once the stage's loaders exist (their length sets the schedule):

    state, note = saved_loader_state(resumed, settings, ctx, stage)   # a checkpoint's, if it fits
    run = Run(settings, stage, ctx, chosen_precision, train_loader)
    run.restore(resumed)  or  run.begin(step, weights=...)
    ... run.optimizer.step(); run.scheduler.step(); run.stepped() ...
    run.end_epoch(metrics)               # every rank calls it; rank 0 writes last.pt (and best.pt)
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from train import checkpoint, precision
from train.dist import DistContext, print0
from train.ema import WeightEMA
from train.evaluate import loss_weights
from train.model import build_model, init_output_bias
from train.settings import Stage, TrainingError, TrainSettings


def lr_factor(step: int, total: int, steps_per_epoch: int, s: TrainSettings) -> float:
    """The learning rate at optimizer step `step` (0-based) of a `total`-step stage, as a
    fraction of the peak. step: StepLR by epochs. cosine: linear warm-up over the first --warmup
    of the stage, then half a cosine to 0 at its last step (warmup 0.3 is one-cycle's shape)."""
    if s.schedule == "step":
        return s.lr_gamma ** (step // max(1, steps_per_epoch) // s.lr_step)
    warm = round(s.warmup * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1 + math.cos(math.pi * progress))


def peak_lr(s: TrainSettings, global_batch: int, lr: float | None = None) -> float:
    """--lr (a stage's, or the first) moved to the global batch: linear (Goyal et al. 2017, for
    SGD) or square root (what keeps Adam's update noise level, Malladi et al. 2022), then capped
    at --lr-max: past it Adam at a GPU's batch learned less (BENCHMARKS.md, issue 23, Study 3)."""
    ratio = global_batch / s.lr_batch
    base = s.lr[0] if lr is None else lr
    scaled = base * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[s.lr_scaling]
    return min(scaled, max(s.lr_max, base)) if s.lr_max else scaled  # a rate given above the cap is the user's


class Run:
    """The state of one stage that a checkpoint holds, and the objects that act on it. `step` counts
    optimizer steps over the whole run (all stages), `epoch` and `epoch_step` within the stage,
    `epoch_samples` the samples of the epoch trained over all ranks (the loader's position, which
    a resume on other ranks goes on from). Only its own methods change it."""

    def __init__(self, s: TrainSettings, stage: Stage, ctx: DistContext, chosen: precision.Precision, train_loader):
        self.s, self.stage, self.ctx, self.precision, self.train_loader = s, stage, ctx, chosen, train_loader
        self.gpu = ctx.device.type == "cuda"
        self.weights = loss_weights(asdict(s))
        self.raw = build_model(s.model, dropout=s.dropout)
        init_output_bias(self.raw, s.mask_prior, s.depth_prior)
        if s.sync_bn and ctx.world_size > 1:
            self.raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.raw)
        self.raw = self.precision.prepare(self.raw.to(ctx.device))
        # --ema is the decay a step at --lr-batch: a larger global batch decays as many samples' worth
        # a step, so the average spans the same samples seen whatever the batch.
        global_batch = stage.batch * ctx.world_size
        self.ema = WeightEMA(self.raw, s.ema ** (global_batch / s.lr_batch)) if s.ema else None
        optimizer = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
        # Fused: one kernel for all parameters, on the CPU too (3.6x the default's time per step).
        self.optimizer = optimizer(self.raw.parameters(), lr=peak_lr(s, stage.batch * ctx.world_size, stage.lr),
                                   weight_decay=s.weight_decay, fused=True)
        # Stepped after every optimizer step, from 0 at the stage's start; its state (the step
        # count) goes into checkpoints.
        self.steps_per_epoch = len(train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step, self.epoch, self.epoch_step, self.epoch_samples = 0, 0, 0, 0
        self.best_loss, self.metrics, self.last_saved = math.inf, {}, 0
        self.out = Path(s.out)
        self.resumed_from = None

    def lr_factor(self, step: int) -> float:
        return lr_factor(step, self.stage.steps(self.steps_per_epoch), self.steps_per_epoch, self.s)

    def begin(self, step: int, weights: Path | str | None = None, what: str = "") -> None:
        """A fresh stage at the run's `step`, from `weights` (the previous stage's best or --init)."""
        self.step = self.last_saved = step
        if weights:
            ckpt = checkpoint.load(weights)
            if ckpt["model"] != self.s.model:
                raise TrainingError(f"{what} {weights} holds a {ckpt['model']!r} model, not {self.s.model!r}.")
            self.raw.load_state_dict(ckpt["state_dict"])
            if self.ema:  # the stage's average starts from these weights
                self.ema.reset(self.raw)
            print0(self.ctx, f"initialised from {weights} (res {ckpt['res']}, step {ckpt['step']})")

    def wrap(self) -> torch.nn.Module:
        """Compile before the DDP wrap; the unwrapped model (self.raw) is what gets saved."""
        model = torch.compile(self.raw, mode=self.s.compile_mode) if self.s.compile else self.raw
        if self.ctx.world_size > 1:
            # No buffer broadcast each step (a collective per forward): validate() broadcasts
            # rank 0's BatchNorm statistics before they are used or saved.
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
                else {"broadcast_buffers": False}  # renamed in torch 2.13
            model = DDP(model, device_ids=[self.ctx.local_rank] if self.gpu else None, **no_sync)
        return model

    def stepped(self) -> None:
        """After each optimizer step."""
        if self.ema:
            self.ema.update(self.raw)
        self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
        self.epoch_samples += self.stage.batch * self.ctx.world_size

    def validated(self, metrics: dict) -> None:
        self.metrics = metrics

    def end_epoch(self) -> None:
        """After an epoch and its validation: last.pt, and best.pt (with a stage's best) when the
        validation loss improved. Collective."""
        self.epoch, self.epoch_step, self.epoch_samples = self.epoch + 1, 0, 0
        improved = self.metrics["loss"] < self.best_loss
        self.best_loss = min(self.best_loss, self.metrics["loss"])
        self.save()
        if improved and self.ctx.main:
            for name in {"best.pt", self.stage.best if self.stage.count > 1 else "best.pt"}:
                checkpoint.copy(self.out / "last.pt", self.out / name)

    @property
    def scored(self) -> torch.nn.Module:
        """The weights validation scores and users get: the average with --ema, else the live ones."""
        return self.ema.model if self.ema else self.raw

    def state(self) -> dict:
        # With --ema, state_dict is the average (what evaluate, predict, export and --init read)
        # and live_state_dict the weights the optimizer moves (what --resume goes on from).
        live = {"live_state_dict": self.raw.state_dict(), "ema_updates": self.ema.updates} if self.ema else {}
        if self.ema:
            self.ema.copy_buffers(self.raw)
        return {"model": self.s.model, "model_args": {"dropout": self.s.dropout}, "res": self.stage.res, **live,
                "stage": self.stage.index, "state_dict": self.scored.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                "epoch_step": self.epoch_step, "epoch_samples": self.epoch_samples, "best_loss": self.best_loss, "metrics": self.metrics,
                "settings": asdict(self.s), "world_size": self.ctx.world_size, "batch": self.stage.batch,
                "loader_graph": loader_graph(self.s, self.ctx, self.stage), "order": order_params(self.train_loader)}

    def save(self) -> None:
        """last.pt. Collective: every rank's RNG states (CPU, and the GPU's: dropout) go in, rank 0 writes."""
        mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.ctx.device) if self.gpu else None}
        # The train loader's position, order and draws (DALI's checkpoint; None for other loaders).
        mine = (mine, getattr(self.train_loader, "state", lambda: None)())
        gathered = [mine]
        if dist.is_initialized():
            gathered = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, mine)
        if self.ctx.main:
            rng, loaders = [g[0] for g in gathered], [g[1] for g in gathered]
            checkpoint.save(self.out / "last.pt", {**self.state(), "rng": rng, "loader_states": loaders,
                                                   "loader": self.s.loader})
        self.last_saved = self.step

    def restore(self, ckpt: dict) -> None:
        """Inside the stage from last.pt, at its position in samples (the train loader starts there)."""
        self.raw.load_state_dict(ckpt.get("live_state_dict", ckpt["state_dict"]))
        if self.ema:
            self.ema.model.load_state_dict(ckpt["state_dict"])
            self.ema.updates = ckpt["ema_updates"]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.best_loss, self.metrics, self.last_saved = ckpt["best_loss"], ckpt["metrics"], ckpt["step"]
        self.resumed_from = self.step
        self.resumed_world = (ckpt.get("world_size", self.ctx.world_size), ckpt.get("batch", self.stage.batch))
        self.epoch_samples = resume_position(ckpt)[1]
        # The loader goes on at that sample: the steps it has left end the epoch, whatever the batch.
        deal = getattr(self.train_loader, "deal", None)
        self.epoch_step = self.steps_per_epoch - deal.left(self.epoch_samples) if deal else ckpt["epoch_step"]
        self._keep_schedule_in_samples(ckpt.get("batch", self.stage.batch) * ckpt.get("world_size", self.ctx.world_size))
        if len(ckpt.get("rng", [])) == self.ctx.world_size:  # else a new world: new draws
            mine = ckpt["rng"][self.ctx.rank]
            torch.set_rng_state(mine["cpu"])
            if self.gpu and mine["cuda"] is not None:
                torch.cuda.set_rng_state(mine["cuda"], self.ctx.device)
        # The schedule's current learning rate, for a stage whose length may differ from the saved one's.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.lr_factor(self.scheduler.last_epoch)

    def _keep_schedule_in_samples(self, saved_global_batch: int) -> None:
        """A resume with another global batch (another --batch-size or device default, other
        ranks) goes on from the same number of samples into the stage's schedule, at the
        learning rate of the new batch."""
        now = self.stage.batch * self.ctx.world_size
        if saved_global_batch == now:
            return
        self.scheduler.last_epoch = round(self.scheduler.last_epoch * saved_global_batch / now)
        peak = peak_lr(self.s, now, self.stage.lr)
        self.scheduler.base_lrs = [peak for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = peak

    def log(self, record: dict, writer) -> None:
        """Rank 0: one JSON line per record, and every figure to TensorBoard."""
        if not self.ctx.main:
            return
        record = {"time": round(time.time(), 3), "step": self.step, "epoch": self.epoch, "res": self.stage.res, **record}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("time", "step", "epoch", "res"):
                writer.add_scalar(f"{record['kind']}/{k}", v, self.step)


# The loaders' reading order (pipeline.epoch); a DALI state saved under another is not restored.
ORDER = "deal/1"


def loader_graph(s: TrainSettings, ctx: DistContext, stage: Stage) -> dict:
    """What a saved loader state fits: DALI's graph differs on a GPU (no noise bank, a resize on
    the device), and its random draws are per rank and batch."""
    return {"loader": s.loader, "device": ctx.device.type, "res": stage.res, "batch": stage.batch,
            "world_size": ctx.world_size, "order": ORDER}


def order_params(loader) -> dict | None:
    """What the loader's order depends on besides seed and epoch (pipeline.epoch.Order.params)."""
    deal = getattr(loader, "deal", None)
    return deal.order.params if deal else None


def resume_position(ckpt: dict | None) -> tuple[int, int]:
    """(epoch, samples of it trained over all ranks) where a checkpoint's stage goes on. Older
    checkpoints count steps only: steps × their global batch."""
    if ckpt is None:
        return 0, 0
    samples = ckpt.get("epoch_samples")
    if samples is None:
        batch = ckpt.get("batch") or ckpt.get("settings", {}).get("batch_size") or 0
        samples = ckpt["epoch_step"] * batch * ckpt.get("world_size", 1)
    return ckpt["epoch"], samples


def saved_loader_state(ckpt: dict | None, s: TrainSettings, ctx: DistContext, stage: Stage) -> tuple[object, str]:
    """(this rank's saved train-loader state, or None; why a saved one does not fit and what
    follows, or "")."""
    if ckpt is not None and "epoch_samples" not in ckpt and ckpt.get("epoch_step"):
        return None, ("the checkpoint predates the dealt order: the rest of its epoch is taken from the new order at "
                      "the same sample count, so a few of the epoch's samples may be trained twice or not at all")
    states = (ckpt or {}).get("loader_states")
    if not states or not any(states):  # a new stage, or a loader that keeps no state (torch)
        return None, ""
    saved = ckpt.get("loader_graph") or {"loader": ckpt.get("loader")}  # older checkpoints: the loader's name
    now = loader_graph(s, ctx, stage)
    keys = [k for k in now if k in saved or k == "order"]  # checkpoints before the dealt order have none
    differ = [f"{k} {saved.get(k)} -> {now[k]}" for k in keys if saved.get(k) != now[k]]
    if differ:
        return None, f"the loader's saved state fits another graph ({', '.join(differ)}): its random draws are drawn anew"
    return states[ctx.rank], ""
