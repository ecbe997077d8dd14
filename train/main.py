"""Train the mask + depth model with PyTorch DDP.

    torchrun --nproc_per_node 2 train/main.py --res 64 --shards shards/ --out runs/r64
    torchrun --nproc_per_node 2 train/main.py --res 128 --init runs/r64/best.pt --out runs/r128
    python train/main.py --res 64 --epochs 1          # one process works too

nccl on GPUs (bf16 autocast, channels_last), gloo on the CPU. Every rank reads its own part of
the shards through the DALI loader (or --loader torch). Checkpoints (last.pt every --ckpt-every
steps and at each epoch's end, best.pt by validation loss) are written atomically; --resume
continues a killed run from last.pt; SIGTERM saves and exits cleanly on every rank; a non-finite
loss stops the run with one sentence and keeps the last good checkpoint.

--resume auto continues from last.pt when there is one, else starts: what a launcher that
restarts failed workers needs (torchrun --max-restarts N, several nodes: see README "Many nodes").
With the DALI loader a resumed epoch goes on with exactly the samples, order and augmentation
the interrupted run would have seen (DALI's checkpoint of each rank's pipeline is in last.pt).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun train/main.py): import the project
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from pipeline.augment import Augment
from pipeline.bench import gpu_memory
from pipeline.loaders import build_loader
from pipeline.manifest import LoaderError, ManifestError
from pipeline.store import StoreError
from train import checkpoint
from train.dist import DistContext, all_reduce_sum, cleanup, print0, setup
from train.evaluate import evaluate, model_input
from train.losses import LossWeights, total_loss
from train.metrics import format_table
from train.model import MODELS, build_model, init_output_bias
from train.visualize import save_grid

DEFAULT_BATCH = {64: 64, 128: 64, 224: 16}  # the reference's; raise them on a big GPU
# On a GPU (sized for 80 GB, bf16): batch 16 at 224 px would need 156 launch-bound steps/s for
# 2,500 samples/s. Activations kept for backward are about 37, 131 and 387 MB a sample in
# float32 at 64, 128 and 224 px (saved-tensor hooks on the CPU); scripts/gpu_check.sh reports the peak.
GPU_BATCH = {64: 1024, 128: 256, 224: 128}


@dataclass
class TrainSettings:
    """Every option of a run, saved in each checkpoint and in settings.json beside it."""

    shards: str = field(default="shards", metadata={"help": "shard folder (depthcli shard)"})
    out: str = field(default="runs/depthseg", metadata={"help": "run folder: checkpoints, logs, pictures"})
    res: int = field(default=224, metadata={"help": "square training resolution, a multiple of 4"})
    epochs: int = field(default=5, metadata={"help": "epochs to train"})
    batch_size: int = field(default=0, metadata={"help": "per rank; 0 = by --res: on the CPU the reference's (64 at 64 and 128, 16 at 224), on a GPU 1024, 256, 128"})
    recipe: str = field(default="fast", metadata={"help": "fast: the measured best (BENCHMARKS.md); reference: the seed's "
                                                           "Adam + StepLR + loss. Sets the options below that are not given"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (decoupled weight decay) or adam (L2, the reference's)"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate at a global batch of --lr-batch"})
    lr_batch: int = field(default=32, metadata={"help": "global batch (all ranks) at which --lr applies"})
    lr_scaling: str = field(default="sqrt", metadata={"help": "how the learning rate follows the global batch: sqrt, linear or none"})
    schedule: str = field(default="cosine", metadata={"help": "cosine (to 0 at the run's last step, after --warmup) or step (StepLR)"})
    warmup: float = field(default=0.05, metadata={"help": "linear warm-up over this fraction of the run's steps"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    lr_step: int = field(default=2, metadata={"help": "StepLR: epochs between learning-rate drops"})
    lr_gamma: float = field(default=0.5, metadata={"help": "StepLR: factor of each drop"})
    model: str = field(default="diff", metadata={"help": "diff: the reference network whose fg_bg stream also sees |fg_bg - bg|; "
                                                           "reference: the seed's network"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the encoder's blocks"})
    mask_prior: float = field(default=0.1, metadata={"help": "initial mask output (the foreground fraction); 0 = PyTorch's default init"})
    depth_prior: float = field(default=0.5, metadata={"help": "initial depth output; 0 = PyTorch's default init"})
    w_ssim: float = field(default=LossWeights.w_ssim, metadata={"help": "loss weight of 1 - SSIM, per head"})
    w_l1: float = field(default=LossWeights.w_l1, metadata={"help": "loss weight of L1, per head"})
    w_edge: float = field(default=LossWeights.w_edge, metadata={"help": "loss weight of the Sobel edge term, per head"})
    w_bce: float = field(default=LossWeights.w_bce, metadata={"help": "loss weight of BCE (as KL) on the mask head"})
    w_dice: float = field(default=1.0, metadata={"help": "loss weight of soft Dice on the mask head"})
    mask_image_terms: bool = field(default=False, metadata={"help": "the mask head also gets the SSIM, L1 and edge terms"})
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm across ranks (BatchNorm statistics of the global batch)"})
    aug_shared: bool = field(default=True, metadata={"help": "photometric augmentation drawn once per sample for bg and fg_bg"})
    loader: str = field(default="dali", metadata={"help": "dali, torch, or synthetic (random tensors: the model alone)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda or cpu"})
    workers: int = field(default=0, metadata={"help": "loader threads (dali) or processes (torch) per rank; 0 = cores / ranks"})
    hw_decoder_load: float = field(default=-1.0, metadata={"help": "dali on a GPU: share of JPEGs for the hardware decoder; -1 = the loader's default (0.9)"})
    augment: bool = field(default=True, metadata={"help": "the reference's training augmentation"})
    rotate_interp: str = field(default="linear", metadata={"help": "rotation of bg and fg_bg: linear or nearest"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on GPU"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format on GPU"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    compile_mode: str = field(default="default", metadata={"help": "torch.compile's mode: default, reduce-overhead "
                                                                   "(CUDA graphs: for launch-bound small batches) or max-autotune"})
    init: str = field(default="", metadata={"help": "start from this checkpoint's weights (e.g. a lower resolution's best.pt)"})
    resume: str = field(default="", metadata={"help": "continue the run in --out from its last.pt: --resume (or must) "
                                                     "requires one, --resume auto starts a new run when there is none"})
    seed: int = field(default=0, metadata={"help": "seed of weights, data order and augmentation"})
    log_every: int = field(default=10, metadata={"help": "steps between logged figures (and the ranks' agreement on stopping)"})
    ckpt_every: int = field(default=500, metadata={"help": "steps between checkpoints, besides each epoch's end"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps in all, as a SIGTERM would (the schedule "
                                                        "still spans --epochs, so --resume goes on exactly); 0 = no limit"})
    vis_samples: int = field(default=4, metadata={"help": "validation samples in each epoch's picture"})

    def batch(self) -> int:
        if self.batch_size:
            return self.batch_size
        if self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available()):
            return GPU_BATCH.get(self.res, 128 if self.res > 128 else 256)
        return DEFAULT_BATCH.get(self.res, 16 if self.res > 128 else 64)


# What --recipe sets, unless given on the command line. "fast" is the dataclass defaults above.
RECIPES = {
    "fast": {},
    "reference": {"model": "reference", "optimizer": "adam", "lr": 1e-3, "lr_scaling": "none", "schedule": "step", "warmup": 0.0,
                  "dropout": 0.2, "mask_prior": 0.0, "depth_prior": 0.0, "w_dice": 0.0, "mask_image_terms": True,
                  "sync_bn": False, "aug_shared": False},
}
CHOICES = {"recipe": tuple(RECIPES), "model": tuple(MODELS), "optimizer": ("adamw", "adam"),
           "lr_scaling": ("sqrt", "linear", "none"),
           "schedule": ("cosine", "step"), "compile_mode": ("default", "reduce-overhead", "max-autotune")}


def lr_factor(step: int, total: int, steps_per_epoch: int, s: "TrainSettings") -> float:
    """The learning rate at optimizer step `step` (0-based) of a `total`-step run, as a fraction
    of the peak. step: StepLR by epochs. cosine: linear warm-up over the first --warmup of the
    run, then half a cosine to 0 at its last step (warmup 0.3 is one-cycle's shape)."""
    if s.schedule == "step":
        return s.lr_gamma ** (step // max(1, steps_per_epoch) // s.lr_step)
    warm = round(s.warmup * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1 + math.cos(math.pi * progress))


def peak_lr(s: "TrainSettings", global_batch: int) -> float:
    """--lr moved to the global batch: linear (Goyal et al. 2017, for SGD) or square root (what
    keeps Adam's update noise level, Malladi et al. 2022)."""
    ratio = global_batch / s.lr_batch
    return s.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[s.lr_scaling]


class NonFiniteLoss(Exception):
    pass


class TrainingError(Exception):
    """Bad settings or input; the message is one sentence for the user."""


# What a resumed run may change; everything else must be as the run was started.
RESUMABLE_CHANGES = {"epochs", "max_steps", "ckpt_every", "log_every", "workers", "device", "vis_samples",
                     "compile", "compile_mode", "shards", "loader", "resume", "out", "hw_decoder_load"}


def get_args_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """One flag per TrainSettings field, --no-X for booleans, each help ending in its default.
    only_given: no defaults, so parsing returns just the flags on the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainSettings):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        shown = argparse.SUPPRESS if only_given else default
        if f.name == "resume":  # --resume alone means "must"
            p.add_argument(flag, nargs="?", const="must", choices=("must", "auto"), default=shown,
                           help=f"{f.metadata['help']} (default: no)")
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=shown, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(default), default=shown, choices=CHOICES.get(f.name),
                           help=f"{f.metadata['help']} (default: {default})")
    return p


def settings_from(argv: list[str] | None) -> TrainSettings:
    """The command line's settings; with --resume, the run's own, changed only where allowed."""
    given = vars(get_args_parser(only_given=True).parse_args(argv))
    s = TrainSettings(**vars(get_args_parser().parse_args(argv)))
    s = replace(s, **{k: v for k, v in RECIPES[s.recipe].items() if k not in given})
    last = Path(s.out) / "last.pt"
    if not s.resume or not last.is_file():
        return s
    saved = checkpoint.load(last)["settings"]
    differ = [k for k, v in given.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if differ:
        k = differ[0]
        raise TrainingError(f"--resume continues {s.out} with its own settings, but --{k.replace('_', '-')} "
                            f"{given[k]} differs from the run's {saved.get(k)}; drop it or start a new --out.")
    return TrainSettings(**{**saved, **{k: v for k, v in given.items() if k in RESUMABLE_CHANGES}})


# --- one run ---------------------------------------------------------------------------------

class Run:
    """The state of a run that a checkpoint holds, and the objects that act on it."""

    def __init__(self, s: TrainSettings, ctx: DistContext):
        self.s, self.ctx = s, ctx
        self.gpu = ctx.device.type == "cuda"
        self.autocast = (partial(torch.autocast, "cuda", dtype=torch.bfloat16) if self.gpu and s.bf16 else nullcontext)
        self.channels_last = self.gpu and s.channels_last
        self.weights = LossWeights(s.w_ssim, s.w_l1, s.w_edge, s.w_bce, s.w_dice, s.mask_image_terms)
        self.raw = build_model(s.model, dropout=s.dropout)
        init_output_bias(self.raw, s.mask_prior, s.depth_prior)
        if s.sync_bn and not self.gpu:
            raise TrainingError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA tensors only; drop it on the CPU.")
        if s.sync_bn and ctx.world_size > 1:
            self.raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.raw)
        self.raw = self.raw.to(ctx.device)
        if self.channels_last:
            self.raw = self.raw.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(self.raw.parameters(), lr=peak_lr(s, s.batch() * ctx.world_size),
                                   weight_decay=s.weight_decay, fused=self.gpu or None)
        # Stepped after every optimizer step; its state (the step count) goes into checkpoints.
        # The run's length is known once the loader is: train() sets steps_per_epoch first.
        self.steps_per_epoch = 1
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.best_loss, self.metrics, self.last_saved = math.inf, {}, 0
        self.out = Path(s.out)
        self.train_loader, self.loader_state, self.resumed_from = None, None, None

    def lr_factor(self, step: int) -> float:
        return lr_factor(step, self.s.epochs * self.steps_per_epoch, self.steps_per_epoch, self.s)

    def start_schedule(self, steps_per_epoch: int) -> None:
        """The learning rate of the current step, now that the run's length is known."""
        self.steps_per_epoch = steps_per_epoch
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.lr_factor(self.step)

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

    def state(self) -> dict:
        return {"model": self.s.model, "model_args": {"dropout": self.s.dropout}, "res": self.s.res,
                "state_dict": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                "epoch_step": self.epoch_step, "best_loss": self.best_loss, "metrics": self.metrics,
                "settings": asdict(self.s), "world_size": self.ctx.world_size}

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
        self.raw.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.epoch, self.epoch_step = ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]
        self.best_loss, self.metrics, self.last_saved = ckpt["best_loss"], ckpt["metrics"], ckpt["step"]
        if len(ckpt.get("rng", [])) == self.ctx.world_size:  # else a new world: new draws
            mine = ckpt["rng"][self.ctx.rank]
            torch.set_rng_state(mine["cpu"])
            if self.gpu and mine["cuda"] is not None:
                torch.cuda.set_rng_state(mine["cuda"], self.ctx.device)
            if ckpt.get("loader") == self.s.loader and ckpt.get("loader_states"):
                self.loader_state = ckpt["loader_states"][self.ctx.rank]

    def log(self, record: dict, writer) -> None:
        """Rank 0: one JSON line per record, and every figure to TensorBoard."""
        if not self.ctx.main:
            return
        record = {"time": round(time.time(), 3), "step": self.step, "epoch": self.epoch, **record}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("time", "step", "epoch"):
                writer.add_scalar(f"{record['kind']}/{k}", v, self.step)


class StopRequest:
    """While active, SIGTERM sets a flag; the ranks agree on it at the next sync and stop together."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *_):
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, *_):
        self.requested = True


def train_one_epoch(run: Run, model, loader, writer, stop: StopRequest) -> str:
    """Returns "done", "stopped" (SIGTERM) or "max_steps". Every --log-every steps the ranks sum
    their losses, non-finite counts and stop flags in one all_reduce, so they decide together."""
    s, ctx = run.s, run.ctx
    model.train()
    # Resumed mid-epoch: a loader restored from its checkpoint (DALI) goes on where it stopped;
    # any other is reseeded, so the epoch's first batches are read and dropped (the epoch keeps
    # its length and the ranks stay in step).
    skip = run.epoch_step
    restored, run.loader_state = run.loader_state is not None, None
    bar = tqdm(total=len(loader) - skip, desc=f"epoch {run.epoch + 1}/{s.epochs}", unit="step", disable=not ctx.main,
               dynamic_ncols=True)
    sums = torch.zeros(4, device=ctx.device)  # loss, mask loss, depth loss, non-finite count
    t0, n = time.perf_counter(), 0
    # A checkpoint taken after the epoch's last step (SIGTERM, --max-steps) restores a DALI loader
    # that would go straight on with the next epoch: nothing of this one is left.
    batches = [] if restored and skip >= len(loader) else loader
    for i, batch in enumerate(batches, skip if restored else 0):
        if i < skip:
            continue
        with run.autocast():
            mask_pred, depth_pred = model(model_input(batch, run.channels_last))
        loss, parts = total_loss(mask_pred, depth_pred, batch["mask"], batch["depth"], run.weights)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        run.step, run.epoch_step, n = run.step + 1, run.epoch_step + 1, n + 1
        sums += torch.stack([loss.detach(), parts["mask"], parts["depth"], (~torch.isfinite(loss.detach())).float()])
        bar.update()
        end = i == len(loader) - 1
        at_max = bool(s.max_steps) and run.step >= s.max_steps and not end  # at the end: after validation
        if run.step % s.log_every and not end and not at_max:
            continue
        agreed = all_reduce_sum(torch.cat([sums, torch.tensor([float(stop.requested)], device=ctx.device)]))
        if agreed[3] > 0:  # a CPU-GPU sync point, once per --log-every steps
            raise NonFiniteLoss
        rate = n * s.batch() * ctx.world_size / (time.perf_counter() - t0)
        record = {"kind": "train", "loss": (agreed[0] / (n * ctx.world_size)).item(),
                  "loss_mask": (agreed[1] / (n * ctx.world_size)).item(), "loss_depth": (agreed[2] / (n * ctx.world_size)).item(),
                  "lr": run.optimizer.param_groups[0]["lr"], "samples_per_s": rate}
        record.update(gpu_memory(str(ctx.device)))  # torch's peak, and DALI's pool beside it
        run.log(record, writer)
        bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{rate:,.0f}")
        sums.zero_()
        t0, n = time.perf_counter(), 0
        if agreed[4] > 0:
            run.save()
            bar.close()
            return "stopped"
        if at_max:
            run.save()
            bar.close()
            return "max_steps"
        if s.ckpt_every and run.step - run.last_saved >= s.ckpt_every:
            run.save()
    bar.close()
    return "done"


def validate(run: Run, model, loader, writer) -> None:
    """Every rank evaluates rank 0's model (the one saved): DDP syncs BatchNorm's running stats
    only at the start of a forward, so after the last step each rank's differ a little."""
    if dist.is_initialized():
        for buffer in run.raw.buffers():
            dist.broadcast(buffer, 0)
    metrics, kept = evaluate(run.raw, loader, run.ctx.device, run.weights, run.autocast, run.channels_last,
                             keep=run.s.vis_samples, progress=run.ctx.main)
    run.metrics = metrics
    run.log({"kind": "val", **{k.replace("/", "_"): v for k, v in metrics.items()}}, writer)
    print0(run.ctx, f"validation after epoch {run.epoch + 1}: loss {metrics['loss']:.4f}\n{format_table(metrics)}")
    if run.ctx.main and kept:
        save_grid(run.out / "vis" / f"epoch_{run.epoch + 1:03d}.png", kept, title=f"res {run.s.res}, step {run.step}")


def prepare(run: Run) -> None:
    """--resume or --init; refuse to mix another run's logs into --out silently."""
    s = run.s
    last = run.out / "last.pt"
    if s.resume and last.is_file():
        run.restore(checkpoint.load(last))
        run.resumed_from = run.step
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        print0(run.ctx, f"resuming {last} at step {run.step} (epoch {run.epoch + 1}, step {run.epoch_step} of it)"
                        + (f", torchrun restart {restart}" if restart else "")
                        + (", the loader exactly where it was" if run.loader_state is not None else ""))
    elif s.resume == "must":
        raise TrainingError(f"--resume: there is no {last} to continue from.")
    elif last.is_file():
        raise TrainingError(f"{run.out} already holds a run; pass --resume to continue it or choose another --out.")
    elif s.init:
        ckpt = checkpoint.load(s.init)
        if ckpt["model"] != s.model:
            raise TrainingError(f"--init {s.init} holds a {ckpt['model']!r} model, not {s.model!r}.")
        run.raw.load_state_dict(ckpt["state_dict"])
        print0(run.ctx, f"initialised from {s.init} (res {ckpt['res']}, step {ckpt['step']})")


def same_start(run: Run) -> None:
    """Every rank must continue from the same step: a rank whose --out holds no last.pt (a node
    without the shared file system) would start at 0 and fall out of step with the others."""
    if run.ctx.world_size == 1 or not run.s.resume:  # a new run starts at 0 on every rank
        return
    step = torch.tensor([run.step, -run.step], dtype=torch.float64, device=run.ctx.device)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    if step[0] != -step[1]:  # max(step) != min(step)
        raise TrainingError(f"the ranks would resume from different steps ({int(-step[1])} to {int(step[0])}): "
                            f"--out {run.out} must be one folder that every node sees (a shared file system).")


def loaders(run: Run):
    s, ctx = run.s, run.ctx
    workers = s.workers or max(1, (os.cpu_count() or 1) // ctx.world_size)
    aug = Augment(rotate_interp=s.rotate_interp, shared=s.aug_shared) if s.augment else Augment.off()
    common = {"res": s.res, "batch_size": s.batch(), "loader": s.loader, "device": str(ctx.device),
              "rank": ctx.rank, "world_size": ctx.world_size, "workers": workers}
    if s.loader == "dali" and s.hw_decoder_load >= 0:
        common["hw_decoder_load"] = s.hw_decoder_load
    # A loader restored from its own checkpoint (DALI) goes on exactly; any other is seeded by the
    # step too, so a resumed run does not replay the data order of its start.
    exact = run.loader_state is not None
    train = build_loader(s.shards, split="train", augment=aug, seed=s.seed if exact else s.seed + run.step,
                         **({"state": run.loader_state} if exact else {}), **common)
    # Validation decodes and resizes only, between epochs: a few threads, not a second set of all cores.
    val = build_loader(s.shards, split="val", seed=s.seed, **{**common, "workers": max(1, workers // 4)})
    return train, val


def train(s: TrainSettings, ctx: DistContext) -> int:
    torch.manual_seed(s.seed * 1000 + ctx.rank)
    if ctx.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))  # ranks share the cores
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run = Run(s, ctx)
    prepare(run)
    same_start(run)
    if ctx.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "settings.json").write_text(json.dumps(asdict(s), indent=1) + "\n")
    train_loader, val_loader = loaders(run)
    run.train_loader = train_loader
    run.start_schedule(len(train_loader))
    model = run.wrap()
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run.out / "tb")) if ctx.main else None
    if run.resumed_from is not None:
        run.log({"kind": "resume", "from_step": run.resumed_from, "exact": run.loader_state is not None,
                 "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))}, writer)
    print0(ctx, f"training {s.model} at {s.res}px: {ctx.world_size} rank(s) on {ctx.device.type}, batch {s.batch()} "
                f"per rank, {len(train_loader)} steps per epoch, loader {s.loader}")
    with StopRequest() as stop:
        return _epochs(run, model, train_loader, val_loader, writer, stop)


def _epochs(run: Run, model, train_loader, val_loader, writer, stop: StopRequest) -> int:
    s, ctx = run.s, run.ctx
    try:
        while run.epoch < s.epochs:
            outcome = train_one_epoch(run, model, train_loader, writer, stop)
            if outcome != "done":
                print0(ctx, f"{'SIGTERM' if outcome == 'stopped' else '--max-steps'}: saved {run.out / 'last.pt'} at step {run.step}")
                return 0
            validate(run, model, val_loader, writer)
            run.epoch, run.epoch_step = run.epoch + 1, 0
            improved = run.metrics["loss"] < run.best_loss
            run.best_loss = min(run.best_loss, run.metrics["loss"])
            run.save()
            if improved and ctx.main:
                checkpoint.copy(run.out / "last.pt", run.out / "best.pt")
            if s.max_steps and run.step >= s.max_steps:
                print0(ctx, f"--max-steps: saved {run.out / 'last.pt'} at step {run.step}")
                return 0
    except NonFiniteLoss:
        kept = f"the last good checkpoint is {run.out / 'last.pt'} (step {run.last_saved})" if run.last_saved else "no checkpoint was written yet"
        print0(ctx, f"error: the loss became non-finite before step {run.step}; stopped, {kept}.", file=sys.stderr)
        return 1
    finally:
        if writer:
            writer.close()
    print0(ctx, f"done: {run.step} steps, best validation loss {run.best_loss:.4f}, checkpoints in {run.out}")
    return 0


def fail(e: Exception, rank: int, world: int) -> int:
    """Every rank says its own error, named by rank in a world of several: one that only rank 0
    told would leave a failing rank 1 silent (torchrun then just reports its exit code)."""
    print(f"error{f' (rank {rank})' if world > 1 else ''}: {e}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        s = settings_from(argv)
        ctx = setup(s.device)
    except (TrainingError, checkpoint.CheckpointError, RuntimeError) as e:
        return fail(e, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    try:
        return train(s, ctx)
    except (TrainingError, ManifestError, checkpoint.CheckpointError, ValueError, LoaderError, StoreError) as e:
        return fail(e, ctx.rank, ctx.world_size)
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
