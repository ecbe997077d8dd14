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

from pipeline.epoch import derive_seed
from pipeline.errors import DepthsegError
from pipeline.loaders import build_loader
from pipeline.manifest import LoaderError, read_manifest, split_shards
from pipeline.workers import cpu_share
from train import checkpoint, precision
from train.dist import DistContext, barrier, cleanup, print0, setup
from train.loop import NonFiniteLoss, StopRequest, train_one_epoch, validate
from train.run import Run, order_params, resume_position, saved_loader_state
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


def same_order(ctx: DistContext, loader) -> None:
    """Every rank must read one order: a node whose shard cache's budget is smaller than the set
    cuts its groups by bytes (pipeline.stream), and would deal other samples than the rest."""
    if ctx.world_size == 1:
        return
    params = [None] * ctx.world_size
    dist.all_gather_object(params, order_params(loader))
    if any(p != params[0] for p in params):
        raise TrainingError(f"the ranks would read different orders of the samples ({params[0]} on rank 0, "
                            f"{next(p for p in params if p != params[0])} elsewhere): give every node the same "
                            f"--cache-limit, large enough for the set or not.")


def first_stage(resumed: dict | None, stages: list[Stage]) -> tuple[int, int]:
    """(the stage to start in, the run's step there): a checkpoint saved at its stage's end goes
    on with the next stage."""
    if resumed is None:
        return 0, 0
    first = min(resumed.get("stage", 0), len(stages) - 1)
    if resumed["epoch"] >= stages[first].epoch_count and first + 1 < len(stages):
        first += 1
    return first, resumed["step"]


