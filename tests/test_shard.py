import glob
import json
import os
import signal
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from conftest import encode, run_script, write_layout
from wds2idx import IndexCreator

from pipeline.cli import main
from pipeline.manifest import read_manifest
from pipeline.shard import ShardError, ShardSettings, shard


def _members(folder: Path) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                out[m.name] = tar.extractfile(m).read()
    return out


def _keys(folder: Path, split: str) -> list[str]:
    return [n[: -len(".json")] for t in sorted(folder.glob(f"{split}-*.tar")) for n in tarfile.open(t).getnames() if n.endswith(".json")]


def test_round_trip_bytes_unchanged(small_zip, small_shards):
    m = read_manifest(small_shards)
    assert m["totals"] == {**m["totals"], "found": 48, "packed": 48, "skipped": 0}
    members = _members(small_shards)
    with zipfile.ZipFile(small_zip) as zf:
        for name in zf.namelist():
            if name.startswith("fg_bg/"):
                key = name.rsplit("/", 1)[1][: -len(".jpg")]
                rest = name[len("fg_bg/"):]
                assert members[f"{key}.fg_bg.jpg"] == zf.read(name)
                assert members[f"{key}.mask.jpg"] == zf.read("fg_bg_masks/" + rest)
                assert members[f"{key}.depth.jpg"] == zf.read("fg_bg_depth/" + rest)
                assert members[f"{key}.bg.jpg"] == zf.read(f"bg/{key[:5]}.jpg")
                meta = json.loads(members[f"{key}.json"])
                assert meta["bg"] == key[:5] and meta["fg"] == key[6:11] and meta["flip"] == (key[12] == "T")
                assert isinstance(meta["x"], int) and meta["source"] == "small.zip"


def test_train_val_disjoint_complete_and_shuffled(small_shards):
    train, val = _keys(small_shards, "train"), _keys(small_shards, "val")
    assert len(val) == 12 and len(train) == 36
    assert not set(train) & set(val) and len(set(train + val)) == 48
    first = _keys(small_shards, "train")[:10]
    assert len({k[:5] for k in first}) > 1  # neighbours do not all share a background
    m = read_manifest(small_shards)
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [10, 10, 10, 6]


def test_index_is_what_wds2idx_writes(small_shards, tmp_path):
    for tar_path in small_shards.glob("*.tar"):
        ours = tar_path.with_suffix(".idx")
        with IndexCreator(str(tar_path), str(tmp_path / "ref.idx"), verbose=False) as ic:
            ic.create_index()
        assert ours.read_text() == (tmp_path / "ref.idx").read_text()


def test_webdataset_and_dali_read_the_same_samples(small_shards):
    tars = sorted(glob.glob(str(small_shards / "*.tar")))
    by_wds = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
    assert len(by_wds) == 48

    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def raw():
        return tuple(fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], name="r",
                                           ext=["bg.jpg", "fg_bg.jpg", "mask.jpg", "depth.jpg", "json"],
                                           missing_component_behavior="error", pad_last_batch=True))

    pipe = raw()
    pipe.build()
    assert pipe.reader_meta("r")["epoch_size"] == 48
    seen = {}
    for _ in range(6):
        bg, fg_bg, mask, depth, meta = pipe.run()
        for i in range(len(bg)):
            key = json.loads(bytes(meta.at(i)))
            sample = (bytes(bg.at(i)), bytes(fg_bg.at(i)), bytes(mask.at(i)), bytes(depth.at(i)))
            seen[sample[1]] = sample
    assert len(seen) == 48
    for s in by_wds.values():
        assert seen[s["fg_bg.jpg"]] == (s["bg.jpg"], s["fg_bg.jpg"], s["mask.jpg"], s["depth.jpg"])
    assert key["bg"].startswith("bg")


