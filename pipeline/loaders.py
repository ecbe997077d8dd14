"""One entry point for both loaders (the epoch arithmetic they share is in pipeline.epoch).

    from pipeline.loaders import build_loader
    loader = build_loader("shards/", split="train", res=224, batch_size=64, loader="dali",
                          device="cpu", train=True, augment=Augment(), rank=0, world_size=1, seed=0)
    for batch in loader:  # len(loader) batches, the same on every rank
        batch["bg"], batch["fg_bg"]    # float B×3×H×W in [0, 1], on `device`
        batch["mask"], batch["depth"]  # float B×1×H×W in [0, 1]
        batch["valid"]                 # bool B: False only for validation's padding samples

Rank r of w reads its own part of the samples. Training: every rank yields
floor(N / w / batch_size) full batches an epoch (the tail is dropped, so DDP never waits on a
rank that ran out), and the order changes every epoch. Validation: no shuffle and no
augmentation; every sample exactly once over all ranks, in ceil(max part / batch_size) batches on
every rank, the last ones padded with repeats marked valid = False.

s:// shards go through the node's shard cache (pipeline.cache) unless cache_dir is "off". When
the whole set fits its budget, the common case, its shards are fetched first (once per node, in
the order the rank reads them) and the loaders read the cached files exactly as a folder: the
same batches as from disk. When it does not fit, DALI streams them through the cache within the
budget (pipeline.stream: an order of its own, exact on resume too) and the torch loader streams
each shard from the store with one GET, as without a cache.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from pipeline import store
from pipeline.augment import Augment
from pipeline.epoch import Plan, check_res, plan  # noqa: F401 (re-exported)
from pipeline.manifest import LoaderError, ManifestError  # noqa: F401 (re-exported)
from pipeline.workers import cpu_share, node_processes

LOADERS = ("dali", "torch")  # and "synthetic": random tensors, to time the model alone


def build_loader(shards: str | os.PathLike, split: str = "train", res: int = 224, batch_size: int = 64,
                 loader: str = "dali", device: str = "cpu", train: bool | None = None, augment: Augment | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int | None = None,
                 hw_decoder_load: float | None = None, state=None, cache_dir: str | None = None,
                 cache_limit: str | int | None = None):
    """An iterable of batch dicts with len() = batches per epoch; see the module docstring.
    `train` defaults to split == "train"; `augment` to the reference settings when training;
    `workers` is CPU threads (dali) or processes (torch) for this rank; `hw_decoder_load`: the
    share of JPEGs DALI's GPU decoder gives the hardware decoder (None: our default). `state`: a
    DALI loader's state() from a checkpoint; the loader goes on with exactly the batches it would
    have given. `cache_dir`, `cache_limit`: the shard cache for s3:// shards (None or "": the
    default folder and budget, see pipeline.cache; cache_dir "off": none; a limit is bytes or a
    size such as "20GB")."""
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
    p, source, pin = through_cache(p, loader, cache_dir, cache_limit, seed, state)
    if loader == "dali":
        from pipeline.dali_pipeline import DaliLoader

        it = DaliLoader(p, res, augment, device, seed, workers, state=state, source=source,
                        **({} if hw_decoder_load is None else {"hw_decoder_load": hw_decoder_load}))
    else:
        from pipeline.torch_loader import TorchLoader

        it = TorchLoader(p, res, augment, device, seed, workers)
    it.cache_pin = pin  # the cached shards stay while the loader lives
    return it


def through_cache(p: Plan, loader: str, cache_dir, cache_limit, seed: int, state):
    """(plan, stream source or None, pin or None): the plan on cached files when the set fits the
    cache's budget; for DALI otherwise a source streaming through it; else the plan unchanged.
    A resumed DALI loader keeps the way its state was made, which decides the order."""
    from pipeline.cache import CacheError, localize, mb
    from pipeline.fetch import ShardSet

    streamed, cache = isinstance(state, dict), localize(p.shards, cache_dir, cache_limit)
    if cache is None:
        if streamed:
            raise LoaderError(f"the loader state was saved streaming {p.shards} through the shard cache; resume "
                              f"from the same s3:// prefix with the cache on.")
        return p, None, None
    fits, shards = cache.fits(p.set_bytes), _shards(p)
    sset = ShardSet(cache, p.shards, shards)
    if loader == "torch" and not fits:
        return p, None, None
    if loader == "dali" and (streamed or (state is None and not fits)):
        return p, _stream_source(p, sset, shards, cache.limit, seed, state), None
    if not fits:
        raise CacheError(f"the loader state was saved reading the whole set {p.shards} from the shard cache, which "
                         f"now holds only {mb(cache.limit)} of its {mb(p.set_bytes)}; raise --cache-limit to resume.")
    pin = sset.pin_set()
    sset.fetch_all(_read_order(p, shards, loader))
    return replace(p, tars=[str(sset.tar(s)) for s in shards], indexes=[str(sset.index(s)) for s in shards]), None, pin


def _stream_source(p: Plan, sset, shards: list, limit: int, seed: int, state):
    """DALI's source streaming through the cache, with groups that fit this loader's share of the
    budget: the node's processes share it, and a training loader leaves room for the window of
    the validation loader a trainer streams beside it (validation's order does not depend on it)."""
    from pipeline import stream
    from pipeline.cache import CacheError, mb

    procs = node_processes()
    beside = _validation_window(p) if p.train else 0
    share = limit // procs - beside
    if isinstance(state, dict):  # the grouping decides the order: a resumed loader keeps its own
        group = state["group_bytes"]
    elif p.train:
        group = stream.budget(p, shards, share)
    else:  # validation's order does not depend on it: groups of a batch, the window kept for it
        group = 0
    if group is None or stream.window_bytes(p, shards, group) > share:
        need = (stream.window_bytes(p, shards, group or 0) + beside) * procs
        raise CacheError(f"--cache-limit {mb(limit)} is too small to stream these shards: with {procs} process(es) on "
                         f"this node the shards in flight need at least {mb(need)}; raise it, or lower --batch-size.")
    return stream.StreamSource(p, sset, shards, seed, group)


def _validation_window(p: Plan) -> int:
    """The bytes the validation split's streaming window takes, for the same ranks and batch."""
    from pipeline import stream

    try:
        v = plan(p.shards, "val", p.batch_size, p.rank, p.world_size, train=False)
    except ManifestError:  # no validation split: nothing to keep room for
        return 0
    return stream.window_bytes(v, _shards(v), 0)


def _shards(p: Plan) -> list:
    from pipeline.cache import Shard

    return [Shard(e["tar"], e["index"], e["bytes"], e["index_bytes"], e["sha256"], e["samples"]) for e in p.entries]


def _read_order(p: Plan, shards: list, loader: str) -> list:
    """The split's shards from the one holding the rank's first sample on (DALI opens them all;
    the torch loader reads its part only)."""
    if loader == "torch":
        return [shards[k] for k in p.part_shards]
    first = max(k for k, a in enumerate(p.starts) if a <= p.part[0])
    return shards[first:] + shards[:first]


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
