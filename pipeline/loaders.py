"""One entry point for both loaders (the epoch arithmetic they share is in pipeline.epoch).

    from pipeline.loaders import build_loader
    loader = build_loader("shards/", split="train", res=224, batch_size=64, loader="dali",
                          device="cpu", train=True, augment=Augment(), rank=0, world_size=1, seed=0)
    for batch in loader:  # len(loader) batches, the same on every rank
        batch["bg"], batch["fg_bg"]    # float B×3×H×W in [0, 1], on `device`
        batch["mask"], batch["depth"]  # float B×1×H×W in [0, 1]
        batch["valid"]                 # bool B: False only for validation's padding samples
        batch["keys"]                  # list of B sample keys (<key> of <key>.fg_bg.jpg)

Both loaders read in pipeline.epoch's order (a function of seed and epoch, dealt to the ranks a
global batch at a time): training, every rank yields floor(N / (w · batch_size)) full batches an
epoch (the tail is dropped, so DDP never waits on a rank that ran out), and the order changes
every epoch; `start` resumes it at a sample position, on any number of ranks. Validation: no
shuffle and no augmentation; every sample exactly once over all ranks, in
ceil(max part / batch_size) batches on every rank, the last ones padded with repeats marked
valid = False.

s3:// shards go through the node's shard cache (pipeline.cache) unless cache_dir is "off" (then
a ranged GET a sample): a prefetch thread fetches the order's groups of shards ahead of the
reader (pipeline.stream), once per node, so training starts with the first groups cached; a set
larger than the budget streams through it.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from pipeline import store
from pipeline.augment import Augment
from pipeline.epoch import Deal, Plan, check_res, order_for, plan  # noqa: F401 (re-exported)
from pipeline.manifest import LoaderError, ManifestError  # noqa: F401 (re-exported)
from pipeline.reader import SampleReader
from pipeline.workers import cpu_share, node_processes

LOADERS = ("dali", "torch")  # and "synthetic": random tensors, to time the model alone


def build_loader(shards: str | os.PathLike, split: str = "train", res: int = 224, batch_size: int = 64,
                 loader: str = "dali", device: str = "cpu", train: bool | None = None, augment: Augment | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int | None = None,
                 hw_decoder_load: float | None = None, state=None, cache_dir: str | None = None,
                 cache_limit: str | int | None = None, start: tuple[int, int] = (0, 0), order: dict | None = None):
    """An iterable of batch dicts with len() = batches per epoch; see the module docstring.
    `train` defaults to split == "train"; `augment` to the reference settings when training;
    `workers` is CPU threads (dali) or processes (torch) for this rank; `hw_decoder_load`: the
    share of JPEGs DALI's GPU decoder gives the hardware decoder (None: our default).
    `start` = (epoch, samples of it already trained): the first epoch the loader gives and where
    in its order it starts (a resumed run's position, on any number of ranks); `order`: the
    saved `loader.deal.order.params` of the run being resumed; `state`: a DALI loader's state()
    from a checkpoint of the same ranks (and start), to go on with its random draws too.
    `cache_dir`, `cache_limit`: the shard cache for s3:// shards (None or "": the default folder
    and budget, see pipeline.cache; cache_dir "off": none; a limit is bytes or a size such as
    "20GB")."""
    train = split == "train" if train is None else train
    augment = (augment or Augment()) if train else Augment.off()
    check_res(res)
    if loader == "synthetic":
        return SyntheticLoader(res, batch_size, device)
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)} or synthetic")
    if cache_limit:
        from pipeline.cache import parse_size

        parse_size(cache_limit)  # a bad size is said before anything is read
    p = plan(shards, split, batch_size, rank, world_size, train)
    workers = workers or cpu_share()
    deal, reader, window = reading(p, loader, workers, cache_dir, cache_limit, seed, start, order)
    if loader == "dali":
        from pipeline.dali_pipeline import DaliLoader

        return DaliLoader(deal, reader, res, augment, device, seed, workers, state=state, window=window,
                          **({} if hw_decoder_load is None else {"hw_decoder_load": hw_decoder_load}))
    from pipeline.torch_loader import TorchLoader

    return TorchLoader(deal, reader, res, augment, device, seed, workers, window=window)


def reading(p: Plan, loader: str, workers: int, cache_dir, cache_limit, seed: int, start, order: dict | None):
    """(deal, reader, window or None): the rank's order, and where its samples are read: the
    plan's files (a folder, or s3:// with the cache off: a ranged GET a sample), or the node's
    cache, which a pipeline.stream.Window fills ahead of the reader. When the set does not fit
    the cache's budget, the order's groups are cut by bytes to fit it (kept by a resumed run)."""
    from pipeline.cache import CacheError, localize, mb

    cache = localize(p.shards, cache_dir, cache_limit)
    if cache is None:
        deal = Deal(p, order_for(p, seed, order), start)
        return deal, SampleReader(p.tars, p.indexes, p.shards), None
    from pipeline import stream
    from pipeline.fetch import ShardSet

    shards = _shards(p)
    # The node's ranks read the same training groups (one window for them all), and each its own
    # part of the validation split beside it.
    procs, beside = node_processes(), _validation_window(p) if p.train else 0
    share = cache.limit - procs * beside
    if order is None and p.train and not cache.fits(p.set_bytes):
        # Groups of at least the batches a reader deals ahead of the one trained on (torch: its workers').
        least = p.batch_size * (2 * workers + 1 if loader == "torch" else 1)
        group = stream.budget(shards, share, least)
        if group is None:
            need = stream.window_bytes(shards, least) + procs * beside
            raise CacheError(f"--cache-limit {mb(cache.limit)} is too small to stream these shards: with {procs} "
                             f"process(es) on this node the shards in flight need at least {mb(need)}; raise it, or "
                             f"lower --batch-size.")
        order = {"group_bytes": group, "min_samples": least}
    deal = Deal(p, order_for(p, seed, order), start)
    window = stream.Window(deal, ShardSet(cache, p.shards, shards), shards, share)
    n = len(shards)
    # Opened per read: a shard the cache evicts frees its disk at once.
    return deal, SampleReader([window.tar(k) for k in range(n)], [window.index(k) for k in range(n)], p.shards,
                              keep_open=0), window


def _validation_window(p: Plan) -> int:
    """The bytes the validation split's window may pin beside a training loader's."""
    from pipeline import stream

    try:
        v = plan(p.shards, "val", p.batch_size, p.rank, p.world_size, train=False)
    except ManifestError:  # no validation split: nothing to keep room for
        return 0
    return stream.window_bytes(_shards(v), 1)


def _shards(p: Plan) -> list:
    from pipeline.cache import Shard

    return [Shard(e["tar"], e["index"], e["bytes"], e["index_bytes"], e["sha256"], e["samples"]) for e in p.entries]


class SyntheticLoader:
    """The batch contract filled with random tensors made once on the device, `batches` a
    pass: what the trainer does when loading costs nothing, to time the model alone."""

    def __init__(self, res: int, batch_size: int, device: str, batches: int = 50):
        g = torch.Generator().manual_seed(0)
        shapes = {"bg": 3, "fg_bg": 3, "mask": 1, "depth": 1}
        self.batch = {k: torch.rand(batch_size, c, res, res, generator=g).to(device) for k, c in shapes.items()}
        self.batch["valid"] = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.batches = batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            yield self.batch


def available_loaders() -> list[str]:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return ["torch"]
    return list(LOADERS)
