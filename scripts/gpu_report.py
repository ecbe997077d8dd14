"""gpu_check's report: goals and verdicts from its stage files, as gpu_check.json (every figure)
and gpu_check.md (tables for BENCHMARKS.md). scripts/gpu_check.py runs the stages and calls
write_report after each; `python scripts/gpu_check.py OUT_DIR --report` rebuilds it alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# train_224_model: issue 16's, the default model alone (synthetic tensors) at 224 px on one GPU
GOALS = {"dali_224": 20_000, "train_224": 2_500, "train_224_model": 20_000, "epoch_400k_s": 180, "ratio": 0.95}


def variant(r: dict) -> str:
    """"eager", "compile" or "compile reduce-overhead": how a train run ran."""
    mode = r.get("compile_mode", "default")
    return "eager" if not r["compile"] else "compile" if mode == "default" else f"compile {mode}"


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
    for key in dict.fromkeys(verdict_key(r) for r in sorted(train, key=lambda r: r["res"])):
        pair = {r["loader"]: r["samples_per_s"] for r in train if verdict_key(r) == key}
        if {"synthetic", "dali"} <= pair.keys():
            ratio = pair["dali"] / pair["synthetic"]
            verdicts[key] = {
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
        s["train_224_model_goal_met"] = model >= GOALS["train_224_model"]
        if with_dali:
            s["epoch_400k_s"] = round(400_000 / with_dali, 1)
            s["epoch_goal_met"] = s["epoch_400k_s"] < GOALS["epoch_400k_s"]
    peaks = [r["gpu_peak_gb"] for r in train if "gpu_peak_gb" in r]
    if peaks:
        s["train_peak_gb"] = max(peaks)
    return s


def verdict_key(r: dict) -> str:
    """"224", "224 compile", "224 compile reduce-overhead": a synthetic run and a DALI run pair up."""
    return f"{r['res']}{'' if variant(r) == 'eager' else ' ' + variant(r)}"


def _cell(text: str) -> str:
    """An error message that fits in a table cell."""
    return " ".join(text.replace("|", "/").split())[:100]


def _f(x, fmt="{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _goal(what: str, target: str, measured: str, met: bool | None) -> str:
    """A row of the goals table; met None: a figure reported, not judged."""
    return f"| {what} | {target} | {measured} | {'–' if met is None else 'met' if met else 'not met'} |"


def markdown(report: dict) -> str:
    f, stages, s = report.get("facts", {}), report["stages"], report["summary"]
    lines = ["## GPU check (`bash scripts/gpu_check.sh OUT`)", "",
             f"**Machine:** {f.get('gpu') or f.get('nvidia_smi', '?')}; {f.get('cpus')} CPUs; torch {f.get('torch')} "
             f"(CUDA {f.get('torch_cuda')}); {', '.join(f.get('dali') or ['no DALI'])}; Python {f.get('python')}; {f.get('time')}.", ""]
    t = stages.get("tests", {})
    if "summary" in t or "error" in t:
        said = t.get("summary", _cell(t.get("error", "")))
        why = f"Failed: {', '.join(t['failed'])}." if t.get("failed") else f"({_cell(t['error'])})" if "error" in t else ""
        lines += [f"**Tests:** {said} {why}".rstrip(), ""]
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
            load = "" if r["loader"] != "dali" else "default" if r.get("hw_decoder_load") is None else r["hw_decoder_load"]
            lines.append(f"| {r['loader']} | {r['batch_size']} | {load} | "
                         f"{_f(r['samples_per_s'])} | {_f(r['images_per_s'])} | {vs} | {_f(r.get('gpu_peak_gb'), '{:.2f}')} | "
                         f"{_f(r.get('gpu_other_gb'), '{:.2f}')} |")
        lines.append("")
    train = stages.get("train", {}).get("runs", [])
    if train:
        lines += ["Training, one GPU, bf16 + channels_last, the GPU default batch (`scripts/bench_train.py` runs):", "",
                  "| res | batch | compile | loader | samples/s | DALI / synthetic | bottleneck | torch peak GB | DALI + other GB |",
                  "|---:|---:|---|---|---:|---:|---|---:|---:|"]
        for r in train:
            v = s.get("verdicts", {}).get(verdict_key(r), {})
            compiled = {"eager": "no", "compile": "yes"}.get(variant(r), f"CUDA graphs ({r.get('compile_mode')})")
            if "error" in r:
                lines.append(f"| {r['res']} | | {compiled} | {r['loader']} | failed: {_cell(r['error'])} | | | | |")
                continue
            dali = r["loader"] == "dali"
            lines.append(f"| {r['res']} | {r['batch_size']} | {compiled} | {r['loader']} | "
                         f"{_f(r['samples_per_s'])} | {_f(v.get('dali_over_synthetic') if dali else None, '{:.2f}')} | "
                         f"{v.get('bottleneck', '') if dali else ''} | {_f(r.get('gpu_peak_gb'), '{:.1f}')} | "
                         f"{_f(r.get('gpu_other_gb'), '{:.1f}')} |")
        lines.append("")
    lines += predict_lines(stages.get("predict", {}))
    goals = []
    if "dali_224_samples_per_s" in s:
        goals.append(_goal("DALI loader at 224 px", f"≥ {GOALS['dali_224']:,} samples/s", _f(s["dali_224_samples_per_s"]),
                           s["dali_224_goal_met"]))
    if "dali_never_the_bottleneck" in s:
        worst = min(v["dali_over_synthetic"] for v in s["verdicts"].values())
        goals.append(_goal("training with DALI vs synthetic, every resolution", f"≥ {GOALS['ratio']}", f"{worst:.2f} (lowest)",
                           s["dali_never_the_bottleneck"]))
    if "train_224_samples_per_s" in s:
        rates = s["train_224_samples_per_s"]
        goals.append(_goal("training at 224 px (DALI)", f"≥ {GOALS['train_224']:,} samples/s", _f(rates["dali"]),
                           s["train_224_goal_met"]))
        goals.append(_goal("training at 224 px, the model alone (synthetic)", f"≥ {GOALS['train_224_model']:,} samples/s",
                           _f(rates["synthetic"]), s["train_224_model_goal_met"]))
    if "epoch_400k_s" in s:
        goals.append(_goal("a 224 px epoch of 400k samples", "< 3 min", f"{s['epoch_400k_s'] / 60:.1f} min", s["epoch_goal_met"]))
    if "train_peak_gb" in s:
        goals.append(_goal("peak GPU memory (torch, training)", "reported", f"{s['train_peak_gb']:.1f} GB", None))
    if goals:
        lines += ["| goal | target | measured | |", "|---|---|---:|---|", *goals, ""]
    # A stage not run says why in a sentence; the tests stage's "skipped" is a list of tests.
    skipped = [f"{k}: {v['skipped']}" for k, v in stages.items() if isinstance(v.get("skipped"), str)]
    if skipped:
        lines += [f"Skipped: {'; '.join(skipped)}", ""]
    return "\n".join(lines)


def predict_lines(p: dict) -> list[str]:
    """The predict stage's table: pairs/s per configuration, and what was left out and why."""
    if "error" in p:
        return [f"**Predict:** failed: {_cell(p['error'])}", ""]
    if "pairs_per_s" not in p:
        return []
    rates = p["pairs_per_s"]
    base = next(iter(rates.values()))
    lines = [f"`depthcli predict` on the GPU, {p['pairs']} pairs of {p['size'][0]}x{p['size'][1]} JPEGs at {p['res']} px "
             f"(`scripts/bench_predict.py`, median of {p['rounds']} rounds; every configuration reads the JPEGs and "
             f"writes the PNGs: `io only`, no model, is the ceiling that leaves):", "",
             f"| configuration | runner | pairs/s | vs {next(iter(rates))} |", "|---|---|---:|---:|"]
    for name, rate in rates.items():
        lines.append(f"| {name} | {p.get('runners', {}).get(name, '')} | {rate:,.1f} | {rate / base:.2f} |")
    for name, why in p.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {_cell(why)} | | |")
    return lines + [""]


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