def loaders(s: TrainSettings, ctx: DistContext, stage: Stage, resumed: dict | None, state):
    """(train loader, validation loader, whether the train loader goes on from `state`). Both
    loaders start at the checkpoint's position in samples, in the run's order (any ranks); a
    DALI state saved on the same ranks brings its random draws too."""
    workers = s.workers or cpu_share()
    common = {"res": stage.res, "batch_size": stage.batch, "loader": s.loader, "device": str(ctx.device),
              "rank": ctx.rank, "world_size": ctx.world_size, "workers": workers, "cache_dir": s.cache_dir, "cache_limit": s.cache_limit}
    if s.loader == "dali" and s.hw_decoder_load >= 0:
        common["hw_decoder_load"] = s.hw_decoder_load
    exact = state is not None
    start = tuple(state["first"]) if exact else resume_position(resumed)
    try:
        train = build_loader(s.shards, split="train", augment=s.augmentation(), seed=s.seed, start=start,
                             order=(resumed or {}).get("order"), **({"state": state} if exact else {}), **common)
    except LoaderError as e:  # a state DALI cannot restore into this graph: go on, its draws anew
        if not exact:
            raise
        print0(ctx, f"the loader's saved state could not be restored ({e}); its random draws are drawn anew")
        return loaders(s, ctx, stage, resumed, None)
    same_order(ctx, train)
    # Validation decodes and resizes only, between epochs: a few threads, not a second set of all cores.
    val = build_loader(s.shards, split="val", seed=s.seed, **{**common, "workers": max(1, workers // 4)})
    return train, val, exact


def train_samples(shards: str) -> int:
    """The training split's samples, from the manifest: what sizes a GPU's default batch."""
    return sum(e["samples"] for e in split_shards(read_manifest(shards), "train"))


def train(s: TrainSettings, ctx: DistContext) -> int:
    torch.manual_seed(derive_seed("trainer", s.seed, ctx.rank))
    if ctx.device.type == "cpu":
        torch.set_num_threads(cpu_share())  # the node's ranks share its cores
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if s.sync_bn and ctx.device.type != "cuda":
        raise TrainingError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA tensors only; drop it on the CPU.")
    stages, out = s.stages(train_samples(s.shards) if s.on_gpu() else 0, ctx.world_size), Path(s.out)
    resumed = resume_point(s, out)
    first, step = first_stage(resumed, stages)
    same_start(ctx, s, step)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(asdict(s), indent=1) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb")) if ctx.main else None
    try:
        with StopRequest() as stop:
            for stage in stages[first:]:
                inside = resumed if resumed is not None and resumed.get("stage", 0) == stage.index else None
                run, code = train_stage(s, ctx, stages, stage, inside, step, writer, stop)
                step = run.step
                if code is not None:
                    return code
    finally:
        if writer:
            writer.close()
    print0(ctx, f"done: {step} steps, best validation loss {run.best_loss:.4f}, checkpoints in {out}")
    return 0


def train_stage(s: TrainSettings, ctx: DistContext, stages: list[Stage], stage: Stage, resumed: dict | None,
                step: int, writer, stop: StopRequest) -> tuple[Run, int | None]:
    """One stage, built in order (precision, loaders, Run, its start), then its epochs, each
    validated and saved. Returns the Run and an exit code when the run must stop here (SIGTERM,
    --max-steps, a non-finite loss), else None."""
    chosen = precision.choose(ctx.device, s.precision, s.channels_last, precision.Probe(s.model, stage.res, stage.batch))
    state, dropped = saved_loader_state(resumed, s, ctx, stage)
    train_loader, val_loader, exact = loaders(s, ctx, stage, resumed, state)
    run = Run(s, stage, ctx, chosen, train_loader)
    if resumed is not None:
        run.restore(resumed)
        say_resumed(run, exact, dropped, writer)
    elif stage.index > 0:
        barrier()  # rank 0 writes the previous stage's best after the other ranks are done with it
        run.begin(step, run.out / stages[stage.index - 1].best, "the previous stage's best")
    else:
        run.begin(step, s.init or None, "--init")
    model = run.wrap()
    print0(ctx, f"training {s.model} at {stage.res}px" + (f" (stage {stage.index + 1} of {stage.count})" if stage.count > 1 else "")
                + f": {ctx.world_size} rank(s) on {ctx.device.type} in {run.precision} ({run.precision.why}), batch {stage.batch} per rank, "
                  f"{len(train_loader)} steps per epoch, loader {s.loader}")
    try:
        while run.epoch < stage.epoch_count:
            outcome = train_one_epoch(run, model, train_loader, writer, stop)
            if outcome != "done":
                print0(ctx, f"{'SIGTERM' if outcome == 'stopped' else '--max-steps'}: saved {run.out / 'last.pt'} at step {run.step}")
                return run, 0
            validate(run, val_loader, writer)
            run.end_epoch()
            if s.max_steps and run.step >= s.max_steps:
                print0(ctx, f"--max-steps: saved {run.out / 'last.pt'} at step {run.step}")
                return run, 0
    except NonFiniteLoss:
        kept = f"the last good checkpoint is {run.out / 'last.pt'} (step {run.last_saved})" if run.last_saved else "no checkpoint was written yet"
        print0(ctx, f"error: the loss became non-finite before step {run.step}; stopped, {kept}.", file=sys.stderr)
        return run, 1
    return run, None


def say_resumed(run: Run, exact: bool, dropped: str, writer) -> None:
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    print0(run.ctx, f"resuming {run.out / 'last.pt'} at step {run.step} ({run.stage.res}px, epoch {run.epoch + 1}, "
                    f"step {run.epoch_step} of it)" + (f", torchrun restart {restart}" if restart else "")
                    + f", at sample {run.epoch_samples} of the epoch's order"
                    + (", the loader's random draws as they were" if exact else "")
                    + (f"; {dropped}" if dropped else ""))
    # exact: the samples, batches and draws of the uninterrupted run (the same ranks; DALI with its state).
    same = (run.ctx.world_size, run.stage.batch) == (run.resumed_world[0], run.resumed_world[1])
    run.log({"kind": "resume", "from_step": run.resumed_from, "exact": same and (exact or run.s.loader == "torch"),
             "world_size_before": run.resumed_world[0], "restart": restart}, writer)


def fail(e: Exception, rank: int, world: int) -> int:
    """Every rank says its own error, named by rank in a world of several: one that only rank 0
    told would leave a failing rank 1 silent (torchrun then just reports its exit code)."""
    print(f"error{f' (rank {rank})' if world > 1 else ''}: {e}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        s = settings_from(argv)
        ctx = setup(s.device)
    except (DepthsegError, RuntimeError) as e:  # RuntimeError: the process group could not start
        return fail(e, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    try:
        return train(s, ctx)
    except (DepthsegError, ValueError) as e:
        return fail(e, ctx.rank, ctx.world_size)
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
