"""scripts/bench_train.py: a run that overruns its time leaves no process behind (torchrun starts
its workers in sessions of their own, where killing its process group does not reach)."""

import importlib.util
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def running_with(text: str) -> list[int]:
    """Processes whose command line holds `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_a_timed_out_run_leaves_no_trainer_behind(tmp_path):
    bench_train = load_script("bench_train")
    out = tmp_path / "overrun"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="synthetic at 32px ran past 20 s"):
        bench_train.train_rate("synthetic", out, "unused", 32, 2, steps=10 ** 6, ranks=2, timeout=20,
                               train_args=["--precision", "float32"])
    assert time.monotonic() - t0 < 40
    time.sleep(0.5)
    assert running_with(str(out)) == []
