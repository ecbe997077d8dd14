"""Everything the project promises on a GPU, measured in one command, in slices of under 9 minutes.

    bash scripts/gpu_check.sh OUT_DIR [--stage tests|loader|train|all] [--res 64,128,224]
    python scripts/gpu_check.py OUT_DIR --report     # rebuild the report from OUT_DIR's stage files

Run from the repository root on a machine with an NVIDIA GPU, PyTorch and the project's
dependencies (scripts/offline_install.sh). Stages:
  tests   the whole test suite on the GPU machine (its GPU tests run there, the CPU ones too);
  loader  `depthcli bench` at 224 px, full augmentation: DALI on the GPU against the torch loader
          on the GPU at batch 64 and 256, and DALI's hw_decoder_load swept at batch 256;
  train   train/main.py samples/s at 64, 128 and 224 px (the GPU default batches) for synthetic
          tensors (the model alone) and the DALI loader, without and with --compile, with peak
          memory; the verdict per resolution: DALI / synthetic below 0.95 means the loader is
          the bottleneck.
The loader and train stages make their dataset first (40,000 samples, made and sharded with
every core, kept in --work for the next slice). Each stage writes OUT_DIR/stage_<name>.json with
the GPU's facts (nvidia-smi, torch, DALI, CPUs); every run then rebuilds OUT_DIR/gpu_check.json
(all figures) and OUT_DIR/gpu_check.md (tables for BENCHMARKS.md) from the stage files there, so
slices run on different leases merge when their stage files are put in one folder (--report).
A step that fails is recorded with the end of its output and the others still run.

Exit: 0 every step ran (goals are reported, not asserted); 1 a step failed; 2 bad arguments;
3 no GPU here: the GPU stages were skipped (one sentence says so), and --report still works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

STAGES = ("tests", "loader", "train")
STAGE_BUDGET_S = 510  # each slice stays under 9 minutes, the dataset included
RESOLUTIONS = (64, 128, 224)
DATASET = {"num_bg": 50, "num_fg": 20, "placements": 20}  # 40,000 samples, 224 px
BATCHES = (64, 256)
HW_LOADS = (0.0, 0.5, 0.65, 0.9, 1.0)
COMPILE = (False, True)
DEVICE, TRAIN_STEPS, BENCH_BATCHES = "cuda", 40, (40, 20)  # a CPU smoke run of this script lowers them
GOALS = {"dali_224": 20_000, "train_224": 2_500, "epoch_400k_s": 180, "ratio": 0.95}


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
    if budget.left() < 20:
        raise RuntimeError("not run: the stage's time budget is spent; run this stage again with fewer --res")
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=budget.left())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"ran past the stage's time budget: {' '.join(cmd[-8:])}") from None
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-600:]}")
    return done.stdout


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


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
    xml = a.work / "tests.xml"
    a.work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", f"--junitxml={xml}", "tests"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget.left())
    except subprocess.TimeoutExpired:
        return {"error": f"the test suite ran past {STAGE_BUDGET_S} s"}
    cases = ET.parse(xml).getroot().iter("testcase") if xml.is_file() else []
    out = {"passed": [], "failed": [], "skipped": []}
    for c in cases:
        name = f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}"
        kind = "failed" if c.find("failure") is not None or c.find("error") is not None else \
            "skipped" if c.find("skipped") is not None else "passed"
        out[kind].append(name)
    out = {k: sorted(v) for k, v in out.items()}
    out["summary"] = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode:
        out["error"] = f"pytest exit {done.returncode}: {done.stdout[-800:]}"
    return out


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
    for load in HW_LOADS:
        step(results, budget, {"loader": "dali", "batch_size": BATCHES[-1], "sweep": True}, bench("dali", BATCHES[-1], load))
    return {"runs": results}


def stage_train(a, budget: Budget) -> dict:
    from bench_train import train_rate

    shards, results = dataset(a.work, budget), []
    for res in a.res:
        for compiled in COMPILE:
            for loader in ("synthetic", "dali"):
                what = {"res": res, "loader": loader, "compile": compiled}
                out = a.work / "runs" / f"{loader}-{res}-{'c' if compiled else 'e'}"
                step(results, budget, what, lambda: _train(train_rate, loader, out, shards, res, compiled, budget))
    return {"runs": results}


def _train(train_rate, loader, out, shards, res, compiled, budget: Budget) -> dict:
    if budget.left() < 30:
        raise RuntimeError("not run: the stage's time budget is spent; run --stage train with fewer --res")
    from train.main import TrainSettings

    batch = TrainSettings(res=res, device=DEVICE).batch()
    r = train_rate(loader, out, str(shards), res, batch, steps=TRAIN_STEPS, log_every=TRAIN_STEPS // 4, device=DEVICE,
                   train_args=["--compile"] if compiled else [], timeout=budget.left())
    return {"batch_size": batch, **r}


# --- the report ------------------------------------------------------------------------------

def summarize(stages: dict) -> dict:
    """Goals and verdicts from whatever stages are there."""
    s: dict = {}
    runs = [r for r in stages.get("loader", {}).get("runs", []) if "samples_per_s" in r]
    dali = [r for r in runs if r["loader"] == "dali"]
    if dali:
        best = max(dali, key=lambda r: r["samples_per_s"])
        s["dali_224_samples_per_s"] = best["samples_per_s"]
        s["dali_224_best"] = {"batch_size": best["batch_size"], "hw_decoder_load": best.get("hw_decoder_load")}
        s["dali_224_goal_met"] = best["samples_per_s"] >= GOALS["dali_224"]
    train = [r for r in stages.get("train", {}).get("runs", []) if "samples_per_s" in r]
    verdicts = {}
    for res in sorted({r["res"] for r in train}):
        for compiled in (False, True):
            pair = {r["loader"]: r["samples_per_s"] for r in train if r["res"] == res and r["compile"] == compiled}
            if {"synthetic", "dali"} <= pair.keys():
                ratio = pair["dali"] / pair["synthetic"]
                verdicts[f"{res}{' compile' if compiled else ''}"] = {
                    "dali_over_synthetic": round(ratio, 3),
                    "bottleneck": "model (the loader keeps up)" if ratio >= GOALS["ratio"] else "loader"}
    if verdicts:
        s["verdicts"] = verdicts
        s["dali_never_the_bottleneck"] = all(v["dali_over_synthetic"] >= GOALS["ratio"] for v in verdicts.values())
    at224 = [r for r in train if r["res"] == 224]
    if at224:
        model = max((r["samples_per_s"] for r in at224 if r["loader"] == "synthetic"), default=0)
        with_dali = max((r["samples_per_s"] for r in at224 if r["loader"] == "dali"), default=0)
        s["train_224_samples_per_s"] = {"synthetic": model, "dali": with_dali}
        s["train_224_goal_met"] = with_dali >= GOALS["train_224"]
        if with_dali:
            s["epoch_400k_s"] = round(400_000 / with_dali, 1)
            s["epoch_goal_met"] = s["epoch_400k_s"] < GOALS["epoch_400k_s"]
    peaks = [r["gpu_peak_gb"] for r in train if "gpu_peak_gb" in r]
    if peaks:
        s["train_peak_gb"] = max(peaks)
    return s


def _cell(text: str) -> str:
    """An error message that fits in a table cell."""
    return " ".join(text.replace("|", "/").split())[:100]


def _f(x, fmt="{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    f, stages, s = report.get("facts", {}), report["stages"], report["summary"]
    lines = ["## GPU check (`bash scripts/gpu_check.sh OUT`)", "",
             f"**Machine:** {f.get('gpu') or f.get('nvidia_smi', '?')}; {f.get('cpus')} CPUs; torch {f.get('torch')} "
             f"(CUDA {f.get('torch_cuda')}); {', '.join(f.get('dali') or ['no DALI'])}; Python {f.get('python')}; {f.get('time')}.", ""]
    t = stages.get("tests", {})
    if "summary" in t or "error" in t:
        said = t.get("summary", _cell(t.get("error", "")))
        lines += [f"**Tests:** {said} " + (f"Failed: {', '.join(t['failed'])}." if t.get("failed") else ""), ""]
    loader = stages.get("loader", {}).get("runs", [])
    if loader:
        torch_rate = {r["batch_size"]: r.get("samples_per_s") for r in loader if r["loader"] == "torch"}
        lines += ["Loaders at 224 px, full augmentation, on the GPU (`depthcli bench --device cuda`):", "",
                  "| loader | batch | hw_decoder_load | samples/s | images/s | vs torch | torch peak GB | DALI + other GB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in loader:
            if "error" in r:
                lines.append(f"| {r['loader']} | {r['batch_size']} | {r.get('hw_decoder_load', '')} | failed: {_cell(r['error'])} | | | | |")
                continue
            base = torch_rate.get(r["batch_size"])
            vs = f"{r['samples_per_s'] / base:.2f}" if base and r["loader"] == "dali" else "1.00" if r["loader"] == "torch" else "–"
            lines.append(f"| {r['loader']} | {r['batch_size']} | {r.get('hw_decoder_load') or 'default' if r['loader'] == 'dali' else ''} | "
                         f"{_f(r['samples_per_s'])} | {_f(r['images_per_s'])} | {vs} | {_f(r.get('gpu_peak_gb'), '{:.2f}')} | "
                         f"{_f(r.get('gpu_other_gb'), '{:.2f}')} |")
        lines.append("")
    train = stages.get("train", {}).get("runs", [])
    if train:
        lines += ["Training, one GPU, bf16 + channels_last, the GPU default batch (`scripts/bench_train.py` runs):", "",
                  "| res | batch | compile | loader | samples/s | DALI / synthetic | bottleneck | torch peak GB | DALI + other GB |",
                  "|---:|---:|---|---|---:|---:|---|---:|---:|"]
        for r in train:
            v = s.get("verdicts", {}).get(f"{r['res']}{' compile' if r['compile'] else ''}", {})
            if "error" in r:
                lines.append(f"| {r['res']} | | {'yes' if r['compile'] else 'no'} | {r['loader']} | failed: {_cell(r['error'])} | | | | |")
                continue
            dali = r["loader"] == "dali"
            lines.append(f"| {r['res']} | {r['batch_size']} | {'yes' if r['compile'] else 'no'} | {r['loader']} | "
                         f"{_f(r['samples_per_s'])} | {_f(v.get('dali_over_synthetic') if dali else None, '{:.2f}')} | "
                         f"{v.get('bottleneck', '') if dali else ''} | {_f(r.get('gpu_peak_gb'), '{:.1f}')} | "
                         f"{_f(r.get('gpu_other_gb'), '{:.1f}')} |")
        lines.append("")
    goals = []
    if "dali_224_samples_per_s" in s:
        goals.append(f"| DALI loader at 224 px | ≥ {GOALS['dali_224']:,} samples/s | {_f(s['dali_224_samples_per_s'])} | "
                     f"{'met' if s['dali_224_goal_met'] else 'not met'} |")
    if "dali_never_the_bottleneck" in s:
        worst = min(v["dali_over_synthetic"] for v in s["verdicts"].values())
        goals.append(f"| training with DALI vs synthetic, every resolution | ≥ {GOALS['ratio']} | {worst:.2f} (lowest) | "
                     f"{'met' if s['dali_never_the_bottleneck'] else 'not met'} |")
    if "train_224_samples_per_s" in s:
        goals.append(f"| training at 224 px (DALI) | ≥ {GOALS['train_224']:,} samples/s | "
                     f"{_f(s['train_224_samples_per_s']['dali'])} | {'met' if s['train_224_goal_met'] else 'not met'} |")
    if "epoch_400k_s" in s:
        goals.append(f"| a 224 px epoch of 400k samples | < 3 min | {s['epoch_400k_s'] / 60:.1f} min | "
                     f"{'met' if s['epoch_goal_met'] else 'not met'} |")
    if "train_peak_gb" in s:
        goals.append(f"| peak GPU memory (torch, training) | reported | {s['train_peak_gb']:.1f} GB | – |")
    if goals:
        lines += ["| goal | target | measured | |", "|---|---|---:|---|", *goals, ""]
    skipped = [f"{k}: {v['skipped']}" for k, v in stages.items() if "skipped" in v]
    if skipped:
        lines += [f"Skipped: {'; '.join(skipped)}", ""]
    return "\n".join(lines)


def write_report(out: Path) -> dict:
    """gpu_check.json and gpu_check.md from every stage_*.json in `out` (atomically)."""
    stages, facts_seen = {}, {}
    for path in sorted(out.glob("stage_*.json")):
        data = json.loads(path.read_text())
        stages[data["stage"]] = data["result"]
        facts_seen = data.get("facts", facts_seen)
    report = {"facts": facts_seen, "stages": stages, "summary": summarize(stages), "goals": GOALS}
    for name, text in (("gpu_check.json", json.dumps(report, indent=1) + "\n"), ("gpu_check.md", markdown(report) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return report


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
            result = {"tests": stage_tests, "loader": stage_loader, "train": stage_train}[name](a, budget)
        except Exception as e:  # the dataset could not be made: nothing else of the stage can run
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
