"""Everything the project promises on a GPU, measured in one command, in slices of under 9 minutes.

    bash scripts/gpu_check.sh OUT_DIR [--stage tests|loader|train|predict|all] [--res 64,128,224]
    python scripts/gpu_check.py OUT_DIR --report     # rebuild the report from OUT_DIR's stage files

Run from the repository root on a machine with an NVIDIA GPU, PyTorch and the project's
dependencies (scripts/offline_install.sh). Stages:
  tests   the test suite on the GPU machine: first the GPU tests (those skipped without CUDA) in
          their own pytest call, then the rest with the time left, so a slow suite cannot cost
          the GPU tests' record;
  loader  `depthcli bench` at 224 px, full augmentation: DALI on the GPU against the torch loader
          on the GPU at batch 64 and 256, and DALI's hw_decoder_load swept at batch 256;
  train   train/main.py samples/s at 64, 128 and 224 px (the GPU default batches) for synthetic
          tensors (the model alone) and the DALI loader, without and with --compile (at 224 px
          also --compile-mode reduce-overhead: CUDA graphs), with peak memory, over 40 steps or
          fewer where an epoch is shorter (timed_steps); the verdict per resolution: DALI /
          synthetic below 0.95 means the loader is the bottleneck;
  predict `depthcli predict`'s pairs/s at 224 px, batch 1 and 256: PyTorch in bf16 against
          onnxruntime's CUDA provider (left out, and said, when the wheel has none).
The loader and train stages make their dataset first (40,000 samples, made and sharded with
every core, kept in --work for the next slice). Each stage writes OUT_DIR/stage_<name>.json with
the GPU's facts (nvidia-smi, torch, DALI, CPUs); every run then rebuilds OUT_DIR/gpu_check.json
(all figures) and OUT_DIR/gpu_check.md (tables for BENCHMARKS.md) from the stage files there, so
slices run on different leases merge when their stage files are put in one folder (--report).
The report and its goals are scripts/gpu_report.py's.
A step that fails is recorded with the end of its output and the others still run.

Exit: 0 every step ran (goals are reported, not asserted); 1 a step failed; 2 bad arguments;
3 no GPU here: the GPU stages were skipped (one sentence says so), and --report still works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_report import variant, write_report  # noqa: E402 (its sibling, found through the line above)

STAGES = ("tests", "loader", "train", "predict")
STAGE_BUDGET_S = 510  # each slice stays under 9 minutes, the dataset included
STEP_MIN_S = 20  # no step starts with less left: it could not finish
RESOLUTIONS = (64, 128, 224)
DATASET = {"num_bg": 50, "num_fg": 20, "placements": 20}  # 40,000 samples, 224 px
BATCHES = (64, 256)
HW_LOADS = (0.0, 0.5, 0.65, 0.9, 1.0)
# --compile-mode per train run: None = eager. CUDA graphs (reduce-overhead) only at 224 px, whose
# batch of 128 is the one most likely launch-bound; last, so a short budget drops them first.
COMPILE_MODES, CUDA_GRAPHS_RES = (None, "default"), (224,)
DEVICE, TRAIN_STEPS, BENCH_BATCHES = "cuda", 40, (40, 20)  # a CPU smoke run of this script lowers them
# The tests stage: the suite's skip mark without CUDA (`reason="needs a GPU"` in tests/test_gpu_ready,
# test_loaders, test_train) is what makes a test a GPU test; they get at most GPU_TESTS_S.
TESTS, PYTEST, GPU_TEST_REASON, GPU_TESTS_S = "tests", [sys.executable, "-m", "pytest"], "needs a GPU", 300
PART_ENV, PARTS = "GPU_CHECK_TESTS", {"gpu": "GPU tests", "rest": "the rest"}
# Issue 12's comparison; --pairs a few batches of 256, so batch 256 is not one call.
PREDICT_ARGS = ["--device", "cuda", "--batch-sizes", "1,256", "--pairs", "768", "--res", "224", "--rounds", "3",
                "--threads", "0"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for stage_*.json, gpu_check.json and gpu_check.md")
    p.add_argument("--stage", choices=STAGES + ("all",), default="all", help="what to run (default: all)")
    p.add_argument("--res", default=",".join(map(str, RESOLUTIONS)),
                   help="train stage: resolutions, comma-separated (default: 64,128,224)")
    p.add_argument("--work", type=Path, default=Path("/tmp/depthseg-gpu-check"),
                   help="dataset, shards and run folders (default: /tmp/depthseg-gpu-check)")
    p.add_argument("--report", action="store_true", help="only rebuild gpu_check.json and .md from OUT's stage files")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = get_args_parser()
    a = p.parse_args(argv)
    try:
        a.res = [int(r) for r in a.res.split(",") if r]
    except ValueError:
        p.error(f"--res takes resolutions like 64,128,224, not {a.res!r}")
    if not a.res or any(r % 4 or r < 16 for r in a.res):
        p.error("--res: each resolution must be a multiple of 4 and at least 16")
    return a


# --- facts and steps -------------------------------------------------------------------------

def facts() -> dict:
    """What machine this is; every field is best effort."""
    f = {"python": platform.python_version(), "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        q = "name,driver_version,memory.total"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        f["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        f["nvidia_smi"] = "nvidia-smi not found" if isinstance(e, OSError) else "nvidia-smi did not answer"
    try:
        import torch

        f["torch"], f["torch_cuda"] = torch.__version__, torch.version.cuda
        f["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if f["gpus"]:
            f["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        f["torch"], f["gpus"] = None, 0
    try:
        from importlib.metadata import distributions

        f["dali"] = sorted(f"{d.metadata['Name']} {d.version}" for d in distributions()
                           if (d.metadata["Name"] or "").startswith("nvidia-dali"))
    except Exception as e:  # metadata of a broken install
        f["dali"] = [f"unreadable ({e})"]
    return f


class Budget:
    """The slice's clock: each step gets what is left, and none starts once it is spent."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_cmd(cmd: list[str], budget: Budget, cwd: Path = ROOT) -> str:
    """Run a step; its stdout, or RuntimeError with the end of its output."""
    if budget.left() < STEP_MIN_S:
        raise RuntimeError("not run: the stage's time budget is spent; run this stage again with fewer --res")
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=budget.left())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"ran past the stage's time budget: {' '.join(cmd[-8:])}") from None
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-600:]}")
    return done.stdout


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "train.cli", *args]


