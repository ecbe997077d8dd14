"""One error root: every public error class descends from DepthsegError, and the entry points say
any of them, a new one too, as one sentence with exit code 1."""

import importlib
import inspect
import pkgutil

import pytest
from click.testing import CliRunner

import pipeline
import train
from pipeline.errors import DepthsegError


class BrandNewError(DepthsegError):
    """An error class no entry point has ever heard of."""


def project_modules():
    for package in (pipeline, train):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            yield importlib.import_module(info.name)


# Exceptions that signal, not report: the trainer catches them and says its own sentence.
SIGNALS = {"train.loop.NonFiniteLoss"}


def test_every_public_error_class_descends_from_the_root():
    found = {f"{cls.__module__}.{name}": cls for module in project_modules()
             for name, cls in inspect.getmembers(module, inspect.isclass)
             if not name.startswith("_") and issubclass(cls, Exception) and cls.__module__ == module.__name__}
    assert len(found) >= 15, sorted(found)  # the classes this test was written against, at least
    assert sorted(n for n, cls in found.items() if not issubclass(cls, DepthsegError)) == sorted(SIGNALS)


def test_the_error_root_imports_nothing_of_the_project():
    source = inspect.getsource(importlib.import_module("pipeline.errors"))
    assert "import" not in source.replace("imports nothing", "")


def test_a_new_error_in_a_command_is_one_sentence_and_exit_1(monkeypatch, tmp_path):
    from pipeline import verify
    from pipeline.cli import main as cli

    def fail(*args, **kwargs):
        raise BrandNewError("the brand-new check failed.")

    monkeypatch.setattr(verify, "verify", fail)
    r = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output == "Error: the brand-new check failed.\n"


@pytest.mark.parametrize("where", ["settings_from", "train"])
def test_a_new_error_in_the_trainer_is_one_sentence_and_exit_1(monkeypatch, capsys, tmp_path, where):
    from train import main as trainer

    def fail(*args, **kwargs):
        raise BrandNewError("the brand-new check failed.")

    monkeypatch.setattr(trainer, where, fail)
    assert trainer.main(["--shards", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == "error: the brand-new check failed.\n"
