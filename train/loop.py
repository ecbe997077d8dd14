"""The training loop of one stage: an epoch of steps, and validation after it.

    with StopRequest() as stop:
        outcome = train_one_epoch(run, model, train_loader, writer, stop)   # "done", "stopped", "max_steps"
        validate(run, val_loader, writer)
"""

from __future__ import annotations

import json
import os
import signal
import time
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.bench import gpu_memory
from train.dist import all_reduce_sum, print0
from train.evaluate import evaluate, model_input
from train.losses import total_loss
from train.metrics import format_table
from train.run import Run
from train.visualize import save_grid


class NonFiniteLoss(Exception):
    pass


class SampleTrace:
    """--trace-samples: one JSON line per step and rank, appended to one file that every rank
    writes: each line is one write() of a file opened O_APPEND, so lines never interleave (on a
    local or POSIX file system; NFS does not promise it)."""

    def __init__(self, path: str, ctx):
        self.rank, self.world = ctx.rank, ctx.world_size
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._close = weakref.finalize(self, os.close, self.fd)

    def write(self, epoch: int, step: int, keys: list[str]) -> None:
        line = {"epoch": epoch, "step": step, "rank": self.rank, "world_size": self.world, "keys": keys}
        os.write(self.fd, (json.dumps(line) + "\n").encode())


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


@contextmanager
def _batches(loader, skip: int, length: int):
    """The loader's batches from the epoch's position on (none when the epoch's last step was
    saved: SIGTERM, --max-steps), closed on the way out: an epoch left early (fractional
    --epochs, a stop) ends its DataLoader workers here, not whenever garbage is collected."""
    batches = iter(loader) if skip < length else iter(())
    try:
        yield batches
    finally:
        getattr(batches, "close", lambda: None)()


def train_one_epoch(run: Run, model, loader, writer, stop: StopRequest) -> str:
    """Returns "done", "stopped" (SIGTERM) or "max_steps". Every --log-every steps the ranks sum
    their losses, non-finite counts and stop flags in one all_reduce, so they decide together.
    Resumed mid-epoch, the loader starts at the run's position (run.epoch_samples) and gives the
    epoch's remaining steps."""
    s, ctx = run.s, run.ctx
    model.train()
    skip = run.epoch_step
    length = run.stage.epoch_length(run.epoch, len(loader))  # the last of fractional --epochs is shorter
    stage = f"{run.stage.res}px, " if run.stage.count > 1 else ""
    bar = tqdm(total=max(0, length - skip), desc=f"{stage}epoch {run.epoch + 1}/{run.stage.epochs:g}", unit="step",
               disable=not ctx.main, dynamic_ncols=True)
    sums = torch.zeros(4, device=ctx.device)  # loss, mask loss, depth loss, non-finite count
    t0, n = time.perf_counter(), 0
    trace = SampleTrace(s.trace_samples, ctx) if s.trace_samples else None
    with _batches(loader, skip, length) as batches:
        for i, batch in enumerate(batches, skip):
            with run.precision.autocast():
                mask_pred, depth_pred = model(run.precision.input(model_input(batch)))
            loss, parts = total_loss(mask_pred, depth_pred, batch["mask"], batch["depth"], run.weights)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            run.scheduler.step()
            run.stepped()
            if trace:
                trace.write(run.epoch, run.step, batch["keys"])
            n += 1
            sums += torch.stack([loss.detach(), parts["mask"], parts["depth"], (~torch.isfinite(loss.detach())).float()])
            bar.update()
            end = i == length - 1
            at_max = bool(s.max_steps) and run.step >= s.max_steps and not end  # at the end: after validation
            if run.step % s.log_every and not end and not at_max:
                continue
            agreed = all_reduce_sum(torch.cat([sums, torch.tensor([float(stop.requested)], device=ctx.device)]))
            if agreed[3] > 0:  # a CPU-GPU sync point, once per --log-every steps
                raise NonFiniteLoss
            rate = n * run.stage.batch * ctx.world_size / (time.perf_counter() - t0)
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
            if end:
                break
    bar.close()
    return "done"


def validate(run: Run, loader, writer) -> None:
    """Every rank evaluates rank 0's model (the one saved: with --ema, the average): DDP syncs
    BatchNorm's running stats only at the start of a forward, so after the last step each rank's
    differ a little."""
    if dist.is_initialized():
        for buffer in run.raw.buffers():
            dist.broadcast(buffer, 0)
    if run.ema:
        run.ema.copy_buffers(run.raw)
    metrics, kept = evaluate(run.scored, loader, run.ctx.device, run.weights, run.precision,
                             keep=run.s.vis_samples, progress=run.ctx.main)
    run.validated(metrics)
    run.log({"kind": "val", **{k.replace("/", "_"): v for k, v in metrics.items()}}, writer)
    stage = f" at {run.stage.res}px" if run.stage.count > 1 else ""
    print0(run.ctx, f"validation after epoch {run.epoch + 1}{stage}: loss {metrics['loss']:.4f}\n{format_table(metrics)}")
    if run.ctx.main and kept:
        name = f"{run.stage.res}px_epoch_{run.epoch + 1:03d}.png" if run.stage.count > 1 else f"epoch_{run.epoch + 1:03d}.png"
        save_grid(run.out / "vis" / name, kept, title=f"res {run.stage.res}, step {run.step}")

