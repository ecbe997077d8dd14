"""The torch loader's own parts: reduced-scale JPEG decode, independent draws, noise pixels under
`shared`, and the batched (GPU) path, run here on the CPU through test_loaders' own checks and
watched for reads from the device (each would be a host-device synchronization on a GPU)."""

import io
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline.torch_loader as tl
import test_loaders as common  # a module import, so pytest does not collect its tests twice
from pipeline.augment import Augment
from pipeline.epoch import plan
from pipeline.loaders import build_loader
from pipeline.manifest import ROLES, LoaderError
from pipeline.reader import SampleReader
from conftest import run_script


def jpeg(size: int, gray: bool = False) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if gray else img).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("res, decoded", [(224, 224), (128, 140), (112, 112), (64, 84), (56, 56), (16, 28)])
def test_jpeg_is_decoded_at_the_smallest_scale_that_covers_res(res, decoded):
    assert tl.decode_jpeg(jpeg(224), False, res).shape == (decoded, decoded, 3)
    assert tl.decode_jpeg(jpeg(224, gray=True), True, res).shape == (decoded, decoded)


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_reduced_decode_matches_a_full_decode_and_resize(gray, fmt):
    img = Image.open(io.BytesIO(jpeg(224, gray)))
    buf = io.BytesIO()
    img.save(buf, fmt, quality=95)
    full = np.asarray(img.resize((64, 64), Image.BOX))
    got = tl.decode_image(buf.getvalue(), gray, 64)
    assert got.shape == full.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - full).mean() < 2.0


@pytest.fixture(params=["workers", "device"])
def where(request, monkeypatch):
    """Run a loader test on both torch paths: albumentations in the workers, and kornia on
    whole batches (the GPU path, here on the CPU)."""
    monkeypatch.setattr(tl, "augment_on_device", lambda device: request.param == "device")
    return request.param


@pytest.fixture
def on_device(monkeypatch):
    """The GPU path (workers decode, kornia augments whole batches) on the CPU."""
    monkeypatch.setattr(tl, "augment_on_device", lambda device: True)


def test_flips_are_drawn_independently(exact_shards, where):
    """P(h and v) = 0.5 × 0.3: albumentations' Compose(seed=) gives every op a generator with the
    same seed, so each vertical flip would also be a horizontal one (P = 0.3)."""
    _, got = common.batches(exact_shards, "torch", epochs=5, augment=Augment().only("hflip", "vflip"))
    draws = np.array([common._flip_and_angle(s)[:2] for s in common.samples(got)])
    n = len(draws)
    for p, seen in ((0.5, draws[:, 0].mean()), (0.3, draws[:, 1].mean()), (0.15, (draws[:, 0] & draws[:, 1]).mean())):
        assert abs(seen - p) < 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("check", ["test_geometry_is_synchronized", "test_rotation_probability_and_range",
                                   "test_batch_contract"])
def test_device_path_passes_the_loader_checks(exact_shards, on_device, check):
    kw = {"split": "train"} if check == "test_batch_contract" else {}
    getattr(common, check)(exact_shards, "torch", **kw)


@pytest.mark.parametrize("shared", [False, True])
def test_device_path_photometric_ops(exact_shards, on_device, shared):
    common.test_photometric_ops_touch_only_bg_and_fg_bg(exact_shards, "torch", shared)


def test_shared_draws_keep_own_noise_pixels(exact_shards, where):
    """Shared: both images noisy or neither, at one σ; but fg_bg − bg outside the object is noise
    of σ·√2, not 0 (the same noise map in both would make it 0)."""
    aug = Augment(noise_p=0.5, shared=True).only("noise")
    _, got = common.batches(exact_shards, "torch", augment=aug)
    noisy = []
    for s in common.samples(got):
        outside = s["mask"][..., 0] == 0
        diff = (s["fg_bg"] - s["bg"])[outside] * 255
        bg_noise = (s["bg"][..., :2] * 255 - np.stack(np.meshgrid(np.arange(64), np.arange(64)), -1) * 2)[outside]
        if np.abs(bg_noise).mean() < 0.5:  # not drawn: neither image has noise
            assert np.abs(diff).max() < 1e-4
        else:
            assert 3 * math.sqrt(2) * 0.7 < diff.std() < 7 * math.sqrt(2) * 1.3
            noisy.append(True)
    assert 8 < len(noisy) < 24  # p = 0.5 of 32


