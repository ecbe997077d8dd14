"""What would break or crawl on the first GPU run, seen from the CPU: one GPU per local rank,
every rank's error said, loss constants made once, DDP settings, the GPU batch table, the DALI
size hint, the offline install's join/verify/import check, and gpu_check's arguments, skipping
and report. The GPU tests at the end run on a GPU machine (scripts/gpu_check.sh --stage tests)."""

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from train import dist, precision
from train.losses import LossWeights, _blur_matrix, head_loss
from train.main import TrainSettings
from train.main import main as train_main

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_gpu(monkeypatch):
    """A CPU machine that says it has one GPU, as torchrun's rank 1 of 2 sees it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_setup_stops_every_rank_when_ranks_outnumber_gpus(one_gpu, monkeypatch, local_rank):
    monkeypatch.setenv("LOCAL_RANK", local_rank)  # rank 0 too: it must not wait in init_process_group
    monkeypatch.setattr(torch.cuda, "set_device", lambda *_: pytest.fail("set_device before the check"))
    with pytest.raises(RuntimeError, match=r"2 ranks on this machine but 1 GPU\(s\): start at most 1 .* or pass --device cpu"):
        dist.setup("auto")


def test_cpu_ranks_do_not_count_gpus(one_gpu, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")  # no process group needed for this check
    assert dist.setup("cpu").device.type == "cpu"


def test_rank_1_says_its_own_error(one_gpu, capsys, tmp_path):
    assert train_main(["--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error (rank 1): 2 ranks on this machine but 1 GPU(s)") and err.count("\n") == 1


def test_an_error_after_setup_is_said_by_the_rank_that_has_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("train.main.setup", lambda device: dist.DistContext(1, 1, 2, torch.device("cpu")))
    threads = torch.get_num_threads()  # train() shares the cores among the ranks
    try:
        assert train_main(["--shards", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert err.startswith("error (rank 1): ") and "does not exist" in err


def test_a_store_failing_during_training_is_one_sentence(monkeypatch, capsys, tmp_path):
    """An object store that fails once training has started (here as the loader is built) is the
    store's one sentence, like every other bad input, not a traceback."""
    from pipeline.store import StoreError

    def failing(*_, **__):
        raise StoreError("http://127.0.0.1:9 refused access to s3://bkt/x/train-000000.tar (403).")

    monkeypatch.setattr("train.main.build_loader", failing)
    threads = torch.get_num_threads()
    try:
        assert train_main(["--shards", "s3://bkt/x", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert err == "error: http://127.0.0.1:9 refused access to s3://bkt/x/train-000000.tar (403).\n"


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """--compile-mode reduce-overhead (CUDA graphs) is what torch.compile is given; a mode it does
    not know is refused by the parser."""
    from train.main import Run, settings_from

    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    s = settings_from(["--res", "32", "--batch-size", "2", "--device", "cpu", "--compile", "--compile-mode", "reduce-overhead"])
    run = Run(s, s.stages()[0], dist.DistContext(0, 0, 1, torch.device("cpu")), precision.choose("cpu", "float32"), [None])
    run.wrap()
    assert seen == {"mode": "reduce-overhead"}
    with pytest.raises(SystemExit):
        settings_from(["--compile-mode", "fast"])


def test_loss_constants_are_made_once_per_device(monkeypatch):
    """SSIM's blur matrices are made once per size, device and dtype (a host-to-device copy per
    call would be a stream synchronization on a GPU)."""
    pred, target = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    reference = head_loss(pred, target, LossWeights(w_edge=0))
    assert _blur_matrix(32, pred.device, pred.dtype) is _blur_matrix(32, pred.device, pred.dtype)
    monkeypatch.setattr(torch, "stack", lambda *a, **k: pytest.fail("SSIM window made per call"))
    assert torch.equal(head_loss(pred, target, LossWeights(w_edge=0)), reference)


def test_gpu_batch_defaults_only_on_a_gpu(monkeypatch):
    batches = lambda **kw: [st.batch for st in TrainSettings(res=(64, 128, 224), **kw).stages()]  # noqa: E731
    assert batches(device="cpu") == [16, 16, 8]
    assert batches(device="cuda") == [1024, 256, 128]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert batches() == [1024, 256, 128] and batches(batch_size=(8,)) == [8, 8, 8]
    assert batches(batch_size=(64, 32, 16)) == [64, 32, 16]


def test_ddp_does_not_broadcast_buffers_every_step(tmp_path):
    import socket

    import torch.distributed as tdist

    from train.main import Run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        s = TrainSettings(out=str(tmp_path), device="cpu")
        run = Run(s, s.stages()[0], dist.DistContext(0, 0, 2, torch.device("cpu")), precision.choose("cpu", "float32"), [None])
        model = run.wrap()
        assert getattr(model, "forward_sync_buffers", model.broadcast_buffers) is False
    finally:
        tdist.destroy_process_group()


def test_dali_size_hint_is_the_stored_image_size(small_shards):
    from pipeline.dali_pipeline import BatchFeed, stored_size
    from pipeline.epoch import Deal, order_for, plan
    from pipeline.reader import SampleReader

    p = plan(small_shards, "train", 4, 0, 1, True)
    assert stored_size(BatchFeed(Deal(p, order_for(p, 0)), SampleReader(p.tars, p.indexes, str(small_shards)))) == (96, 96)


# --- offline install ---------------------------------------------------------------------------

def make_bundle(folder: Path, part_bytes: int = 700) -> None:
    """A bundle as scripts/offline_bundle.sh lays it out, holding one tiny wheel of our own."""
    work = folder.parent / "build"
    (work / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(work / "wheels" / "depthseg_probe-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("depthseg_probe.py", "ANSWER = 42\n")
        whl.writestr("depthseg_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: depthseg-probe\nVersion: 1.0\n")
        whl.writestr("depthseg_probe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr("depthseg_probe-1.0.dist-info/RECORD", "")
    (work / "requirements.txt").write_text("depthseg-probe\n")
    (work / "wheels.txt").write_text("depthseg_probe-1.0-py3-none-any.whl\n")
    with tarfile.open(work / "bundle.tar", "w") as tar:
        for name in ("requirements.txt", "wheels.txt", "wheels"):
            tar.add(work / name, name)
    data = (work / "bundle.tar").read_bytes()
    folder.mkdir()
    sums = []
    for i in range(0, len(data), part_bytes):
        name = f"part-{i // part_bytes:02d}"
        (folder / name).write_bytes(data[i:i + part_bytes])
        sums.append(f"{hashlib.sha256(data[i:i + part_bytes]).hexdigest()}  {name}")
    sums.append(f"{hashlib.sha256(data).hexdigest()}  bundle.tar")
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def offline_install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "offline_install.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=300)


def test_offline_install_joins_checks_installs_and_imports(tmp_path):
    make_bundle(tmp_path / "parts")
    assert len(list((tmp_path / "parts").glob("part-*"))) > 2
    r = offline_install(str(tmp_path / "parts"), "--target", str(tmp_path / "site"))
    assert r.returncode == 0, r.stderr
    assert "joined and checked" in r.stdout and "installed 1 wheel(s)" in r.stdout
    assert (tmp_path / "site" / "depthseg_probe.py").read_text() == "ANSWER = 42\n"
    assert r.stdout.strip().splitlines()[-1].startswith("all ") and "nvidia.dali" in r.stdout


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_offline_install_names_a_bad_part(tmp_path, damage):
    make_bundle(tmp_path / "parts")
    part = tmp_path / "parts" / "part-01"
    if damage == "flip":
        part.write_bytes(b"x" + part.read_bytes()[1:])
    else:
        part.unlink()
    r = offline_install(str(tmp_path / "parts"), "--target", str(tmp_path / "site"))
    assert r.returncode == 1 and not (tmp_path / "site").exists()
    assert r.stderr.strip() == f"offline_install: part(s) part-01 of {tmp_path / 'parts'} are missing or damaged " \
                               f"(sha256 differs); send them again."


def test_import_check_names_what_is_missing(monkeypatch):
    check = load_script("check_imports")
    assert {"torch", "albumentations", "nvidia.dali.plugin.pytorch", "click"} <= set(check.project_imports())
    assert "webdataset" not in check.project_imports()  # the format's reference reader, for the tests only
    assert not any(m.split(".")[0] in ("os", "json", "pipeline", "train") for m in check.project_imports())
    assert check.missing(["json", "no_such_module_xyz"]) == {"no_such_module_xyz": "ModuleNotFoundError: No module named 'no_such_module_xyz'"}
    assert "pytest" in check.TEST_NEEDS  # the offline machine runs the suite


FAKE_PIP = """
import json, pathlib, re, sys
args = sys.argv[1:]
with open(sys.argv[0] + ".log", "a") as log:
    log.write(json.dumps(args) + "\\n")
takes_value = {"--report", "--python-version", "--implementation", "--abi", "--platform", "--target", "-d"}
reqs, i = [], 1
while i < len(args):
    if args[i] == "-r":
        reqs += [line.strip() for line in open(args[i + 1]) if line.strip()]
    elif not args[i].startswith("-"):
        reqs.append(args[i])
    i += 2 if args[i] in takes_value | {"-r"} else 1
name = lambda req: re.split(r"[<>=!~ \\[;]", req, maxsplit=1)[0]
if args[0] == "install":  # a resolution: each requirement at 1.0, and what torch brings (sympy)
    got = [name(r) for r in reqs] + (["sympy"] if any(name(r) == "torch" for r in reqs) else [])
    report = {"install": [{"metadata": {"name": n, "version": "1.0"}} for n in got]}
    pathlib.Path(args[args.index("--report") + 1]).write_text(json.dumps(report))
else:  # download: an empty wheel per pinned line
    for r in reqs:
        n, v = r.split("==")
        (pathlib.Path(args[args.index("-d") + 1]) / f"{n.replace('-', '_')}-{v}-py3-none-any.whl").write_bytes(b"")
"""


@pytest.mark.parametrize("pin", [None, "torch==2.10.*"])
def test_offline_bundle_brings_pytest_and_leaves_out_what_the_target_torch_brings(tmp_path, pin):
    """pip replaced by a fake that resolves every requirement to itself (torch also to sympy)."""
    (tmp_path / "pip.py").write_text(FAKE_PIP)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then shift 2; exec {sys.executable} {tmp_path / "pip.py"} "$@"; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), **({"TORCH_PIN": pin} if pin else {})}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "offline_bundle.sh"), str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    resolves = [json.loads(line) for line in (tmp_path / "pip.py.log").read_text().splitlines() if line.startswith('["install"')]
    assert len(resolves) == 2 and all((pin or "torch==2.11.*") in args for args in resolves)  # never the newest torch
    requirements = (tmp_path / "out" / "requirements.txt").read_text().split()
    assert "pytest>=8" in requirements and not any(r.startswith(("moto", "torch")) for r in requirements)
    wheels = (tmp_path / "out" / "wheels.txt").read_text().split()
    assert {"pytest-1.0-py3-none-any.whl", "webdataset-1.0-py3-none-any.whl", "nvidia_dali_cuda130-1.0-py3-none-any.whl"} <= set(wheels)
    assert not any(w.startswith(("torch-", "sympy-", "moto-")) for w in wheels)


# --- gpu_check ---------------------------------------------------------------------------------

@pytest.fixture
def gpu_check():
    return load_script("gpu_check")


def test_gpu_check_arguments(gpu_check, capsys):
    a = gpu_check.parse_args(["out", "--stage", "train", "--res", "64,224"])
    assert (a.stage, a.res, a.out) == ("train", [64, 224], Path("out"))
    assert gpu_check.parse_args(["out"]).stage == "all"
    for bad in (["out", "--stage", "nope"], ["out", "--res", "63"], ["out", "--res", "a,b"], []):
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(bad)
        assert e.value.code == 2
    assert "--res" in capsys.readouterr().err


def test_gpu_check_records_why_pytest_did_not_run(gpu_check, tmp_path, monkeypatch):
    # As on an offline machine without pytest: the reason is on stderr, stdout is empty.
    monkeypatch.setattr(gpu_check, "PYTEST", [sys.executable, "-c", "import sys; sys.exit('No module named pytest')"])
    r = gpu_check.stage_tests(argparse.Namespace(work=tmp_path), gpu_check.Budget(120))
    assert r["error"].startswith("GPU tests: pytest exit 1: No module named pytest; the rest: pytest exit 1: No module")


def test_gpu_check_runs_the_gpu_tests_first_and_keeps_what_a_late_suite_finished(gpu_check, tmp_path, monkeypatch):
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_parts.py").write_text(textwrap.dedent("""
        import time, pytest
        cuda = pytest.mark.skipif(False, reason="needs a GPU")  # as the suite marks them, on a GPU machine
        @cuda
        def test_on_the_gpu(): pass
        def test_on_the_cpu(): pass
        def test_slow(): time.sleep(120)
    """))
    monkeypatch.setattr(gpu_check, "TESTS", str(tests))
    monkeypatch.setattr(gpu_check, "STEP_MIN_S", 1)
    # Started as a background job is (SIGINT ignored, which children inherit): the Ctrl-C that stops
    # the rest must still reach pytest.
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        r = gpu_check.stage_tests(argparse.Namespace(work=tmp_path / "work"), gpu_check.Budget(20))
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert r["parts"]["gpu"]["passed"] == 1 and "error" not in r["parts"]["gpu"]
    assert r["passed"] == ["test_parts::test_on_the_cpu", "test_parts::test_on_the_gpu"]  # the rest's, stopped late
    assert r["error"].startswith("the rest: ran past its ") and r["error"].endswith("the tests it finished are recorded")
    assert r["summary"].startswith("GPU tests: 1 passed, 2 deselected")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without a GPU")
def test_gpu_check_skips_without_a_gpu(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--stage", "loader"],
                       capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert r.returncode == 3 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("gpu_check: skipped loader: no GPU is visible to torch here")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "no GPU" in report["stages"]["loader"]["skipped"] and report["facts"]["gpus"] == 0
    assert "Skipped: loader: no GPU" in (tmp_path / "gpu_check.md").read_text()


def canned(out: Path) -> None:
    """Stage files as two slices on a GPU machine would leave them."""
    facts = {"gpu": "NVIDIA H100 80GB HBM3", "cpus": 16, "torch": "2.11.0+cu130", "torch_cuda": "13.0",
             "dali": ["nvidia-dali-cuda130 2.4.0"], "python": "3.12.3", "gpus": 1}
    loader = {"runs": [
        {"loader": "dali", "batch_size": 256, "samples_per_s": 24000.0, "images_per_s": 96000.0, "hw_decoder_load": None,
         "gpu_peak_gb": 1.2, "gpu_other_gb": 3.4},
        {"loader": "torch", "batch_size": 256, "samples_per_s": 6000.0, "images_per_s": 24000.0, "hw_decoder_load": None},
        {"loader": "dali", "batch_size": 256, "sweep": True, "hw_decoder_load": 0.5, "error": "exit 1: out | of\nmemory"},
        {"loader": "dali", "batch_size": 256, "sweep": True, "hw_decoder_load": 0.0, "samples_per_s": 20000.0,
         "images_per_s": 80000.0}]}
    train = {"runs": [
        {"res": 64, "loader": "synthetic", "compile": False, "batch_size": 1024, "samples_per_s": 30000.0, "gpu_peak_gb": 20.0},
        {"res": 64, "loader": "dali", "compile": False, "batch_size": 1024, "samples_per_s": 24000.0, "gpu_peak_gb": 21.0},
        {"res": 224, "loader": "synthetic", "compile": False, "batch_size": 128, "samples_per_s": 3000.0, "gpu_peak_gb": 30.0},
        {"res": 224, "loader": "dali", "compile": False, "batch_size": 128, "samples_per_s": 2950.0, "gpu_peak_gb": 31.5,
         "gpu_other_gb": 2.0},
        {"res": 224, "loader": "synthetic", "compile": True, "compile_mode": "reduce-overhead", "batch_size": 128,
         "samples_per_s": 3600.0},
        {"res": 224, "loader": "dali", "compile": True, "compile_mode": "reduce-overhead", "batch_size": 128,
         "samples_per_s": 3240.0}]}
    for name, result in (("loader", loader), ("train", train)):
        (out / f"stage_{name}.json").write_text(json.dumps({"stage": name, "facts": facts, "result": result}))


def test_gpu_check_report_from_canned_stages(gpu_check, tmp_path, capsys):
    canned(tmp_path)
    assert gpu_check.main([str(tmp_path), "--report"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    s = report["summary"]
    assert s["dali_224_samples_per_s"] == 24000.0 and s["dali_224_goal_met"]
    assert s["verdicts"]["64"] == {"dali_over_synthetic": 0.8, "bottleneck": "loader"}
    assert s["verdicts"]["224"]["bottleneck"].startswith("model") and not s["dali_never_the_bottleneck"]
    assert s["verdicts"]["224 compile reduce-overhead"] == {"dali_over_synthetic": 0.9, "bottleneck": "loader"}
    assert s["train_224_samples_per_s"] == {"synthetic": 3600.0, "dali": 3240.0} and s["train_224_goal_met"]
    assert not s["train_224_model_goal_met"]  # issue 16's 20,000 samples/s of the model alone
    assert s["epoch_400k_s"] == round(400000 / 3240, 1) and s["epoch_goal_met"] and s["train_peak_gb"] == 31.5
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H100 80GB HBM3; 16 CPUs; torch 2.11.0+cu130" in md
    assert "| dali | 256 | default | 24,000 | 96,000 | 4.00 | 1.20 | 3.40 |" in md
    assert "| dali | 256 | 0.5 | failed: exit 1: out / of memory |" in md  # one row, the table intact
    assert "| 64 | 1024 | no | dali | 24,000 | 0.80 | loader | 21.0 | – |" in md
    assert "| DALI loader at 224 px | ≥ 20,000 samples/s | 24,000 | met |" in md
    assert "| a 224 px epoch of 400k samples | < 3 min | 2.1 min | met |" in md
    assert "| training at 224 px, the model alone (synthetic) | ≥ 20,000 samples/s | 3,600 | not met |" in md
    assert "| 224 | 128 | CUDA graphs (reduce-overhead) | dali | 3,240 | 0.90 | loader | – | – |" in md
    assert "report of 2 stage(s)" in capsys.readouterr().out


def test_gpu_check_shows_a_hw_decoder_load_of_zero_as_zero(gpu_check, tmp_path):
    canned(tmp_path)
    gpu_check.main([str(tmp_path), "--report"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| dali | 256 | 0.0 | 20,000 | 80,000 | 3.33 |" in md and md.count("| dali | 256 | default |") == 1


def test_gpu_check_measures_cuda_graphs_at_224_only(gpu_check):
    runs = gpu_check.train_runs([64, 224])
    assert [(r["res"], gpu_check.variant(r)) for r in runs[::2]] == [
        (64, "eager"), (64, "compile"), (224, "eager"), (224, "compile"), (224, "compile reduce-overhead")]
    assert [r["loader"] for r in runs[:2]] == ["synthetic", "dali"]


def test_gpu_check_times_train_steps_inside_one_epoch(gpu_check, small_shards, tmp_path, monkeypatch):
    assert gpu_check.timed_steps(37) == (36, 9)  # 64 px: the split's 37 batches of 1024, not 40 steps
    assert gpu_check.timed_steps(1000) == (40, 10)
    seen = {}

    def train_rate(loader, out, shards, res, batch, steps, log_every, device, train_args, timeout):
        seen.update(steps=steps, log_every=log_every, train_args=train_args)
        return {"samples_per_s": 1.0}

    what = {"res": 64, "loader": "dali", "compile": True, "compile_mode": "reduce-overhead"}
    r = gpu_check._train(train_rate, what, tmp_path, small_shards, 4, gpu_check.Budget(100))
    epoch = gpu_check.epoch_batches(small_shards, 4)  # 36 training samples: 9 batches of 4
    assert epoch == 9 and r["steps"] == seen["steps"] == 8 < epoch and seen["log_every"] == 2
    assert seen["train_args"] == ["--compile", "--compile-mode", "reduce-overhead"]


def test_gpu_check_predict_stage_runs_issue_12s_comparison_and_reports_it(gpu_check, tmp_path, monkeypatch):
    ran = []
    bench = {"device": "cuda", "pairs": 768, "res": 224, "size": [640, 480], "rounds": 3,
             "pairs_per_s": {"torch bf16 b1": 200.0, "torch bf16 b256": 500.0, "io only b256": 520.0},
             "runners": {"torch bf16 b1": "torch on cuda, bf16 autocast", "torch bf16 b256": "torch on cuda, bf16 autocast",
                         "io only b256": "io only"},
             "skipped": {"onnx": "this onnxruntime has no CUDAExecutionProvider (it has CPUExecutionProvider)"}}
    monkeypatch.setattr(gpu_check, "run_cmd", lambda cmd, budget: ran.append(cmd) or "progress\n" + json.dumps(bench))
    assert gpu_check.stage_predict(None, gpu_check.Budget(100)) == bench
    assert "scripts/bench_predict.py" in " ".join(ran[0]) and ran[0][ran[0].index("--device") + 1] == "cuda"
    assert ran[0][ran[0].index("--batch-sizes") + 1] == "1,256" and ran[0][ran[0].index("--res") + 1] == "224"
    (tmp_path / "stage_predict.json").write_text(json.dumps({"stage": "predict", "facts": {}, "result": bench}))
    gpu_check.main([str(tmp_path), "--report"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| torch bf16 b256 | torch on cuda, bf16 autocast | 500.0 | 2.50 |" in md
    assert "| onnx | skipped: this onnxruntime has no CUDAExecutionProvider (it has CPUExecutionProvider) | | |" in md
    assert "Skipped:" not in md  # the stage ran; only a configuration was left out


@pytest.fixture
def bench_predict():
    return load_script("bench_predict")


def test_bench_predict_on_cuda_runs_onnx_only_with_its_cuda_provider(bench_predict):
    args = bench_predict.parse_args(["--device", "cuda", "--batch-sizes", "1,256"])
    onnx = {"float32": Path("m.onnx"), "fp16": Path("m16.onnx")}
    why = bench_predict.no_cuda_provider(["AzureExecutionProvider", "CPUExecutionProvider"])
    runs, skipped = bench_predict.configs(args, Path("c.pt"), onnx, why)
    assert list(runs) == ["torch b1", "torch b256", "io only b256", "io only b256 no side"]
    assert "no CUDAExecutionProvider" in skipped["onnx"] and bench_predict.no_cuda_provider(["CUDAExecutionProvider"]) is None
    runs, skipped = bench_predict.configs(args, Path("c.pt"), onnx, None)
    assert list(runs)[:5] == ["torch b1", "onnx b1", "torch b256", "onnx b256", "onnx fp16 b256"] and not skipped
    assert runs["onnx b256"] == ({"checkpoint_path": None, "onnx_path": "m.onnx"}, 256)
    cpu, _ = bench_predict.configs(bench_predict.parse_args([]), Path("c.pt"), onnx)
    assert list(cpu) == ["torch b1", "onnx b1", "torch b32", "onnx b32", "onnx fp16 b32", "io only b32", "io only b32 no side"]
    with pytest.raises(SystemExit):
        bench_predict.parse_args(["--device", "tpu"])


# --- on a GPU machine ----------------------------------------------------------------------------

@cuda
def test_gpu_loss_constants_stay_on_the_device():
    pred = torch.rand(2, 1, 32, 32, device="cuda")
    assert _blur_matrix(32, pred.device, pred.dtype).device == pred.device
    assert torch.isfinite(head_loss(pred, torch.rand_like(pred), LossWeights(), bce=True))


@cuda
def test_gpu_dali_decoder_hints_and_memory_report(small_shards):
    from pipeline.bench import bench_loader

    r = bench_loader(str(small_shards), "dali", device="cuda", res=64, batch_size=4, batches=3, warmup=1,
                     hw_decoder_load=0.5)
    assert r["samples_per_s"] > 0 and r["gpu_peak_gb"] >= 0 and r["gpu_other_gb"] > 0


def assert_each_rank_said(stderr: str, ranks: int, sentence: str) -> None:
    """Every rank said `sentence`, but for those torchrun stopped itself once one had failed
    ("Sending process N closing signal"): one still importing then says nothing. At least one
    rank always speaks, and none with a traceback from the project's code."""
    said = [rank for rank in range(ranks) if f"error (rank {rank}): {sentence}" in stderr]
    assert said and len(said) + stderr.count(" closing signal ") >= ranks, stderr
    assert not re.search(r'File "[^"]*/(train|pipeline)/', stderr), stderr  # torchrun's own ChildFailedError one is fine


def test_each_rank_said_allows_only_the_ranks_torchrun_stopped_to_be_silent():
    said = "2 ranks on this machine but 1 GPU(s)"
    assert_each_rank_said(f"error (rank 1): {said}\nerror (rank 0): {said}\n", 2, said)
    assert_each_rank_said(f"error (rank 1): {said}\nW1 api.py:1029] Sending process 7 closing signal SIGTERM\n", 2, said)
    for bad in (f"error (rank 1): {said}\n", f'error (rank 0): {said}\nerror (rank 1): {said}\n  File "{ROOT}/train/dist.py"'):
        with pytest.raises(AssertionError):
            assert_each_rank_said(bad, 2, said)


@cuda
def test_gpu_more_ranks_than_gpus_stops_at_once_with_one_sentence_per_rank(exact_shards, tmp_path):
    n = torch.cuda.device_count() + 1
    # torchrun looks at its workers every --monitor-interval (0.1 s by default) and stops the
    # others once one has failed; 20 s lets every rank import and say its sentence first.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--monitor-interval", "20", "--nproc_per_node", str(n),
           str(ROOT / "train" / "main.py"), "--shards", str(exact_shards), "--out", str(tmp_path / "o"), "--res", "32",
           "--batch-size", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert_each_rank_said(r.stderr, n, f"{n} ranks on this machine but {n - 1} GPU(s)")


def test_valid_is_made_on_the_batchs_own_device():
    """`valid` is built where the batch is (here the meta device, standing in for a GPU): a mask
    made on the host and copied per batch would be a stream synchronization on a GPU."""
    from pipeline.epoch import Plan, to_contract

    images = torch.empty(4, 3, 8, 8, device="meta")
    for train in (True, False):
        plan = Plan(tars=["a.tar"], indexes=["a.idx"], counts=[7], samples=7, rank=0, world_size=1, batch_size=4, train=train)
        batch = to_contract(images, images, torch.empty(4, 2, 8, 8, device="meta"), plan, 1)
        assert batch["valid"].device.type == "meta" and batch["valid"].shape == (4,)
    cpu = to_contract(*(torch.zeros(4, c, 8, 8) for c in (3, 3, 2)), plan, 1)
    assert cpu["valid"].tolist() == [True, True, True, False]  # 7 samples: the last batch's 4th is padding