def _bad_zip(path: Path) -> dict[str, str]:
    """A zip with every kind of real-world junk and damage; returns key -> expected reason."""
    with zipfile.ZipFile(path, "w") as zf:
        keys = write_layout(zf, n_bg=2, per_bg=6, size=32)
        zf.writestr("__MACOSX/fg_bg/bg001/._x.png", b"junk")
        zf.writestr(".DS_Store", b"junk")
        zf.writestr("fg_bg/.DS_Store", b"junk")
        zf.writestr("README.txt", b"hello")
        good = np.zeros((32, 32, 3), np.uint8)
        # upper-case extension, JPEG bytes: packed as .jpg
        zf.writestr("fg_bg/bg001/upper.JPG", encode(good, "JPEG"))
        zf.writestr("fg_bg_masks/bg001/upper.JPG", encode(good[..., 0], "JPEG"))
        zf.writestr("fg_bg_depth/bg001/upper.Png", encode(good[..., 0]))
        expected = {}
        zf.writestr("fg_bg/bg001/nomask.png", encode(good))
        zf.writestr("fg_bg_depth/bg001/nomask.png", encode(good[..., 0]))
        expected["nomask"] = "missing its mask"
        zf.writestr("fg_bg/bg002/nodepth.png", encode(good))
        zf.writestr("fg_bg_masks/bg002/nodepth.png", encode(good[..., 0]))
        expected["nodepth"] = "missing its depth map"
        zf.writestr("fg_bg/bg009/nobg.png", encode(good))
        zf.writestr("fg_bg_masks/bg009/nobg.png", encode(good[..., 0]))
        zf.writestr("fg_bg_depth/bg009/nobg.png", encode(good[..., 0]))
        expected["nobg"] = "missing bg/bg009.jpg"
        for key, data, reason in [
            ("corrupt", b"\x00not an image at all" * 20, "fg_bg is not a JPEG or PNG image"),
            ("truncated", encode((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8), "JPEG")[:300], "fg_bg is damaged or truncated"),
            ("smaller", encode(good[:16, :16]), "images differ in size"),
        ]:
            zf.writestr(f"fg_bg/bg002/{key}.png", data)
            zf.writestr(f"fg_bg_masks/bg002/{key}.png", encode(good[..., 0]))
            zf.writestr(f"fg_bg_depth/bg002/{key}.png", encode(good[..., 0]))
            expected[key] = reason
    return {"good": len(keys) + 1, **expected}


