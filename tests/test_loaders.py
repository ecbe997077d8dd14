"""Both loaders: the batch contract, synchronized geometry, photometric ops on images only,
frequencies and ranges of the draws, rank splits, epochs, and bad shards.

The data (conftest.exact_shards): bg red = 2x, green = 2y; fg_bg = bg with a rectangle of colour
(250, 250, 100 + id); mask = 255 exactly there; depth = x·255/63. So after any geometry,
depth·63/255 must equal red/2 wherever the image is not fill, and the mask must cover exactly the
pixels where fg_bg differs from bg.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pipeline.augment import Augment
from pipeline.loaders import build_loader
from pipeline.manifest import ManifestError

LOADERS = ["dali", "torch"]
RES = 64


def batches(shards, loader, epochs=1, **kw):
    kw = {"res": RES, "batch_size": 8, "workers": 1, **kw}
    it = build_loader(shards, loader=loader, **kw)
    out = []
    for _ in range(epochs):
        got = list(it)
        assert len(got) == len(it)
        out += got
    return it, out


def samples(batch_list):
    """Per sample numpy arrays (HWC for images), valid ones only."""
    for b in batch_list:
        for i in torch.nonzero(b["valid"]).flatten().tolist():
            yield {k: b[k][i].permute(1, 2, 0).numpy() for k in ("bg", "fg_bg", "mask", "depth")}


def ident(s) -> int:
    """Which source sample this is: the blue of the pasted rectangle, 100 + id."""
    return int(round(s["fg_bg"][s["mask"][..., 0] > 0.5][:, 2].mean() * 255)) - 100


def erode(m, r=2):
    """Binary erosion by a (2r+1)² square (np.roll wraps, which only matters at the border)."""
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out &= np.roll(np.roll(m, dy, 0), dx, 1)
    return out


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_contract(exact_shards, loader, split):
    it, got = batches(exact_shards, loader, split=split)
    assert len(got) == 4  # 39 // 8 train batches; ceil(25 / 8) val batches
    for b in got:
        assert set(b) == {"bg", "fg_bg", "mask", "depth", "valid", "keys"}
        assert len(b["keys"]) == 8 and all(isinstance(k, str) and "." not in k for k in b["keys"])
        assert b["bg"].shape == b["fg_bg"].shape == (8, 3, RES, RES)
        assert b["mask"].shape == b["depth"].shape == (8, 1, RES, RES)
        for k in ("bg", "fg_bg", "mask", "depth"):
            assert b[k].dtype == torch.float32 and b[k].device.type == "cpu"
            assert 0 <= b[k].min() and b[k].max() <= 1
        assert b["valid"].dtype == torch.bool
    assert sum(int(b["valid"].sum()) for b in got) == (32 if split == "train" else 25)


@pytest.mark.parametrize("loader", LOADERS)
def test_validation_is_exact(exact_shards, loader):
    """No augmentation in validation: depth is the ramp, the mask exactly the rectangle."""
    _, got = batches(exact_shards, loader, split="val")
    for s in samples(got):
        assert np.allclose(s["depth"][..., 0] * 63, s["bg"][..., 0] * 255 / 2, atol=0.51)
        differs = np.abs(s["fg_bg"] - s["bg"]).max(-1) > 0.02
        assert np.array_equal(differs, s["mask"][..., 0] > 0.5)


@pytest.mark.parametrize("loader", LOADERS)
def test_geometry_is_synchronized(exact_shards, loader):
    aug = Augment(hflip_p=0.5, vflip_p=0.5, rotate_p=1.0).only("hflip", "vflip", "rotate")
    _, got = batches(exact_shards, loader, epochs=3, augment=aug)
    checked = 0
    for s in samples(got):
        assert set(np.unique(s["mask"])) <= {0.0, 1.0}  # labels rotate with nearest: never blended
        mask = s["mask"][..., 0] > 0.5
        differs = np.abs(s["fg_bg"] - s["bg"]).max(-1) > 0.1
        inner, outer = erode(mask), ~erode(~mask)  # away from the edges by 2 px
        assert differs[inner].all() and not differs[~outer].any()
        # depth went through the same geometry as bg: away from the fill and the edges,
        # depth·63/255 = red/2 (both encode the source column).
        content = erode(s["bg"][..., 1] * 255 > 3) & erode(s["depth"][..., 0] > 0.02) & ~outer
        assert content.sum() > 0.4 * RES * RES
        err = np.abs(s["depth"][..., 0] * 63 - s["bg"][..., 0] * 255 / 2)[content]
        assert np.median(err) < 0.5 and np.percentile(err, 99) < 2.0
        checked += 1
    assert checked == 3 * 32


def _flip_and_angle(s):
    """Recover the geometry from the image: red grows with source x, green with source y."""
    red, green = s["bg"][..., 0], s["bg"][..., 1]
    core = slice(24, 40)
    gy, gx = np.gradient(red[core, core])
    angle = math.degrees(math.atan2(gy.mean(), gx.mean()))
    hflip = abs(angle) > 90
    vflip = np.gradient(green[core, core])[0].mean() < 0  # a horizontal flip leaves rows in place
    return hflip, vflip, angle


@pytest.mark.parametrize("loader", LOADERS)
def test_flip_frequencies(exact_shards, loader):
    aug = Augment().only("hflip", "vflip")
    _, got = batches(exact_shards, loader, epochs=10, augment=aug)
    draws = [_flip_and_angle(s)[:2] for s in samples(got)]
    n = len(draws)
    assert n == 320
    h, v = np.mean([d[0] for d in draws]), np.mean([d[1] for d in draws])
    assert abs(h - 0.5) < 4 * math.sqrt(0.25 / n)
    assert abs(v - 0.3) < 4 * math.sqrt(0.21 / n)


@pytest.mark.parametrize("loader", LOADERS)
def test_rotation_probability_and_range(exact_shards, loader):
    aug = Augment(rotate_p=0.7, rotate_deg=15).only("rotate")
    _, got = batches(exact_shards, loader, epochs=10, augment=aug)
    angles = np.array([_flip_and_angle(s)[2] for s in samples(got)])
    assert np.abs(angles).max() < 15.5
    rotated = np.abs(angles) > 0.5
    assert abs(rotated.mean() - 0.7 * (1 - 1 / 30)) < 4 * math.sqrt(0.21 / len(angles))
    assert angles.min() < -10 and angles.max() > 10  # the whole range is used
    assert abs(np.mean(angles[rotated])) < 3  # and symmetric


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("shared", [False, True])
def test_photometric_ops_touch_only_bg_and_fg_bg(exact_shards, loader, shared):
    aug = Augment(color_p=1.0, noise_p=1.0, dropout_p=1.0, shared=shared).only("color", "noise", "dropout")
    _, got = batches(exact_shards, loader, augment=aug)
    same_holes = []
    for s in samples(got):
        mask = s["mask"][..., 0]
        assert set(np.unique(mask)) == {0.0, 1.0}  # still exactly the binary rectangle
        ys, xs = np.nonzero(mask)
        assert mask.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
        ramp = np.round(np.arange(RES) * 255 / 63) / 255
        assert np.allclose(s["depth"][..., 0], ramp[None, :], atol=1e-6)  # depth untouched
        clean = np.stack([np.arange(RES)[None, :].repeat(RES, 0) * 2, np.arange(RES)[:, None].repeat(RES, 1) * 2], -1) / 255
        bg_change = np.abs(s["bg"][..., :2] - clean)
        assert bg_change.mean() > 0.005  # the images were changed
        assert (s["bg"].reshape(-1, 3) == 0).all(1).sum() >= RES * RES // 48  # a hole of at least half its most
        holes = [erode((s[k] == 0).all(-1) & (mask == 0), 1) for k in ("bg", "fg_bg")]  # not lone clamped pixels
        same_holes.append(np.array_equal(*holes))
    # Shared draws: the same holes (and colour shift, noise level) in bg and fg_bg; per image, not.
    assert all(same_holes) if shared else not any(same_holes)


@pytest.mark.parametrize("loader", LOADERS)
def test_two_ranks_see_every_validation_sample_once(exact_shards, loader):
    seen, counts = [], []
    for rank in range(2):
        it, got = batches(exact_shards, loader, split="val", batch_size=4, rank=rank, world_size=2)
        counts.append(len(got))
        seen.append([ident(s) for s in samples(got)])
    assert counts == [4, 4]  # parts of 12 and 13 samples: ceil(13 / 4) batches on both
    assert sorted(len(s) for s in seen) == [12, 13]
    assert not set(seen[0]) & set(seen[1])
    m = json.loads((exact_shards / "manifest.json").read_text())
    assert len(set(seen[0]) | set(seen[1])) == m["splits"]["val"]["samples"] == 25


@pytest.mark.parametrize("loader", LOADERS)
def test_training_ranks_yield_equal_batches_from_their_own_parts(exact_shards, loader):
    """39 samples, 2 ranks: parts of 19 and 20, where a careless reader yields 4 and 5 batches
    of 4. Every rank must yield 4 every epoch, and within an epoch read only its own part."""
    per_rank = []
    for rank in range(2):
        it = build_loader(exact_shards, loader=loader, res=RES, batch_size=4, rank=rank, world_size=2, workers=1,
                          augment=Augment.off())
        epochs = [list(it) for _ in range(3)]
        assert [len(e) for e in epochs] == [len(it)] * 3 == [4] * 3
        first = [ident(s) for s in samples(epochs[0])]
        assert len(first) == len(set(first)) == 16  # no sample twice in an epoch
        per_rank.append(first)
    assert not set(per_rank[0]) & set(per_rank[1])


@pytest.mark.parametrize("loader", LOADERS)
def test_epochs_reshuffle(exact_shards, loader):
    it = build_loader(exact_shards, loader=loader, res=RES, batch_size=4, augment=Augment.off(), workers=1)
    first = [ident(s) for s in samples(list(it))]
    second = [ident(s) for s in samples(list(it))]
    assert len(first) == len(second) == 36
    assert first != second


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_shards_give_one_sentence(exact_shards, tmp_path, loader):
    shards = tmp_path / "s"
    shutil.copytree(exact_shards, shards)
    tar = shards / "val-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(ManifestError, match="val-000001.tar has 3000 bytes, the manifest says .*depthcli verify"):
        build_loader(shards, split="val", loader=loader, res=RES, batch_size=4)
    with pytest.raises(ManifestError, match="too few for one batch"):
        build_loader(exact_shards, split="train", loader=loader, res=RES, batch_size=32, world_size=2)
    with pytest.raises(ManifestError, match="has no 'test' samples"):
        build_loader(exact_shards, split="test", loader=loader)


@pytest.mark.parametrize("loader", LOADERS)
def test_damaged_image_inside_a_shard_is_one_sentence(exact_shards, tmp_path, loader):
    from pipeline.loaders import LoaderError

    shards = tmp_path / "s"
    shutil.copytree(exact_shards, shards)
    idx = (shards / "val-000000.idx").read_text().splitlines()[1].split(" ")
    offset = int(idx[5])  # the first sample's fg_bg
    data = bytearray((shards / "val-000000.tar").read_bytes())
    data[offset + 8: offset + 40] = b"\x00" * 32  # break the PNG header, keep the size
    (shards / "val-000000.tar").write_bytes(bytes(data))
    with pytest.raises(LoaderError, match="could not (read or )?decode .*; run `depthcli verify --decode"):
        list(build_loader(shards, split="val", loader=loader, res=RES, batch_size=4, workers=1))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@cuda
@pytest.mark.parametrize("loader", LOADERS)
def test_gpu_contract_synchronization_and_photometric(exact_shards, loader):
    """The GPU graph (mixed decode, ops on the device): contract, synchronized geometry, labels
    untouched by photometric ops."""
    geo = Augment(hflip_p=0.5, vflip_p=0.5, rotate_p=1.0).only("hflip", "vflip", "rotate")
    _, got = batches(exact_shards, loader, augment=geo, device="cuda")
    assert all(b[k].device.type == "cuda" for b in got for k in b)
    for s in samples([{k: v.cpu() for k, v in b.items()} for b in got]):
        mask = s["mask"][..., 0] > 0.5
        differs = np.abs(s["fg_bg"] - s["bg"]).max(-1) > 0.1
        assert differs[erode(mask)].all() and not differs[erode(~mask)].any()
    photo = Augment(color_p=1.0, noise_p=1.0, dropout_p=1.0).only("color", "noise", "dropout")
    _, got = batches(exact_shards, loader, augment=photo, device="cuda")
    ramp = np.round(np.arange(RES) * 255 / 63) / 255
    for s in samples([{k: v.cpu() for k, v in b.items()} for b in got]):
        assert set(np.unique(s["mask"])) == {0.0, 1.0}
        assert np.allclose(s["depth"][..., 0], ramp[None, :], atol=1e-6)
