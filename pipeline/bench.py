"""Loader throughput: samples/s and images/s (4 images a sample) after warm-up.

    depthcli bench --shards shards/ --loader all --device cpu --res 224

Times whole batches as the trainer receives them (on the device, in the contract), with the full
training augmentation unless --no-augment; several loaders run one after the other in the same
process so their ratio compares like with like.
"""

from __future__ import annotations

import itertools
import time

import torch

from pipeline.augment import Augment
from pipeline.loaders import build_loader


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # timing only after the device is done


def bench_loader(shards: str, loader: str, device: str = "cpu", res: int = 224, batch_size: int = 64,
                 batches: int = 50, warmup: int = 5, workers: int | None = None, augment: bool = True,
                 rotate_interp: str = "linear", hw_decoder_load: float | None = None, cache_dir: str | None = None,
                 cache_limit: str | int | None = None) -> dict:
    aug = Augment(rotate_interp=rotate_interp) if augment else Augment.off()
    it = build_loader(shards, split="train", res=res, batch_size=batch_size, loader=loader, device=device,
                      augment=aug, workers=workers, hw_decoder_load=hw_decoder_load if loader == "dali" else None,
                      cache_dir=cache_dir, cache_limit=cache_limit)
    stream = itertools.chain.from_iterable(iter(it) for _ in itertools.count())  # epochs back to back
    for _ in range(warmup):
        next(stream)
    _sync(device)
    t0 = time.perf_counter()
    checksum = 0.0
    for _ in range(batches):
        b = next(stream)
        checksum += float(b["mask"][0, 0, 0, 0])  # touch the data, as a consumer would
    _sync(device)
    seconds = time.perf_counter() - t0
    n = batches * batch_size
    return {"loader": loader, "device": device, "res": res, "batch_size": batch_size, "batches": batches,
            "augment": augment, "rotate_interp": rotate_interp, "seconds": round(seconds, 3), "samples_per_s": round(n / seconds, 1),
            "images_per_s": round(4 * n / seconds, 1), "hw_decoder_load": hw_decoder_load,
            **gpu_memory(device)}


def gpu_memory(device: str) -> dict:
    """torch's peak allocation and, beside it, the device memory torch does not hold: DALI's pool
    and nvJPEG's buffers (and the CUDA context); {} on the CPU."""
    if not device.startswith("cuda"):
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"gpu_peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3),
            "gpu_other_gb": round((total - free - torch.cuda.memory_reserved(device)) / 1e9, 3)}