def dataset(work: Path, budget: Budget) -> Path:
    """40,000 samples made and sharded with every core, or the ones an earlier slice made."""
    shards = work / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    cores = str(os.cpu_count() or 1)
    run_cmd(cli("make-dataset", "--out", str(work / "data"), "--workers", cores, "--overwrite",
                *[f"--{k.replace('_', '-')}={v}" for k, v in DATASET.items()]), budget)
    run_cmd(cli("shard", "--src", str(work / "data"), "--out", str(shards), "--workers", cores, "--overwrite"), budget)
    return shards


def step(results: list, budget: Budget, what: dict, fn) -> None:
    """Record one measurement (what + its figures) or its error; never raise."""
    try:
        results.append({**what, **fn()})
    except Exception as e:
        results.append({**what, "error": str(e)})


def stage_tests(a, budget: Budget) -> dict:
    """The GPU tests first, in their own pytest call with at most GPU_TESTS_S, so they are
    recorded whatever the rest does; then the rest with what is left. Both are recorded."""
    a.work.mkdir(parents=True, exist_ok=True)
    parts = {"gpu": run_pytest("gpu", a.work, min(budget.left(), GPU_TESTS_S))}
    parts["rest"] = run_pytest("rest", a.work, budget.left())
    kinds = ("passed", "failed", "skipped")
    out: dict = {k: sorted(name for p in parts.values() for name in p.get(k, [])) for k in kinds}
    out["summary"] = "; ".join(f"{PARTS[k]}: {p.get('summary', 'not run')}" for k, p in parts.items())
    errors = [f"{PARTS[k]}: {p['error']}" for k, p in parts.items() if "error" in p]
    if errors:
        out["error"] = "; ".join(errors)
    out["parts"] = {k: {**{n: v for n, v in p.items() if n not in kinds}, **{n: len(p.get(n, [])) for n in kinds}}
                    for k, p in parts.items()}
    return out