def test_bad_input_is_skipped_and_reported(tmp_path):
    src = tmp_path / "bad.zip"
    expected = _bad_zip(src)
    n_good = expected.pop("good")
    r = CliRunner().invoke(main, ["shard", "--src", str(src), "--out", str(tmp_path / "s"), "--shard-size", "5", "--workers", "2"])
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "s")
    assert m["totals"]["found"] == n_good + len(expected)
    assert m["totals"]["packed"] == n_good
    assert m["totals"]["packed"] + m["totals"]["skipped"] == m["totals"]["found"]
    reasons = {s["key"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(expected)
    for key, why in expected.items():
        assert why in reasons[key], (key, reasons[key])
        assert f"skipped {key}:" in r.output
    members = _members(tmp_path / "s")
    assert {"upper.fg_bg.jpg", "upper.mask.jpg", "upper.depth.png"} <= set(members)
    assert not any("DS_Store" in n or "MACOSX" in n for n in members)
    assert m["ignored"]["junk (__MACOSX, hidden files)"] == 3
    assert f"packed {n_good} of {n_good + len(expected)} samples" in r.output


def test_strict_stops_at_the_first_bad_sample(tmp_path):
    src = tmp_path / "bad.zip"
    _bad_zip(src)
    r = CliRunner().invoke(main, ["shard", "--src", str(src), "--out", str(tmp_path / "s"), "--strict"])
    assert r.exit_code == 1
    assert "stopped by --strict" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_strict_stops_on_a_damaged_image(tmp_path):
    src = tmp_path / "d.zip"
    with zipfile.ZipFile(src, "w") as zf:
        write_layout(zf, n_bg=1, per_bg=3, size=32)
        good = np.zeros((32, 32), np.uint8)
        zf.writestr("fg_bg/bg001/broken.png", encode(np.stack([good] * 3, -1)))
        zf.writestr("fg_bg_masks/bg001/broken.png", b"\x89PNG\r\n\x1a\n broken")
        zf.writestr("fg_bg_depth/bg001/broken.png", encode(good))
    r = CliRunner().invoke(main, ["shard", "--src", str(src), "--out", str(tmp_path / "s"), "--strict", "--workers", "1"])
    assert r.exit_code == 1
    assert "sample broken: mask is damaged" in r.output


@pytest.mark.parametrize("make, says", [
    (lambda p: p.write_bytes(b"PK\x03\x04 this is not really a zip"), "neither a folder nor a zip"),
    (lambda p: None, "does not exist"),
    (lambda p: (p.mkdir(), (p / "photos").mkdir(), (p / "photos" / "a.jpg").write_bytes(b"x")), "holds no fg_bg images; expected a zip or folder"),
])
def test_unusable_source_is_one_sentence(tmp_path, make, says):
    src = tmp_path / "src.zip"
    make(src)
    r = CliRunner().invoke(main, ["shard", "--src", str(src), "--out", str(tmp_path / "s")])
    assert r.exit_code == 1
    assert says in r.output and "Traceback" not in r.output
    assert r.output.count("\n") == 1


def test_folder_sources_and_several_sources(tmp_path, small_zip):
    """Two sources: a zip and an unpacked folder under a wrapping directory, bg in only one."""
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(small_zip) as zf:
        for name in zf.namelist():
            if name.startswith("fg_bg") and "/bg003/" in name:
                zf.extract(name, unpacked / "dataset")
    part = tmp_path / "part.zip"
    with zipfile.ZipFile(small_zip) as zf, zipfile.ZipFile(part, "w") as out:
        for name in zf.namelist():
            if "/bg003/" not in name:
                out.writestr(name, zf.read(name))
    m = shard(ShardSettings(src=(str(part), str(unpacked)), out=str(tmp_path / "s"), workers=2), log=lambda *_: None)
    assert m["totals"]["found"] == m["totals"]["packed"] == 48


def test_existing_output_is_never_overwritten_silently(tmp_path, small_zip):
    out = tmp_path / "s"
    args = ["shard", "--src", str(small_zip), "--out", str(out), "--shard-size", "20"]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = (out / "manifest.json").read_text()
    r = CliRunner().invoke(main, args + ["--seed", "1"])
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert (out / "manifest.json").read_text() == before
    (out / "README.md").write_text("mine")
    assert CliRunner().invoke(main, args + ["--seed", "1", "--overwrite"]).exit_code == 0
    assert (out / "manifest.json").read_text() != before
    assert (out / "README.md").read_text() == "mine"


KILLER = """
import os, signal, sys
import pipeline.shard as S

calls = 0
real_add = S._TarWriter.add


def add(self, name, data):  # SIGKILL the whole run halfway through writing the 4th shard
    global calls
    calls += 1
    if calls == 3 * 5 * 4 + 2:
        os.killpg(0, signal.SIGKILL)
    return real_add(self, name, data)


S._TarWriter.add = add  # the workers import this script first, so they write with it too
if __name__ == "__main__":
    S.shard(S.ShardSettings(src=(sys.argv[1],), out=sys.argv[2], shard_size=4, workers=1))
"""


def test_killed_run_is_completed_by_a_rerun(tmp_path, small_zip):
    out = tmp_path / "s"
    (tmp_path / "killer.py").write_text(KILLER)
    proc = run_script(tmp_path / "killer.py", str(small_zip), str(out), timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert len(list(out.glob("*.tar"))) == 3 and list(out.glob("*.tar.tmp"))
    r = CliRunner().invoke(main, ["shard", "--src", str(small_zip), "--out", str(out), "--shard-size", "4", "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert "continuing an unfinished run: 3 of 13 shards already written" in r.output
    assert not list(out.glob("*.tmp")) and not (out / ".partial").exists()
    clean = shard(ShardSettings(src=(str(small_zip),), out=str(tmp_path / "clean"), shard_size=4, workers=2), log=lambda *_: None)
    resumed = read_manifest(out)
    assert resumed["splits"] == clean["splits"]  # same shards, byte for byte (sha256)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_bad_options(tmp_path, small_zip):
    with pytest.raises(ShardError, match="--shard-size"):
        shard(ShardSettings(src=(str(small_zip),), out=str(tmp_path), shard_size=0))
    r = CliRunner().invoke(main, ["shard", "--src", str(small_zip), "--out", str(tmp_path / "o"), "--val-fraction", "1.5"])
    assert r.exit_code == 1 and "--val-fraction" in r.output
    assert not os.path.exists(tmp_path / "o" / "manifest.json")
