"""train.settings: a run's settings.json starts a new run (--config), flags overriding it."""

import json
from dataclasses import asdict, replace

import pytest

from train.settings import TrainingError, TrainSettings, settings_from


def saved(tmp_path, **changes) -> str:
    """A settings.json as the trainer writes it."""
    s = replace(TrainSettings(), **changes)
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(asdict(s), indent=1) + "\n")
    return str(path)


def test_a_saved_run_starts_a_new_one_flags_overriding(tmp_path):
    path = saved(tmp_path, res=(64, 128), epochs=(3, 1), w_edge=0.5, out="runs/a", resume="auto", seed=7)
    s = settings_from(["--config", path, "--out", str(tmp_path / "b"), "--epochs", "2"])
    assert (s.res, s.w_edge, s.seed) == ((64, 128), 0.5, 7)  # from the file
    assert (s.out, s.epochs) == (str(tmp_path / "b"), (2.0,))  # from the flags
    assert s.resume == ""  # a new run: the old one's --resume is not carried over


def test_the_same_file_gives_the_same_settings(tmp_path):
    original = replace(TrainSettings(), recipe="reference", model="reference", lr=(1e-3,), res=(64,), out=str(tmp_path / "x"))
    path = saved(tmp_path, **asdict(original))
    assert settings_from(["--config", path]) == original


def test_the_recipe_fills_only_what_neither_file_nor_flags_say(tmp_path):
    path = saved(tmp_path, recipe="reference", model="unet", w_dice=0.5)
    s = settings_from(["--config", path])
    assert (s.model, s.w_dice) == ("unet", 0.5)  # the file's, not the reference recipe's
    s = settings_from(["--config", path, "--recipe", "reference"])
    assert (s.model, s.w_dice) == ("reference", 0.0)  # a recipe given on the command line fills as always


def test_keys_of_other_versions_are_left_out(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({**asdict(TrainSettings(seed=3)), "a_retired_setting": 1}))
    assert settings_from(["--config", str(path)]).seed == 3


@pytest.mark.parametrize("text", ["not json", "[1, 2]"])
def test_a_bad_config_is_one_sentence(tmp_path, text):
    path = tmp_path / "settings.json"
    path.write_text(text)
    with pytest.raises(TrainingError, match="--config"):
        settings_from(["--config", str(path)])
    with pytest.raises(TrainingError, match="cannot read"):
        settings_from(["--config", str(tmp_path / "missing.json")])


def test_a_gpus_default_batch_leaves_each_stage_its_steps(small_shards):
    """On a GPU the default batch is the GPU's unless a stage would then take fewer than
    MIN_STEPS optimizer steps (at least GPU_MIN_BATCH a rank); the CPU's and a given batch stay."""
    from train.main import train_samples
    from train.settings import GPU_BATCH, MIN_STEPS

    assert MIN_STEPS == 1000
    gpu = replace(TrainSettings(), device="cuda", res=(64, 224), epochs=(1.0, 0.1))
    assert [s.batch for s in gpu.stages(32_000, 1)] == [32, 4]  # 1,000 steps; 3,200 samples: the floor
    assert [s.batch for s in gpu.stages(32_000, 2)] == [16, 4]
    assert [s.batch for s in gpu.stages(32_000, 8)] == [4, 4]  # global 32, the CPU's steps
    assert [s.batch for s in replace(gpu, epochs=(5.0, 5.0)).stages(400_000, 8)] == [250, GPU_BATCH[224]]
    assert [s.batch for s in replace(gpu, epochs=(5.0, 5.0)).stages(400_000, 1)] == [GPU_BATCH[64], GPU_BATCH[224]]
    assert [s.batch for s in replace(gpu, batch_size=(512,)).stages(32_000, 1)] == [512, 512]
    assert [s.batch for s in replace(gpu, device="cpu").stages(32_000, 1)] == [16, 8]
    assert train_samples(str(small_shards)) == 36  # 48 samples, a quarter of them validation