def run_pytest(part: str, work: Path, seconds: float) -> dict:
    """One pytest call over TESTS keeping `part` of it ("gpu" or "rest": see
    pytest_collection_modifyitems below), its JUnit file read. Past `seconds` it gets a Ctrl-C, on
    which pytest still writes the JUnit file of the tests it finished: a slow suite loses only
    what it did not reach."""
    if seconds < STEP_MIN_S:
        return {"error": "not run: the stage's time budget is spent"}
    xml = work / f"tests_{part}.xml"
    xml.unlink(missing_ok=True)
    # `-p gpu_check` loads this file as a plugin: scripts/ goes on the path for it.
    path = os.pathsep.join(filter(None, [str(ROOT / "scripts"), str(ROOT), os.environ.get("PYTHONPATH")]))
    cmd = [*PYTEST, "-q", "-rs", "-p", "gpu_check", f"--junitxml={xml}", TESTS]
    t0 = time.monotonic()
    # Its own session: what a stopped test leaves running (torchrun's workers) goes with it.
    # Ctrl-C handled, not ignored, as pytest starts: a background job (`nohup ... &`) starts with
    # SIGINT ignored, a child inherits that, and pytest would then never stop to write its JUnit.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, PART_ENV: part, "PYTHONPATH": path}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, ignored)
    try:
        out, err = proc.communicate(timeout=seconds)
        late = False
    except subprocess.TimeoutExpired:
        out, err = _interrupt(proc)
        late = True
    result = {**junit(xml), "seconds": round(time.monotonic() - t0, 1)}
    result["summary"] = (out.strip().splitlines() or ["(no output)"])[-1]
    if late:
        result["error"] = f"ran past its {seconds:.0f} s and was stopped; the tests it finished are recorded"
    elif proc.returncode:  # stderr too: "No module named pytest" is said there, stdout is empty
        result["error"] = f"pytest exit {proc.returncode}: {(out[-600:] + err[-600:]).strip()}"
    return result


def _interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    """Ctrl-C for pytest, then whatever is left of its session killed."""
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing was left
        pass
    return out, err


def junit(xml: Path) -> dict:
    """{"passed", "failed", "skipped"}: test names (module::test) from a JUnit file, if there is one."""
    cases = ET.parse(xml).getroot().iter("testcase") if xml.is_file() else []
    out: dict = {"passed": [], "failed": [], "skipped": []}
    for c in (c for c in cases if c.get("name")):  # an interrupted run ends with an empty <testcase/>
        name = f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}"
        kind = "failed" if c.find("failure") is not None or c.find("error") is not None else \
            "skipped" if c.find("skipped") is not None else "passed"
        out[kind].append(name)
    return {k: sorted(v) for k, v in out.items()}


# pytest plugin hooks, active in run_pytest's calls only (`-p gpu_check` with PART_ENV set).

def is_gpu_test(item) -> bool:
    return any(GPU_TEST_REASON in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items) -> None:
    part = os.environ.get(PART_ENV)
    if part not in PARTS:
        return
    keep = [is_gpu_test(item) == (part == "gpu") for item in items]
    config.hook.pytest_deselected(items=[item for item, k in zip(items, keep) if not k])
    items[:] = [item for item, k in zip(items, keep) if k]


def stage_loader(a, budget: Budget) -> dict:
    shards, results = dataset(a.work, budget), []

    def bench(loader, batch, load=None):
        args = ["bench", "--shards", str(shards), "--loader", loader, "--device", DEVICE, "--res", "224",
                "--batch-size", str(batch), "--batches", str(BENCH_BATCHES[batch > 64]), "--json"]
        return lambda: json.loads(run_cmd(cli(*args, *(["--hw-decoder-load", str(load)] if load is not None else [])),
                                          budget).strip().splitlines()[-1])
    for batch in BATCHES:
        for loader in ("dali", "torch"):
            step(results, budget, {"loader": loader, "batch_size": batch}, bench(loader, batch))
    for load in HW_LOADS:  # the load in `what` too: a failed row still says which it was
        step(results, budget, {"loader": "dali", "batch_size": BATCHES[-1], "sweep": True, "hw_decoder_load": load},
             bench("dali", BATCHES[-1], load))
    return {"runs": results}