class NoDeviceReads(TorchDispatchMode):
    """Records ops that read a tensor's values back to the host or size a result by its data:
    on a GPU each one waits for the device (.item(), bool(), .any() in an if, boolean indexing)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("aug", [Augment(), Augment(shared=True), Augment(rotate_interp="nearest", dropout_max_holes=3)],
                         ids=["default", "shared", "nearest"])
def test_device_path_never_reads_the_device(aug):
    x, augment = torch.rand(16, 8, 32, 32), tl.DeviceAugment(aug)
    with NoDeviceReads() as mode:
        y = augment(x)
    assert y.shape == x.shape
    assert mode.seen == []


def _as_webdataset(reader: SampleReader, shards: range) -> list[dict]:
    """The reader's samples as webdataset's sample dicts (PNG images)."""
    return [{"__key__": reader.key(k, i), **{f"{r}.png": data for r, data in zip(ROLES, reader.read(k, i))}}
            for k in shards for i in range(len(reader.members(k)))]


def _images(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k == "__key__" or k.split(".")[0] in ROLES}


def test_reading_at_index_offsets_gives_webdatasets_samples(exact_shards):
    """A sample read in one piece at the index's offsets: the key and bytes webdataset's own tar
    reading gives."""
    import webdataset as wds

    p = plan(exact_shards, "val", 4, 0, 1, train=False)
    ours = _as_webdataset(SampleReader(p.tars, p.indexes, str(exact_shards)), range(len(p.tars)))
    theirs = [_images(s) for s in wds.WebDataset(p.tars, shardshuffle=False, empty_check=False)]
    assert len(ours) == p.samples and ours == theirs


def _copy(exact_shards, tmp_path) -> Path:
    shards = tmp_path / "s"
    shutil.copytree(exact_shards, shards)
    return shards


def test_an_index_of_another_tar_is_one_sentence(exact_shards, tmp_path):
    shards = _copy(exact_shards, tmp_path)
    (shards / "val-000000.idx").write_text((shards / "val-000001.idx").read_text())
    with pytest.raises(LoaderError) as e:
        list(build_loader(shards, split="val", loader="torch", res=32, batch_size=4, workers=1))
    assert str(e.value) == f"{shards}/val-000000.idx does not agree with {shards}/val-000000.tar; run `depthcli verify {shards}`."


def test_a_missing_damaged_index_or_a_tar_cut_short_is_one_sentence(exact_shards, tmp_path):
    """Each after the loader was made (its checks of sizes passed)."""
    shards = _copy(exact_shards, tmp_path)
    loader = build_loader(shards, split="val", loader="torch", res=32, batch_size=4, workers=1)
    p = plan(shards, "val", 4, 0, 1, train=False)
    (shards / "val-000001.idx").unlink()
    with pytest.raises(LoaderError) as e:
        list(loader)
    assert str(e.value) == f"could not read {shards}/val-000001.idx (No such file or directory); run `depthcli verify {shards}`."
    idx = shards / "val-000000.idx"
    idx.write_text(idx.read_text().replace("v1.2", "v1.1"))
    reader = SampleReader(p.tars, p.indexes, str(shards))
    with pytest.raises(LoaderError) as e:
        reader.members(0)
    assert str(e.value) == f"could not read {idx} (val-000000.idx is not a v1.2 index of 8 samples); run `depthcli verify {shards}`."
    tar = shards / "val-000002.tar"
    tar.write_bytes(tar.read_bytes()[:tar.stat().st_size // 2])
    with pytest.raises(LoaderError, match=rf"could not read {tar} \(it ends inside \S+\); run `depthcli verify {shards}`\.$"):
        [reader.read(2, i) for i in range(len(reader.members(2)))]


def test_kept_bg_decodes_survive_augmentation(exact_shards):
    """A bg is decoded once per worker and kept, read-only: an op writing into it would raise, and
    after augmenting every sample the kept copies are still what a fresh decode gives."""
    tl.decode_bg.cache_clear()
    p = plan(exact_shards, "train", 4, 0, 1, train=True)
    reader = SampleReader(p.tars, p.indexes, str(exact_shards))
    items = [(e, k, i) for e in range(3) for k in range(len(p.tars)) for i in range(p.counts[k])]
    for aug in (Augment(), Augment().only("color", "noise", "dropout")):
        samples = tl.Samples(reader, aug, 32, 0, floats=True)
        for item in items:
            samples[item]
    assert tl.decode_bg.cache_info().currsize == 4  # the set's four backgrounds
    for _, k, i in items:
        bg = reader.read(k, i)[0]
        assert np.array_equal(tl.decode_bg(bg, 32), tl.decode_image(bg, False, 32))


def test_workers_start_after_the_parent_used_opencvs_threads(exact_shards):
    """A process that ran OpenCV's thread pool (a notebook, a test run) then makes a torch loader:
    the forked workers must not wait forever on the pool's inherited state. In a child process,
    so a hang fails this test instead of stopping the suite."""
    script = f"""
