"""depthcli sits above both halves: data commands from pipeline/, model commands from train/, one
group; the data flow runs one way (pipeline/ never imports train/)."""

import importlib
import importlib.util
import subprocess
import sys
import tomllib
from dataclasses import asdict, fields
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["bench", "cache", "evaluate", "export", "make-dataset", "predict", "shard", "upload", "verify"]


def check_imports():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def console_script():
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["depthcli"]
    module, name = target.split(":")
    return module, getattr(importlib.import_module(module), name)


def test_the_console_script_lists_every_command():
    module, cli = console_script()
    assert module.split(".")[0] == "train"  # above both halves: pipeline's group could not hold train's commands
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0, r.output
    listed = r.output.split("Commands:")[1].split()
    assert [c for c in COMMANDS if c not in listed] == []


def test_no_module_of_pipeline_imports_train():
    assert check_imports().backward_imports() == []


def test_a_lazy_import_of_train_in_pipeline_is_found(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "x.py").write_text("def f():\n    from train.model import build_model\n    import train\n")
    assert check_imports().backward_imports(tmp_path) == ["pipeline/x.py:2 imports train.model", "pipeline/x.py:3 imports train"]


def test_the_data_commands_start_without_torch():
    """The model commands load their modules inside each command: make-dataset and shard stay light."""
    code = "import sys, train.cli; print(sorted(m for m in ('torch', 'nvidia.dali') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_loss_weights_come_from_the_settings_by_name():
    """`depthcli evaluate` scores with the loss the run trained on; no weight is lost on the way."""
    from train.evaluate import loss_weights
    from train.losses import LossWeights
    from train.settings import TrainSettings

    s = asdict(TrainSettings())
    assert {f.name for f in fields(LossWeights)} <= set(s)
    s.update(w_ssim=0.5, w_l1=0.25, w_edge=0.0, w_bce=2.0, w_dice=0.0, mask_image_terms=True)
    assert asdict(loss_weights(s)) == {k: s[k] for k in asdict(LossWeights())}
    assert loss_weights({}) == LossWeights()  # an older run's checkpoint without them


def test_option_defaults_are_the_settings_defaults():
    """The shard and make-dataset options show the defaults their settings dataclasses hold."""
    from pipeline.cli import default
    from pipeline.make_dataset import MakeSettings
    from pipeline.shard import ShardSettings

    _, cli = console_script()
    for command, settings in (("shard", ShardSettings), ("make-dataset", MakeSettings)):
        # The options with a value for a default (flags default to False, the others have none).
        options = {p.name: p.default for p in cli.commands[command].params
                   if isinstance(p.default, (int, float, str)) and not isinstance(p.default, bool)}
        shared = [f.name for f in fields(settings) if f.name in options]
        assert len(shared) >= 5
        assert {k: options[k] for k in shared} == {k: default(settings, k) for k in shared}


def test_the_cache_options_say_the_same_in_depthcli_and_the_trainer():
    from pipeline.cache import CACHE_DIR_HELP, CACHE_LIMIT_HELP
    from train.settings import TrainSettings

    _, cli = console_script()
    helps = {p.name: p.help for p in cli.commands["evaluate"].params}
    trainer = {f.name: f.metadata["help"] for f in fields(TrainSettings)}
    assert helps["cache_dir"] == trainer["cache_dir"] == CACHE_DIR_HELP
    assert helps["cache_limit"] == trainer["cache_limit"] == CACHE_LIMIT_HELP
