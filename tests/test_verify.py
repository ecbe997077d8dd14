import hashlib
import json
import os
import shutil
import tarfile

import pytest
from click.testing import CliRunner

from conftest import run_script

from pipeline.cli import main
from pipeline.verify import VerifyError, verify


@pytest.fixture
def shards(tmp_path, small_shards):
    copy = tmp_path / "shards"
    shutil.copytree(small_shards, copy)
    return copy


def _rehash(folder, tar_name):
    """Make the manifest agree with a changed tar, so only deeper checks can catch it."""
    m = json.loads((folder / "manifest.json").read_text())
    for split in m["splits"].values():
        for s in split["shards"]:
            if s["tar"] == tar_name:
                data = (folder / tar_name).read_bytes()
                s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


def test_good_set_passes(shards):
    r = CliRunner().invoke(main, ["verify", str(shards), "--decode"])
    assert r.exit_code == 0, r.output
    assert "ok: 6 shards, 48 samples" in r.output and "every image decoded" in r.output


def test_truncated_shard_is_named(shards):
    tar = shards / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    r = CliRunner().invoke(main, ["verify", str(shards)])
    assert r.exit_code == 1
    assert "bad shard train-000001.tar: train-000001.tar has 5000 bytes" in r.output and "Traceback" not in r.output


def test_tampered_shard_is_named(shards):
    tar = shards / "train-000002.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    tar.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="train-000002.tar does not match its sha256"):
        verify(shards)


def test_missing_shard_and_index(shards):
    (shards / "val-000001.idx").unlink()
    with pytest.raises(VerifyError, match="val-000001.idx is missing"):
        verify(shards)
    (shards / "train-000000.tar").unlink()
    with pytest.raises(VerifyError, match="bad shard train-000000.tar: train-000000.tar is missing"):
        verify(shards)


def test_index_that_disagrees_with_its_tar(shards):
    idx = shards / "train-000000.idx"
    lines = idx.read_text().splitlines()
    f = lines[1].split(" ")
    f[1] = str(int(f[1]) + 512)
    idx.write_text("\n".join([lines[0], " ".join(f)] + lines[2:]) + "\n")
    with pytest.raises(VerifyError, match="train-000000.idx does not agree with train-000000.tar"):
        verify(shards)


def test_sample_count_that_disagrees(shards):
    m = json.loads((shards / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["samples"] += 1
    m["splits"]["train"]["samples"] += 1
    m["totals"]["packed"] += 1
    m["totals"]["found"] += 1
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VerifyError, match="holds 10 samples, the manifest says 11"):
        verify(shards)


def test_sample_missing_a_member(shards):
    tar_path = shards / "train-000003.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for m, data in members:
            if not m.name.endswith(".depth.jpg") or m.name.split(".")[0] != members[0][0].name.split(".")[0]:
                tar.addfile(m, __import__("io").BytesIO(data))
    _rehash(shards, "train-000003.tar")
    with pytest.raises(VerifyError, match="bad shard train-000003.tar: .* not the bg, fg_bg, mask and depth images"):
        verify(shards)


def test_decode_catches_a_damaged_image_that_structure_checks_miss(shards):
    tar_path = shards / "val-000000.tar"
    data = bytearray(tar_path.read_bytes())
    line = (shards / "val-000000.idx").read_text().splitlines()[1].split(" ")
    offset, size = int(line[5]), int(line[6])  # the fg_bg member's data
    assert line[4] == "fg_bg.jpg"
    data[offset + 3: offset + 200] = b"\x00" * 197  # damage the headers after the magic number
    tar_path.write_bytes(bytes(data))
    _rehash(shards, "val-000000.tar")
    verify(shards)  # sizes, hashes, index and magic numbers are all fine
    with pytest.raises(VerifyError, match="bad shard val-000000.tar: .*fg_bg is damaged"):
        verify(shards, decode=True)


def test_not_a_shard_folder(tmp_path):
    r = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert r.exit_code == 1 and "has no manifest.json" in r.output
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.output


AFTER_DALI = """
import gc, os, sys
from pipeline.loaders import build_loader
from pipeline.verify import verify

if __name__ == "__main__":
    gc.set_threshold(10**9)  # the caller never collects by itself; a forked child would at once
    os.register_at_fork(after_in_child=lambda: gc.set_threshold(1))
    loader = build_loader(sys.argv[1], split="train", res=32, batch_size=4, loader="dali", workers=2)
    loader.cycle = loader  # DALI's pipeline left as cyclic garbage, as tests and notebooks leave it
    del loader
    print(verify(sys.argv[1], workers=2)["shards"])
"""


def test_verify_after_dali_in_the_same_process_does_not_hang(small_shards, tmp_path):
    """A verify worker forked from a caller holding a DALI pipeline could collect it and wait
    forever for threads that do not survive a fork; workers now come from a fork server."""
    (tmp_path / "after_dali.py").write_text(AFTER_DALI)
    proc = run_script(tmp_path / "after_dali.py", str(small_shards), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].isdigit()


def test_workers_never_fork_the_caller(small_shards):
    """A fork copies the caller, whose heap a test run or notebook can grow past the RAM (fork then
    fails with ENOMEM): the workers come from a fork server."""
    forks = []
    os.register_at_fork(before=lambda: forks.append(1))  # stays registered: only counts
    assert verify(small_shards, workers=2)["shards"] > 0
    assert forks == []
