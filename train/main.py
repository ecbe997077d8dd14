"""The torchrun entry: train the mask + depth model with PyTorch DDP, one stage per --res.

    torchrun --nproc_per_node 2 train/main.py --res 64 --shards shards/ --out runs/r64
    torchrun --nproc_per_node 2 train/main.py --res 64,128,224 --epochs 8,3,2 --out runs/prog

`train/main.py --help` says more (train/settings.py holds every option); train/run.py is one
stage's state, train/loop.py its epochs.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun train/main.py): import the project
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from pipeline.loaders import build_loader
from pipeline.manifest import LoaderError, ManifestError
from pipeline.store import StoreError
from train import checkpoint
from train.dist import DistContext, cleanup, print0, setup
from train.loop import NonFiniteLoss, StopRequest, train_one_epoch, validate
from train.run import Run
from train.settings import Stage, TrainingError, TrainSettings, get_args_parser, settings_from  # noqa: F401 (re-exported)


def resume_point(s: TrainSettings, out: Path) -> dict | None:
    """The checkpoint a --resume continues from (None: a new run); refuse to mix another run's
    logs into --out silently."""
    last = out / "last.pt"
    if s.resume and last.is_file():
        return checkpoint.load(last)
    if s.resume == "must":
        raise TrainingError(f"--resume: there is no {last} to continue from.")
    if last.is_file():
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    return None


def same_start(ctx: DistContext, s: TrainSettings, step: int) -> None:
    """Every rank must continue from the same step: a rank whose --out holds no last.pt (a node
    without the shared file system) would start at 0 and fall out of step with the others."""
    if ctx.world_size == 1 or not s.resume:  # a new run starts at 0 on every rank
        return
    both = torch.tensor([step, -step], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if both[0] != -both[1]:  # max(step) != min(step)
        raise TrainingError(f"the ranks would resume from different steps ({int(-both[1])} to {int(both[0])}): "
                            f"--out {s.out} must be one folder that every node sees (a shared file system).")


def load_weights(run: Run, path: str | Path, what: str) -> None:
    ckpt = checkpoint.load(path)
    if ckpt["model"] != run.s.model:
        raise TrainingError(f"{what} {path} holds a {ckpt['model']!r} model, not {run.s.model!r}.")
    run.raw.load_state_dict(ckpt["state_dict"])
    if run.ema:  # the new stage's average starts from these weights
        run.ema.reset(run.raw)
    print0(run.ctx, f"initialised from {path} (res {ckpt['res']}, step {ckpt['step']})")


def start(run: Run, resumed: dict | None, step: int, stages: list[Stage]) -> None:
    """Where a stage begins: inside it from last.pt (--resume), or fresh at the run's `step`
    from the previous stage's best weights (or --init's, before the first stage)."""
    if resumed is not None and resumed.get("stage", 0) == run.stage.index:
        run.restore(resumed)
        run.resumed_from = run.step
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        print0(run.ctx, f"resuming {run.out / 'last.pt'} at step {run.step} ({run.stage.res}px, epoch {run.epoch + 1}, "
                        f"step {run.epoch_step} of it)" + (f", torchrun restart {restart}" if restart else "")
                        + (", the loader exactly where it was" if run.loader_state is not None else ""))
        return
    run.step = run.last_saved = step
    if run.stage.index > 0:
        if run.ctx.world_size > 1:
            dist.barrier()  # rank 0 writes the previous stage's best after the other ranks are done with it
        load_weights(run, run.out / stages[run.stage.index - 1].best, "the previous stage's best")
    elif run.s.init:
        load_weights(run, run.s.init, "--init")


def loaders(run: Run):
    s, ctx, stage = run.s, run.ctx, run.stage
    workers = s.workers or max(1, (os.cpu_count() or 1) // ctx.world_size)
    aug = s.augmentation()
    common = {"res": stage.res, "batch_size": stage.batch, "loader": s.loader, "device": str(ctx.device),
              "rank": ctx.rank, "world_size": ctx.world_size, "workers": workers, "cache_dir": s.cache_dir, "cache_limit": s.cache_limit}
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
    stages, out = s.stages(), Path(s.out)
    resumed = resume_point(s, out)
    step, first = 0, 0
    if resumed is not None:
        step, first = resumed["step"], min(resumed.get("stage", 0), len(stages) - 1)
        if resumed["epoch"] >= stages[first].epoch_count and first + 1 < len(stages):  # saved at its stage's end
            first += 1
    same_start(ctx, s, step)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(asdict(s), indent=1) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb")) if ctx.main else None
    try:
        with StopRequest() as stop:
            for stage in stages[first:]:
                run = Run(s, stage, ctx)
                start(run, resumed, step, stages)
                code, step = train_stage(run, writer, stop), run.step
                if code is not None:
                    return code
    finally:
        if writer:
            writer.close()
    print0(ctx, f"done: {step} steps, best validation loss {run.best_loss:.4f}, checkpoints in {out}")
    return 0


def train_stage(run: Run, writer, stop: StopRequest) -> int | None:
    """The stage's epochs, each validated, then last.pt and (when it improved) its best; an exit
    code when the run must stop here (SIGTERM, --max-steps, a non-finite loss), else None."""
    s, ctx, stage = run.s, run.ctx, run.stage
    train_loader, val_loader = loaders(run)
    run.train_loader = train_loader
    run.start_schedule(len(train_loader))
    model = run.wrap()
    if run.resumed_from is not None:
        run.log({"kind": "resume", "from_step": run.resumed_from, "exact": run.loader_state is not None,
                 "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))}, writer)
    print0(ctx, f"training {s.model} at {stage.res}px" + (f" (stage {stage.index + 1} of {stage.count})" if stage.count > 1 else "")
                + f": {ctx.world_size} rank(s) on {ctx.device.type} in {run.precision}, batch {stage.batch} per rank, "
                  f"{len(train_loader)} steps per epoch, loader {s.loader}")
    try:
        while run.epoch < stage.epoch_count:
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
                for name in {"best.pt", stage.best if stage.count > 1 else "best.pt"}:
                    checkpoint.copy(run.out / "last.pt", run.out / name)
            if s.max_steps and run.step >= s.max_steps:
                print0(ctx, f"--max-steps: saved {run.out / 'last.pt'} at step {run.step}")
                return 0
    except NonFiniteLoss:
        kept = f"the last good checkpoint is {run.out / 'last.pt'} (step {run.last_saved})" if run.last_saved else "no checkpoint was written yet"
        print0(ctx, f"error: the loss became non-finite before step {run.step}; stopped, {kept}.", file=sys.stderr)
        return 1
    return None


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
