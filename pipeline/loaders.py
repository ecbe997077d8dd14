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
"""

from __future__ import annotations

import os

import torch

from pipeline.augment import Augment
from pipeline.epoch import Plan, plan  # noqa: F401 (re-exported)
from pipeline.manifest import LoaderError, ManifestError  # noqa: F401 (re-exported)

LOADERS = ("dali", "torch")  # and "synthetic": random tensors, to time the model alone


def build_loader(shards: str | os.PathLike, split: str = "train", res: int = 224, batch_size: int = 64,
                 loader: str = "dali", device: str = "cpu", train: bool | None = None, augment: Augment | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int | None = None,
                 hw_decoder_load: float | None = None, state=None):
    """An iterable of batch dicts with len() = batches per epoch; see the module docstring.
    `train` defaults to split == "train"; `augment` to the reference settings when training;
    `workers` is CPU threads (dali) or processes (torch) for this rank; `hw_decoder_load`: the
    share of JPEGs DALI's GPU decoder gives the hardware decoder (None: our default). `state`: a
    DALI loader's state() from a checkpoint; the loader goes on with exactly the batches it would
    have given."""
    train = split == "train" if train is None else train
    augment = (augment or Augment()) if train else Augment.off()
    if res % 4 or res < 16:
        raise ValueError(f"--res must be a multiple of 4 and at least 16, got {res}")
    if loader == "synthetic":
        return SyntheticLoader(res, batch_size, device)
    p = plan(shards, split, batch_size, rank, world_size, train)
    workers = workers or max(1, (os.cpu_count() or 1) // world_size)
    if loader == "dali":
        from pipeline.dali_pipeline import DaliLoader

        return DaliLoader(p, res, augment, device, seed, workers, state=state,
                          **({} if hw_decoder_load is None else {"hw_decoder_load": hw_decoder_load}))
    if loader == "torch":
        from pipeline.torch_loader import TorchLoader

        return TorchLoader(p, res, augment, device, seed, workers)
    raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)} or synthetic")


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
