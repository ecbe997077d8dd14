"""Where DALI's CPU time goes: each op alone on decoded images, then the full training graph
with one augmentation at a time.

    python scripts/profile_dali.py shards/            # needs 224 px shards, e.g. from make-dataset

Prints ms per sample (wall, 2 threads) and samples/s.
"""

import sys
import time
from dataclasses import replace

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from pipeline.augment import Augment
from pipeline.bench import bench_loader
from pipeline.manifest import ROLES


def time_ops(shards: str, res: int = 224, batch: int = 64, runs: int = 15):
    from pipeline.epoch import plan
    p = plan(shards, "train", batch, 0, 1, True)

    def run(name, body):
        @pipeline_def(batch_size=batch, num_threads=2, device_id=None, prefetch_queue_depth=2)
        def pipe():
            raw = fn.readers.webdataset(paths=p.tars, index_paths=p.indexes, ext=[f"{r}.jpg;{r}.png" for r in ROLES],
                                        random_shuffle=True)
            return body([fn.decoders.image(r, output_type=types.RGB if i < 2 else types.GRAY) for i, r in enumerate(raw)])
        pl = pipe()
        pl.build()
        for _ in range(3):
            pl.run()
        t = time.perf_counter()
        for _ in range(runs):
            pl.run()
        ms = (time.perf_counter() - t) / (runs * batch) * 1e3
        print(f"{name:36s} {ms:6.3f} ms/sample {1e3 / ms:8.0f} samples/s", flush=True)

    angle = lambda: fn.random.uniform(range=[-15, 15])  # noqa: E731
    bank = np.clip(np.random.default_rng(0).standard_normal((1024, 1024, 3)) * 5, -127, 127).astype(np.int8)
    window = lambda: fn.crop(types.Constant(bank, layout="HWC"), crop=(res, res),  # noqa: E731
                             crop_pos_x=fn.random.uniform(range=[0, 1]), crop_pos_y=fn.random.uniform(range=[0, 1]))
    run("decode bg (1 image)", lambda d: d[0])
    run("decode all 4", lambda d: tuple(d))
    run("rotate bg, linear", lambda d: fn.rotate(d[0], angle=angle(), fill_value=0, keep_size=True))
    run("rotate bg, nearest", lambda d: fn.rotate(d[0], angle=angle(), fill_value=0, keep_size=True, interp_type=types.INTERP_NN))
    run("resize bg to the same size", lambda d: fn.resize(d[0], size=[res, res], antialias=True))
    run("noise.gaussian bg", lambda d: fn.noise.gaussian(d[0], stddev=5.0))
    run("noise bank window + int add bg", lambda d: fn.cast(dmath.clamp(d[0] + window(), 0, 255), dtype=types.UINT8))
    run("hsv bg", lambda d: fn.hsv(d[0], hue=10.0, saturation=1.1, value=0.9))
    run("rgb shift in crop_mirror_normalize bg", lambda d: fn.crop_mirror_normalize(
        d[0], dtype=types.UINT8, output_layout="HWC", mean=fn.random.uniform(range=[-20, 20], shape=[3]), std=[1.0]))
    run("to float CHW bg", lambda d: fn.crop_mirror_normalize(d[0], dtype=types.FLOAT, output_layout="CHW", mean=[0.], std=[255.]))


def time_graph(shards: str, res: int = 224):
    full = Augment()
    cases = {"decode + resize only": Augment.off(), **{f"+ {op}": full.only(op) for op in
             ("hflip", "vflip", "rotate", "color", "noise", "dropout")}, "full": full,
             "full, nearest rotation": replace(full, rotate_interp="nearest")}
    import pipeline.bench as bench
    real = bench.build_loader
    for name, aug in cases.items():
        bench.build_loader = lambda *a, augment=None, _aug=aug, **k: real(*a, augment=_aug, **k)
        r = bench_loader(shards, "dali", res=res, batches=15, warmup=3)
        print(f"{name:36s} {1e3 / r['samples_per_s']:6.3f} ms/sample {r['samples_per_s']:8.0f} samples/s", flush=True)
    bench.build_loader = real


if __name__ == "__main__":
    time_ops(sys.argv[1])
    time_graph(sys.argv[1])
