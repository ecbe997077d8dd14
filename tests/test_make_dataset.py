import hashlib
import io
import re
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import run_script

from pipeline.cli import main
from pipeline.make_dataset import (DatasetError, MakeSettings, make_dataset, paste, procedural_background,
                                   procedural_foreground)

NAME = re.compile(r"^fg_bg/(bg\d{3})/(bg\d{3})_(fg\d{3})_([TF])_(\d{6})\.jpg$")


def _img(zf, name, mode="L"):
    return np.asarray(Image.open(io.BytesIO(zf.read(name))).convert(mode), dtype=np.int16)


def test_layout_names_and_counts(small_zip):
    with zipfile.ZipFile(small_zip) as zf:
        names = zf.namelist()
        fg_bg = [n for n in names if n.startswith("fg_bg/")]
        assert len(fg_bg) == 3 * 4 * 2 * 2
        assert sorted(n for n in names if n.startswith("bg/")) == ["bg/bg001.jpg", "bg/bg002.jpg", "bg/bg003.jpg"]
        for n in fg_bg:
            m = NAME.match(n)
            assert m and m[1] == m[2], n
            assert "fg_bg_masks/" + n[len("fg_bg/"):] in names
            assert "fg_bg_depth/" + n[len("fg_bg/"):] in names
        assert {NAME.match(n)[4] for n in fg_bg} == {"T", "F"}
        assert "fg_bg/bg001/bg001_fg001_F_000000.jpg" in names
        labels = zf.read("labels/bg002_label_info.txt").decode().splitlines()
        assert len(labels) == 4 * 2 * 2
        name, x, y = labels[0].split("\t")
        assert name.startswith("bg002_fg001_") and x.isdigit() and y.isdigit()
        assert zf.getinfo(fg_bg[0]).compress_type == zipfile.ZIP_STORED


def test_mask_marks_the_pasted_object(small_zip):
    with zipfile.ZipFile(small_zip) as zf:
        for n in [n for n in zf.namelist() if n.startswith("fg_bg/")][:12]:
            bg = _img(zf, f"bg/{n.split('/')[1]}.jpg", "RGB")
            fg_bg = _img(zf, n, "RGB")
            mask = _img(zf, "fg_bg_masks/" + n[6:]) > 127
            differs = np.abs(fg_bg - bg).max(-1) > 40  # well above JPEG q65 noise
            assert mask.sum() > 30
            # Strong changes lie on the mask (give or take JPEG ringing at its edge) ...
            near = mask.copy()
            for axis in (0, 1):
                for shift in (-2, -1, 1, 2):
                    near |= np.roll(mask, shift, axis)
            assert (differs & ~near).sum() <= 3
            # ... and the mask is where things changed.
            assert differs[mask].mean() > 0.3


def test_paste_is_exact_before_jpeg():
    """The object changes exactly the mask's pixels and takes the ground's depth at its foot."""
    bg = procedural_background(seed=0, index=0, size=96)
    rgb, alpha = procedural_foreground(seed=0, index=1, size=96)
    rgb = rgb // 2 + 1  # never equal to the sky, so every object pixel differs from bg
    for foot in (bg.first_row + 5, 80, 96):
        out, mask, depth, x, y = paste(bg, rgb, alpha, foot, 0.3)
        assert mask.sum() > 20
        assert np.array_equal(np.any(out != bg.rgb, -1), mask)
        assert np.allclose(depth[mask], bg.ground[foot - 1])
        assert np.array_equal(depth[~mask], bg.depth[~mask])
    near, far = paste(bg, rgb, alpha, 95, 0.3)[0:2], paste(bg, rgb, alpha, bg.first_row + 10, 0.3)[0:2]
    assert near[1].sum() > far[1].sum()  # nearer is larger


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    def digest(out, **kw):
        make_dataset(MakeSettings(out=str(out), num_bg=2, num_fg=2, placements=2, size=64, **kw))
        return hashlib.sha256(out.read_bytes()).hexdigest()

    a = digest(tmp_path / "a.zip", workers=1)
    assert digest(tmp_path / "b.zip", workers=2) == a
    assert digest(tmp_path / "c.zip", workers=2, seed=1) != a


def test_folder_output_matches_zip(tmp_path):
    make_dataset(MakeSettings(out=str(tmp_path / "z.zip"), num_bg=2, num_fg=1, placements=1, size=64, workers=1))
    make_dataset(MakeSettings(out=str(tmp_path / "d"), num_bg=2, num_fg=1, placements=1, size=64, workers=1))
    with zipfile.ZipFile(tmp_path / "z.zip") as zf:
        for name in zf.namelist():
            assert (tmp_path / "d" / name).read_bytes() == zf.read(name)
        assert sum(1 for p in (tmp_path / "d").rglob("*") if p.is_file()) == len(zf.namelist())


