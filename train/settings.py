"""A training run's settings: the TrainSettings dataclass (one field per flag, its default and
help beside it), the recipes that fill what the command line leaves out, the stages of a
progressive run, and the command line itself.

    s = settings_from(["--res", "64,128,224", "--epochs", "8,3,2"])
    for stage in s.stages():            # Stage(index=0, res=64, epochs=8, batch=..), ..
        ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from pipeline.augment import OPS, Augment
from pipeline.cache import CACHE_DIR_HELP, CACHE_LIMIT_HELP
from pipeline.epoch import check_res
from pipeline.errors import DepthsegError
from train import checkpoint
from train.precision import MODES
from train.losses import LossWeights
from train.model import MODELS

USAGE = """Train the mask + depth model with PyTorch DDP.

    torchrun --nproc_per_node 2 train/main.py --res 64 --shards shards/ --out runs/r64
    torchrun --nproc_per_node 2 train/main.py --res 64,128,224 --epochs 8,3,2 --out runs/prog
    python train/main.py --res 64 --epochs 1          # one process works too
    python train/main.py --config runs/r64/settings.json --out runs/again --seed 1   # a run's settings, flags over them

nccl on GPUs, gloo on the CPU; bf16 autocast where it is measured faster than float32 on this
machine (--precision auto), channels_last everywhere. The ranks read an order of the samples that depends on --seed and
the epoch only, dealt a global batch at a time, through the DALI loader (or --loader torch). --res 64,128,224 runs the seed's progressive schedule in one run
folder: each stage has its own warm-up and cosine and starts from the previous stage's best
weights; best_<res>px.pt keeps each stage's best, best.pt the latest stage's. Checkpoints
(last.pt every --ckpt-every steps and at each epoch's end) are written atomically; --resume
continues a killed run from last.pt, in whichever stage it was; SIGTERM saves and exits cleanly
on every rank; a non-finite loss stops the run with one sentence and keeps the last good
checkpoint.

--resume auto continues from last.pt when there is one, else starts: what a launcher that
restarts failed workers needs (torchrun --max-restarts N, several nodes: see README "Many nodes").
A resumed epoch goes on at the sample where the run stopped, with either loader: on the same
ranks with exactly the samples, order and augmentation the interrupted run would have seen
(DALI's random draws are in last.pt; the torch loader's are drawn per sample), on other ranks
with each remaining sample once and fewer than one global batch of the epoch left out.
--trace-samples FILE records the keys every rank trained on at every step.
"""

# Per rank. On the CPU, what the quality benchmark chose for 2 ranks on 2 cores; on a GPU (sized
# for 80 GB, bf16) batches large enough that the GPU is not launch-bound, unless a stage would
# then take fewer than MIN_STEPS optimizer steps: at equal samples (32k, 64 px) global batches of
# 64 / 128 / 256 / 1024 (500 / 250 / 125 / 31 steps) ended 0.008 / 0.020 / 0.039 / 0.147 mask IoU
# below the CPU's 32 (1,000 steps): what a short run lacks is steps (BENCHMARKS.md, "Study 3").
# GPU_MIN_BATCH keeps batch norm's statistics sound: 8 ranks × 4 trained as well as 2 × 16 at
# equal samples (0.9423 / 0.0207 against 0.9420 / 0.0201, "Study 3"), and 2 × 32 (500 steps) did
# not, with the rate capped or not. scripts/gpu_check.sh reports the peak memory.
CPU_BATCH = {64: 16, 128: 16, 224: 8}
GPU_BATCH = {64: 1024, 128: 256, 224: 128}
MIN_STEPS = 1000
GPU_MIN_BATCH = 4


def default_batch(res: int, gpu: bool, stage_samples: float = 0, world_size: int = 1) -> int:
    """The per-rank batch when --batch-size is 0; on a GPU, given the stage's samples (its epochs
    × the training split), no larger than gives it MIN_STEPS steps on world_size ranks."""
    if not gpu:
        return CPU_BATCH.get(res, 8 if res > 128 else 16)
    batch = GPU_BATCH.get(res, 128 if res > 128 else 256)
    if stage_samples:
        batch = min(batch, max(GPU_MIN_BATCH, int(stage_samples // (MIN_STEPS * world_size))))
    return batch


class TrainingError(DepthsegError):
    """Bad settings or input; the message is one sentence for the user."""


def per_stage(kind: type):
    """A parser of '64,128,224' -> (64, 128, 224): a flag that takes one value per stage."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in str(text).split(","))
        except ValueError:
            values = ()
        if not values or any(v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or several separated by commas, got {text!r}")
        return values
    return parse


PER_STAGE = {"res": int, "epochs": float, "batch_size": int, "lr": float}  # epochs may be fractional: 0.5 of a 400k set


@dataclass
class TrainSettings:
    """Every option of a run, saved in each checkpoint and in settings.json beside it."""

    shards: str = field(default="shards", metadata={"help": "shard folder (depthcli shard) or s3://bucket/prefix"})
    out: str = field(default="runs/depthseg", metadata={"help": "run folder: checkpoints, logs, pictures"})
    res: tuple = field(default=(224,), metadata={"help": "square training resolution (a multiple of 4), or the stages of a "
                                                        "progressive run, e.g. 64,128,224: each starts from the best weights of the one before"})
    epochs: tuple = field(default=(5.0,), metadata={"help": "epochs, one number for every stage or one per stage (e.g. 8,3,2); "
                                                           "fractions are fine (0.5: half of a large set; the schedule spans it)"})
    batch_size: tuple = field(default=(0,), metadata={"help": "per rank, one for every stage or one per stage; 0 = by resolution: "
                                                             f"on the CPU {CPU_BATCH} by px; on a GPU {GPU_BATCH}, or less (at least {GPU_MIN_BATCH}) to "
                                                             f"give each stage {MIN_STEPS:,} steps"})
    recipe: str = field(default="fast", metadata={"help": "fast: the measured best (BENCHMARKS.md); diff: the defaults before the unet "
                                                           "model; reference: the seed's Adam + StepLR + loss. Sets the options below that are not given"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (decoupled weight decay) or adam (L2, the reference's)"})
    lr: tuple = field(default=(4e-3,), metadata={"help": "peak learning rate at a global batch of --lr-batch, one for every "
                                                         "stage or one per stage (e.g. 4e-3,1e-3,5e-4)"})
    lr_batch: int = field(default=32, metadata={"help": "global batch (all ranks) at which --lr applies"})
    lr_max: float = field(default=2e-2, metadata={"help": "how far scaling to the global batch may raise the peak learning rate (about one "
                                                           "GPU's default rate: 8 GPUs' uncapped 6.4e-2 trained worse); a larger --lr stays; 0 = no cap"})
    lr_scaling: str = field(default="sqrt", metadata={"help": "how the learning rate follows the global batch: sqrt, linear or none"})
    schedule: str = field(default="cosine", metadata={"help": "cosine (to 0 at each stage's last step, after --warmup) or step (StepLR)"})
    warmup: float = field(default=0.05, metadata={"help": "linear warm-up over this fraction of each stage's steps"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    lr_step: int = field(default=2, metadata={"help": "StepLR: epochs between learning-rate drops"})
    lr_gamma: float = field(default=0.5, metadata={"help": "StepLR: factor of each drop"})
    model: str = field(default="unet", metadata={"help": "unet: one encoder over bg, fg_bg and |fg_bg - bg| with a mask and a depth "
                                                           "decoder (unet-s, unet-l: narrower, wider); diff: the reference network whose "
                                                           "fg_bg stream also sees |fg_bg - bg|; reference: the seed's network"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the encoder's blocks"})
    mask_prior: float = field(default=0.1, metadata={"help": "initial mask output (the foreground fraction); 0 = PyTorch's default init"})
    depth_prior: float = field(default=0.5, metadata={"help": "initial depth output; 0 = PyTorch's default init"})
    w_ssim: float = field(default=LossWeights.w_ssim, metadata={"help": "loss weight of 1 - SSIM, per head"})
    w_l1: float = field(default=LossWeights.w_l1, metadata={"help": "loss weight of L1, per head"})
    w_edge: float = field(default=LossWeights.w_edge, metadata={"help": "loss weight of the Sobel edge term, per head"})
    w_bce: float = field(default=LossWeights.w_bce, metadata={"help": "loss weight of BCE (as KL) on the mask head"})
    w_dice: float = field(default=1.0, metadata={"help": "loss weight of soft Dice on the mask head"})
    w_lovasz: float = field(default=1.0, metadata={"help": "loss weight of the Lovász term on the mask head: a convex surrogate of its IoU"})
    mask_image_terms: bool = field(default=False, metadata={"help": "the mask head also gets the SSIM, L1 and edge terms"})
    ema: float = field(default=0.0, metadata={"help": "decay of an average of the weights (e.g. 0.995) a step at a global batch of "
                                                       "--lr-batch (d^(batch/lr-batch) at another); validated, and best.pt's weights; 0 = off"})
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm across ranks (BatchNorm statistics of the global batch)"})
    aug_shared: bool = field(default=True, metadata={"help": "photometric augmentation drawn once per sample for bg and fg_bg"})
    loader: str = field(default="dali", metadata={"help": "dali, torch, or synthetic (random tensors: the model alone)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda or cpu"})
    workers: int = field(default=0, metadata={"help": "loader threads (dali) or processes (torch) per rank; 0 = the CPUs this process may use / the ranks on its node"})
    hw_decoder_load: float = field(default=-1.0, metadata={"help": "dali on a GPU: share of JPEGs for the hardware decoder; -1 = the loader's default (0.9)"})
    cache_dir: str = field(default="", metadata={"help": CACHE_DIR_HELP})
    cache_limit: str = field(default="", metadata={"help": CACHE_LIMIT_HELP})
    augment: bool = field(default=True, metadata={"help": "training augmentation as --aug-ops says (--no-augment: none, whatever it says)"})
    # None by default: at 16k samples every op cost mask IoU and depth rms, on the val split, on
    # held-out scenes and on real photos alike (BENCHMARKS.md, "A better model from the same samples").
    aug_ops: str = field(default="", metadata={"help": "the augmentation ops used, comma-separated, of " + ", ".join(OPS)
                                                       + " (the reference's: all of them); empty = none"})
    rotate_interp: str = field(default="linear", metadata={"help": "rotation of bg and fg_bg: linear or nearest"})
    precision: str = field(default="auto", metadata={"help": "auto: bf16 autocast where it is measured faster than float32 "
                                                          "for this model, resolution and batch on this machine (native bf16 on "
                                                          "GPUs; a few timed steps on a CPU, cached), else float32; bf16 or float32 force it"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format (faster convolutions on GPUs and CPUs)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (on GPUs; on the CPU it was slower)"})
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
    trace_samples: str = field(default="", metadata={"help": "append one JSON line per training step and rank to this file: "
                                                              "epoch, step, rank, world_size and the keys of the samples trained on"})

    def __post_init__(self):
        # A number from older settings.json files, or lists from any JSON: tuples of ints.
        for name, kind in PER_STAGE.items():
            value = getattr(self, name)
            setattr(self, name, tuple(kind(v) for v in value) if isinstance(value, (list, tuple)) else (kind(value),))

    def augmentation(self) -> Augment:
        """The training augmentation: --aug-ops of the reference's ops at the reference's values."""
        ops = tuple(op for op in self.aug_ops.replace(" ", "").split(",") if op)
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise TrainingError(f"--aug-ops {self.aug_ops}: no op {', '.join(unknown)}; choose from {', '.join(OPS)}.")
        return Augment(rotate_interp=self.rotate_interp, shared=self.aug_shared).only(*ops) if self.augment else Augment.off()

    def on_gpu(self) -> bool:
        return self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())

    def stages(self, train_samples: int = 0, world_size: int = 1) -> list["Stage"]:
        """One Stage per --res, each with its epochs and batch size (see default_batch: on a GPU it
        depends on the training split's samples and the ranks); one sentence if they do not fit."""
        n = len(self.res)
        for name in ("epochs", "batch_size", "lr"):
            if len(getattr(self, name)) not in (1, n):
                raise TrainingError(f"--{name.replace('_', '-')} {_shown(getattr(self, name))} gives "
                                    f"{len(getattr(self, name))} values for {n} stages of --res; give one, or one per stage.")
        for r in self.res:  # here, before settings.json is written, not at the loader
            check_res(r)
        if len(set(self.res)) < n:
            raise TrainingError(f"--res {_shown(self.res)} repeats a resolution; each stage needs its own.")
        if not all(self.epochs):
            raise TrainingError(f"--epochs {_shown(self.epochs)}: every stage needs more than 0 epochs.")
        per = lambda values, i: values[i if len(values) > 1 else 0]  # noqa: E731
        return [Stage(i, r, per(self.epochs, i), per(self.batch_size, i)
                      or default_batch(r, self.on_gpu(), per(self.epochs, i) * train_samples, world_size), per(self.lr, i), n)
                for i, r in enumerate(self.res)]


@dataclass(frozen=True)
class Stage:
    """One resolution of a run: a schedule of its own that starts from the previous stage's best."""

    index: int
    res: int
    epochs: float
    batch: int
    lr: float  # the peak at --lr-batch
    count: int  # stages in the run

    def steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the stage, what its schedule spans."""
        return max(1, round(self.epochs * steps_per_epoch))

    def epoch_length(self, epoch: int, steps_per_epoch: int) -> int:
        """Steps of epoch `epoch` (0-based): all of them but in the last of fractional --epochs."""
        return min(steps_per_epoch, self.steps(steps_per_epoch) - epoch * steps_per_epoch)

    @property
    def epoch_count(self) -> int:
        return math.ceil(self.epochs)

    @property
    def best(self) -> str:
        """best.pt holds the best of the latest stage; a run of several also keeps each stage's."""
        return f"best_{self.res}px.pt"


# What --recipe sets, unless given on the command line. "fast" is the dataclass defaults above.
RECIPES = {
    "fast": {},
    "diff": {"model": "diff", "lr": (2e-3,), "lr_max": 0.0, "w_lovasz": 0.0, "aug_ops": ",".join(OPS)},
    "reference": {"model": "reference", "optimizer": "adam", "lr": (1e-3,), "lr_scaling": "none", "schedule": "step", "warmup": 0.0,
                  "dropout": 0.2, "mask_prior": 0.0, "depth_prior": 0.0, "w_dice": 0.0, "w_lovasz": 0.0, "mask_image_terms": True,
                  "sync_bn": False, "aug_shared": False, "aug_ops": ",".join(OPS), "ema": 0.0, "lr_max": 0.0},
}
CHOICES = {"recipe": tuple(RECIPES), "precision": MODES, "model": tuple(MODELS), "optimizer": ("adamw", "adam"),
           "lr_scaling": ("sqrt", "linear", "none"),
           "schedule": ("cosine", "step"), "compile_mode": ("default", "reduce-overhead", "max-autotune")}
# What a resumed run may change; everything else must be as the run was started.
RESUMABLE_CHANGES = {"epochs", "precision", "batch_size", "max_steps", "ckpt_every", "log_every", "workers", "device", "vis_samples",
                     "compile", "compile_mode", "shards", "loader", "resume", "out", "hw_decoder_load", "cache_dir", "cache_limit",
                     "trace_samples"}


def get_args_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """One flag per TrainSettings field, --no-X for booleans, each help ending in its default.
    only_given: no defaults, so parsing returns just the flags on the command line."""
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Not a setting (absent unless given): the file whose settings the others default to.
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                   help="start a new run from a run's settings.json; flags given override it (default: none)")
    for f in fields(TrainSettings):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        shown = argparse.SUPPRESS if only_given else default
        if f.name == "resume":  # --resume alone means "must"
            p.add_argument(flag, nargs="?", const="must", choices=("must", "auto"), default=shown,
                           help=f"{f.metadata['help']} (default: no)")
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=shown, help=f.metadata["help"])
        elif f.name in PER_STAGE:
            p.add_argument(flag, type=per_stage(PER_STAGE[f.name]), default=shown, help=f"{f.metadata['help']} (default: {_shown(default)})")
        else:
            p.add_argument(flag, type=type(default), default=shown, choices=CHOICES.get(f.name),
                           help=f"{f.metadata['help']} (default: {default})")
    return p


# What a run's saved settings mean where they predate a setting whose default has changed since:
# a run from before --aug-ops trained with every op, one from before --w-lovasz without the term,
# and each goes on (or is copied) that way.
BEFORE_THEY_WERE_SAVED = {"aug_ops": ",".join(OPS), "w_lovasz": 0.0}

# Flags of earlier versions, said in today's words.
RENAMED_FLAGS = {"--bf16": ["--precision", "auto"], "--no-bf16": ["--precision", "float32"]}


def settings_from(argv: list[str] | None) -> TrainSettings:
    """The command line's settings over --config's (if given), the recipe filling the rest; with
    --resume, the run's own, changed only where allowed."""
    argv = [word for arg in (sys.argv[1:] if argv is None else argv) for word in RENAMED_FLAGS.get(arg, [arg])]
    given = vars(get_args_parser(only_given=True).parse_args(argv))
    config = read_config(given.pop("config", None))
    parsed = vars(get_args_parser().parse_args(argv))
    parsed.pop("config", None)
    s = TrainSettings(**{**parsed, **{k: v for k, v in config.items() if k not in given}})
    # The recipe fills what neither the flags nor the file say; a --recipe given fills as without a file.
    said = given if "recipe" in given else {**config, **given}
    s = replace(s, **{k: v for k, v in RECIPES[s.recipe].items() if k not in said})
    s.augmentation()  # an unknown --aug-ops op: one sentence before anything starts
    last = Path(s.out) / "last.pt"
    if not s.resume or not last.is_file():
        return s
    known = {f.name for f in fields(TrainSettings)}
    saved = TrainSettings(**{**BEFORE_THEY_WERE_SAVED, **{k: v for k, v in checkpoint.load(last)["settings"].items() if k in known}})
    differ = [k for k, v in given.items() if k not in RESUMABLE_CHANGES and getattr(saved, k, None) != getattr(s, k)]
    if differ:
        k = differ[0]
        raise TrainingError(f"--resume continues {s.out} with its own settings, but --{k.replace('_', '-')} "
                            f"{_shown(getattr(s, k))} differs from the run's {_shown(getattr(saved, k, None))}; "
                            f"drop it or start a new --out.")
    return replace(saved, **{k: getattr(s, k) for k in given if k in RESUMABLE_CHANGES})


def read_config(path: str | None) -> dict:
    """The settings a --config file holds (a run's settings.json), for a new run: its --resume is
    not carried over, and keys of other versions' settings are left out."""
    if not path:
        return {}
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"--config {path}: cannot read it as a run's settings.json ({e}).") from None
    if not isinstance(saved, dict):
        raise TrainingError(f"--config {path}: a run's settings.json holds one JSON object, not {type(saved).__name__}.")
    known = {f.name for f in fields(TrainSettings)} - {"resume"}
    return {**BEFORE_THEY_WERE_SAVED, **{k: v for k, v in saved.items() if k in known}}


def _shown(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)