def stage_train(a, budget: Budget) -> dict:
    from bench_train import train_rate
    from train.settings import default_batch

    shards, results = dataset(a.work, budget), []
    for what in train_runs(a.res):
        batch = default_batch(what["res"], gpu=True)
        out = a.work / "runs" / f"{what['loader']}-{what['res']}-{variant(what).replace(' ', '-')}"
        step(results, budget, what, lambda: _train(train_rate, what, out, shards, batch, budget))
    return {"runs": results}


def train_runs(resolutions: list[int]) -> list[dict]:
    """What the train stage measures, in order: per resolution and compile mode, synthetic then DALI."""
    runs = []
    for res in resolutions:
        for mode in COMPILE_MODES + (("reduce-overhead",) if res in CUDA_GRAPHS_RES else ()):
            for loader in ("synthetic", "dali"):
                runs.append({"res": res, "loader": loader, "compile": mode is not None,
                             **({"compile_mode": mode} if mode else {})})
    return runs


def _train(train_rate, what: dict, out: Path, shards: Path, batch: int, budget: Budget) -> dict:
    if budget.left() < 30:
        raise RuntimeError("not run: the stage's time budget is spent; run --stage train with fewer --res")
    steps, log_every = timed_steps(epoch_batches(shards, batch))
    flags = ["--compile", "--compile-mode", what["compile_mode"]] if what["compile"] else []
    r = train_rate(what["loader"], out, str(shards), what["res"], batch, steps=steps, log_every=log_every, device=DEVICE,
                   train_args=flags, timeout=budget.left())
    return {"batch_size": batch, "steps": steps, **r}


def epoch_batches(shards: Path, batch: int) -> int:
    from pipeline.epoch import plan

    return plan(shards, "train", batch, 0, 1, True).batches


def timed_steps(epoch: int) -> tuple[int, int]:
    """(steps, log_every): four equal logged intervals, all inside the first epoch. bench_train
    averages the rates of the intervals after the first (warm-up) alike, so one spanning an
    epoch's end (a short last interval, the loader starting its next pass) would weigh as much
    as a full one, and for DALI only: synthetic's pass is 50 batches. At 64 px the training split
    is 37 batches of 1024, fewer than TRAIN_STEPS; both loaders take the same steps."""
    log_every = max(1, min(TRAIN_STEPS, epoch - 1) // 4)
    return 4 * log_every, log_every


def stage_predict(a, budget: Budget) -> dict:
    """Issue 12: scripts/bench_predict.py on the GPU, its JSON as it is."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_predict.py"), *PREDICT_ARGS,
           "--workers", str(os.cpu_count() or 1), "--json"]
    return json.loads(run_cmd(cmd, budget).strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    # The project need not be pip-installed: every step (and the tests' own subprocesses) finds it here.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if a.report:
        report = write_report(a.out)
        print(f"gpu_check: report of {len(report['stages'])} stage(s) in {a.out / 'gpu_check.md'}")
        return 0
    f = facts()
    stages = STAGES if a.stage == "all" else (a.stage,)
    if not f.get("gpus"):
        why = f"no GPU is visible to torch here ({f.get('nvidia_smi')})"
        for name in stages:
            (a.out / f"stage_{name}.json").write_text(json.dumps({"stage": name, "facts": f, "result": {"skipped": why}}) + "\n")
        write_report(a.out)
        print(f"gpu_check: skipped {', '.join(stages)}: {why}.", file=sys.stderr)
        return 3
    failed = False
    for name in stages:
        t0 = time.monotonic()
        budget = Budget(STAGE_BUDGET_S)
        try:
            run = {"tests": stage_tests, "loader": stage_loader, "train": stage_train, "predict": stage_predict}[name]
            result = run(a, budget)
        except Exception as e:  # the dataset (or the predict benchmark) failed: nothing else of the stage can run
            result = {"error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.monotonic() - t0, 1)
        failed |= "error" in result or any("error" in r for r in result.get("runs", []))
        (a.out / f"stage_{name}.json").write_text(json.dumps({"stage": name, "facts": f, "result": result}, indent=1) + "\n")
        write_report(a.out)
        print(f"gpu_check: stage {name} done in {result['seconds']:.0f} s{' (with failures)' if failed else ''}", flush=True)
    print(f"gpu_check: {'some steps failed, see' if failed else 'all steps ran; figures in'} {a.out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