import time, cv2, numpy as np
from pipeline.loaders import build_loader
cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))  # large enough to use the pool
time.sleep(1)  # its threads wait on their condition variable
print(len(list(build_loader({str(exact_shards)!r}, split="val", loader="torch", res=32, batch_size=4, workers=1))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and done.stdout.split() == ["7"], done.stderr


def test_indexed_reading_of_long_and_non_ascii_names(tmp_path):
    """A name over 100 bytes gets a GNU long-name header of its own: still read, as webdataset reads it."""
    import webdataset as wds

    from pipeline.tar_index import IDX_VERSION, index_line
    from pipeline.shard import _TarWriter

    keys = ["short", "é" * 60, "x" * 120]
    tar, idx = tmp_path / "t.tar", tmp_path / "t.idx"
    with tar.open("wb") as f:
        w = _TarWriter(f)
        lines = [index_line([w.add(f"{k}.{r}.png", f"{k}:{r}".encode() * 3) for r in (*ROLES, "json")]) for k in keys]
        w.close()
    idx.write_text(f"{IDX_VERSION} {len(keys)}\n" + "".join(line + "\n" for line in lines))
    ours = _as_webdataset(SampleReader([str(tar)], [str(idx)], str(tmp_path)), range(1))
    assert [s["__key__"] for s in ours] == keys
    assert ours == [_images(s) for s in wds.WebDataset([str(tar)], shardshuffle=False, empty_check=False)]


DROPPED_DALI = """
import gc, sys
import pipeline.torch_loader as tl
from pipeline.loaders import build_loader

getitem = tl.Samples.__getitem__
def collecting_getitem(self, item):  # a worker's collector runs (allocations trigger it; here for sure)
    gc.collect()
    return getitem(self, item)
tl.Samples.__getitem__ = collecting_getitem

gc.disable()  # the parent does not get round to it: the dropped pipeline is garbage at the fork
kw = {"split": "train", "res": 32, "batch_size": 4, "workers": 1}
dali = build_loader(sys.argv[1], loader="dali", **kw)
next(iter(dali))
cycle = {"loader": dali}
cycle["self"] = cycle
del dali, cycle
print(next(iter(build_loader(sys.argv[1], loader="torch", **kw)))["bg"].shape)
"""


def test_a_worker_forked_beside_a_dropped_dali_pipeline_does_not_hang(exact_shards, tmp_path):
    """A worker that collected a DALI pipeline the parent had dropped waited forever for its
    threads (a fork does not copy them): the parent collects its garbage first."""
    (tmp_path / "dropped.py").write_text(DROPPED_DALI)
    done = run_script(tmp_path / "dropped.py", str(exact_shards), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([4, 3, 32, 32])" in done.stdout
