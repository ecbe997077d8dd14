"""The worker processes of make-dataset, shard and verify; how the torch loader forks its own;
and how many CPUs this process may use for them (`cpu_share`).

They come from a fork server, not from a fork of the caller. A fork copies the caller: a test run
or a notebook that has held DALI pipelines can have a heap larger than the RAM, and then fork
fails with ENOMEM; and a forked child that collected one of those pipelines waited forever for
threads a fork does not copy. concurrent.futures, not multiprocessing.Pool: Pool.terminate()
after a failed task could hang on its own task-queue lock (about 1 run in 80 on a loaded machine).
"""

from __future__ import annotations

import gc
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from multiprocessing import get_context


def node_processes() -> int:
    """The processes of this run on this node: torchrun's LOCAL_WORLD_SIZE, 1 outside torchrun.
    Per node, not WORLD_SIZE: on 4 nodes x 8 GPUs each rank has 1/8 of its node, not 1/32."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def cpu_share() -> int:
    """This process's share of the CPUs it may run on, at least 1: the one source of every
    threads and workers default. The affinity mask, not os.cpu_count(): a SLURM job, a container
    or taskset gives a process fewer CPUs than the machine has."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cpus = os.cpu_count() or 1
    return max(1, cpus // node_processes())


@contextmanager
def worker_pool(workers: int, preload: str, initializer: Callable | None = None, initargs: tuple = ()):
    """A process pool whose workers start with `preload` (a module name) and, as multiprocessing
    does by default, the caller's main script (behind its `if __name__ == "__main__"`) imported.
    Leaving it early (an error, Ctrl-C) cancels what has not started and waits for what has."""
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", preload])  # the first pool of a process starts the server
    executor = ProcessPoolExecutor(max(1, workers), mp_context=ctx, initializer=_start,
                                   initargs=(dict(os.environ), initializer, initargs))
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _start(environ: dict, initializer: Callable | None, initargs: tuple) -> None:
    """The fork server keeps the environment it started with; a worker takes the caller's as it is
    now (credentials and endpoints set since, as a forked worker would)."""
    os.environ.clear()
    os.environ.update(environ)
    if initializer is not None:
        initializer(*initargs)


def ordered(executor: ProcessPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """fn(item) for each item, in order, with at most `window` in flight: memory stays flat."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def as_done(executor: ProcessPoolExecutor, fn: Callable, items: Iterable) -> Iterator:
    """fn(item) for each item, as each finishes."""
    pending = {executor.submit(fn, item) for item in items}
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            yield future.result()


def forked(loader):
    """Iterate a DataLoader, its workers forked with no garbage left and the heap frozen for their
    collector, so no worker collects a DALI pipeline the parent had dropped (in a reference
    cycle, not yet collected): it would wait forever for threads a fork does not copy (above)."""
    if not loader.num_workers:
        yield from loader
        return
    gc.collect()  # the parent's garbage dies here, where its threads exist
    gc.freeze()
    try:
        batches = iter(loader)  # the workers start here
    finally:
        gc.unfreeze()
    yield from batches