def test_user_backgrounds_and_foregrounds(tmp_path):
    bg_dir, fg_dir = tmp_path / "bgs", tmp_path / "fgs"
    (bg_dir / "depth").mkdir(parents=True)
    fg_dir.mkdir()
    Image.new("RGB", (120, 90), (30, 90, 30)).save(bg_dir / "field.jpg")
    Image.fromarray(np.tile(np.linspace(0, 255, 90, dtype=np.uint8)[:, None], (1, 120))).save(bg_dir / "depth" / "field.png")
    Image.new("RGB", (80, 80), (0, 0, 200)).save(bg_dir / "sea.png")
    rgba = np.zeros((40, 20, 4), np.uint8)
    rgba[5:35, 5:15] = (255, 0, 0, 255)
    Image.fromarray(rgba).save(fg_dir / "red.png")
    out = tmp_path / "user"
    make_dataset(MakeSettings(out=str(out), bg_dir=str(bg_dir), fg_dir=str(fg_dir), placements=3, size=64, workers=1))
    fg_bgs = sorted((out / "fg_bg").rglob("*.jpg"))
    assert len(fg_bgs) == 2 * 1 * 2 * 3
    img = np.asarray(Image.open(fg_bgs[0]))
    mask = np.asarray(Image.open(out / "fg_bg_masks" / fg_bgs[0].relative_to(out / "fg_bg"))) > 127
    assert img.shape == (64, 64, 3) and mask.any()
    assert img[mask][:, 0].mean() > 150  # the red object is where its mask says


def test_foreground_without_transparency_is_one_clear_error(tmp_path):
    (tmp_path / "fgs").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "fgs" / "flat.jpg")
    r = CliRunner().invoke(main, ["make-dataset", "--out", str(tmp_path / "o.zip"), "--fg-dir", str(tmp_path / "fgs"),
                                  "--num-bg", "1", "--placements", "1", "--workers", "1"])
    assert r.exit_code == 1
    assert "has no transparency and no mask" in r.output and "Traceback" not in r.output


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "o.zip"
    args = ["make-dataset", "--out", str(out), "--num-bg", "1", "--num-fg", "1", "--placements", "1", "--size", "64"]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = out.read_bytes()
    r = CliRunner().invoke(main, args + ["--seed", "3"])
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert out.read_bytes() == first
    assert CliRunner().invoke(main, args + ["--seed", "3", "--overwrite"]).exit_code == 0
    assert out.read_bytes() != first


def test_bad_settings(tmp_path):
    with pytest.raises(DatasetError, match="at least 1"):
        make_dataset(MakeSettings(out=str(tmp_path / "x.zip"), num_bg=0))


FAILING_WORKER = """
import sys
import pipeline.make_dataset as M

real = M.make_pair


def make_pair(task):  # the workers import this script first, so they run this too
    if task[:2] == (1, 0):
        raise M.DatasetError("broken pair")
    return real(task)


M.make_pair = make_pair
if __name__ == "__main__":
    try:
        M.make_dataset(M.MakeSettings(out=sys.argv[1], num_bg=10, num_fg=10, placements=1, size=64, workers=2))
    except M.DatasetError as e:
        print("raised:", e)
"""


def test_a_failing_worker_stops_the_run_without_hanging(tmp_path):
    """More pairs than the in-flight window, and the failure well past the first ones."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_WORKER)
    out = tmp_path / "out" / "o.zip"
    r = run_script(script, str(out), timeout=60)
    assert "raised: broken pair" in r.stdout, r.stderr
    assert not out.exists() and not list(out.parent.iterdir())  # no half-written zip left


def test_unreadable_user_image_is_one_sentence_before_any_work(tmp_path):
    (tmp_path / "fgs").mkdir()
    (tmp_path / "fgs" / "broken.png").write_bytes(b"not a png")
    r = CliRunner().invoke(main, ["make-dataset", "--out", str(tmp_path / "o.zip"), "--fg-dir", str(tmp_path / "fgs")])
    assert r.exit_code == 1 and "broken.png is not a readable image" in r.output


def test_overwrite_never_deletes_what_is_not_a_dataset(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    r = CliRunner().invoke(main, ["make-dataset", "--out", str(tmp_path / "mine"), "--overwrite", "--num-bg", "1"])
    assert r.exit_code == 1 and "not a dataset (no fg_bg/)" in r.output
    assert (tmp_path / "mine" / "precious.txt").exists()


def test_folder_overwrite_swaps_in_the_new_dataset(tmp_path):
    out = tmp_path / "ds"
    settings = dict(out=str(out), num_bg=1, num_fg=1, placements=1, size=64, workers=1)
    make_dataset(MakeSettings(**settings))
    first = (out / "bg" / "bg001.jpg").read_bytes()
    make_dataset(MakeSettings(**settings, seed=5, overwrite=True))
    assert (out / "bg" / "bg001.jpg").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no .tmp or .old left
