"""Model quality at fixed budgets of samples seen, against non-learned baselines, on the val
split and on a held-out set of scenes and objects the training set never shows.

    python scripts/bench_quality.py --work /work/bench/quality --budgets 4k,16k,32k \\
        --variant fast --variant "today@/work/base="

Two seeded procedural datasets are made once in --work (make-dataset → shard): the training
set (--dataset 40k: 100 backgrounds × 100 objects, 38,000 train and 2,000 val samples, so 32k
samples seen is under one epoch and nothing repeats; --dataset 4k6: the 4,608-sample set of
issue 8) and the held-out set (25 other backgrounds × 25 other objects, another seed: 1,250
samples). Each variant is trained at 64 px by train/main.py (torchrun when --ranks > 1) once per
budget of samples seen, each budget a run of its own so its schedule spans it (--epochs is the
budget over the epoch, a fraction where it falls inside one). Every run is scored at its end on
the val split (its own log) and on the held-out set (`depthcli evaluate`), and so are the
baselines: mask = max_c |fg_bg − bg| > t with t chosen on the train split, depth = the train
split's mean depth map. Prints one table (markdown), writes results.json and curves.png
(metrics against samples seen and against minutes of training, a line per variant through the
end of each budget's run) into --work.

--real-bg DIR adds a third set: real photos (any images) as backgrounds with the generator's
objects pasted in (make-dataset --bg-dir: 2 placements of 25 objects on each photo, flipped and
not); its masks are exact, its depth is make-dataset's ground-plane prior for photos without a
depth map, so only its mask figures are reported. scikit-image's wheel carries a dozen
public-domain photos (astronaut, chelsea, coffee, motorcycle_left/right, rocket, ...):
`pip download --no-deps scikit-image` and unzip skimage/data/*.

A variant is a name from VARIANTS, or NAME=FLAGS for any train/main.py flags, e.g.
--variant "fast-lr2e-3=--lr 2e-3"; NAME@CHECKOUT=FLAGS runs another checkout's train/main.py
(e.g. the commit before a change, `git worktree add /work/base REV`), whole epochs only
(at least the budget) when that trainer takes no fractional --epochs. Quality at a number of
samples seen does not depend on the machine's speed, so budgets compare recipes on a busy
machine; minutes are what they were (quote them from a quiet machine). The picture needs
matplotlib (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Named recipes: train/main.py flags. "fast" is the default recipe; the others change one thing
# of "reference" (the seed's recipe) or of "fast", to see what each factor is worth.
VARIANTS = {
    "reference": "--recipe reference",
    "fast": "",
    "fast-diff": "--recipe diff",  # the defaults before the unet model
    "fast-reference-model": "--model reference",
    # one factor of the reference changed at a time
    "ref+cosine": "--recipe reference --schedule cosine --warmup 0.05",
    "ref+adamw": "--recipe reference --optimizer adamw",
    "ref+nodropout": "--recipe reference --dropout 0",
    "ref+prior": "--recipe reference --mask-prior 0.1 --depth-prior 0.5",
    "ref+dice": "--recipe reference --w-dice 1 --no-mask-image-terms",
    "ref+shared-aug": "--recipe reference --aug-shared",
    "ref+no-aug": "--recipe reference --no-augment",
    # one factor of the fast recipe taken back or pushed
    "fast-step": "--schedule step",
    "fast+dropout": "--dropout 0.2",
    "fast-prior": "--mask-prior 0 --depth-prior 0",
    "fast-dice": "--w-dice 0 --mask-image-terms",
    "fast+reference-aug": "--aug-ops hflip,vflip,rotate,color,noise,dropout",  # the default before issue 23
    "fast+indep-aug": "--aug-ops hflip,vflip,rotate,color,noise,dropout --no-aug-shared",
    "fast-lr1e-3": "--lr 1e-3",
    "fast-lr4e-3": "--lr 4e-3",
    "fast-onecycle": "--warmup 0.3",
    "fast-depth-l1": "--w-l1 1.0",
    "fast-b128-sqrt": "--batch-size 128",
    "fast-b128-linear": "--batch-size 128 --lr-scaling linear",
}
DATASETS = {"40k": {"num_bg": 100, "num_fg": 100, "placements": 2, "seed": 0},  # 38,000 train, 2,000 val
            "4k6": {"num_bg": 24, "num_fg": 24, "placements": 4, "seed": 0}}  # issue 8's: 4,378 train, 230 val
HOLDOUT = {"num_bg": 25, "num_fg": 25, "placements": 1, "seed": 1}  # other scenes, other objects: 1,250 samples
REAL_BG = {"num_fg": 25, "placements": 2, "seed": 2}  # objects on each photo of --real-bg
# The held-out sets' columns in the table: (set, metric key, title)
HELD = (("holdout", "mask_iou", "held-out mask IoU"), ("holdout", "depth_rms", "held-out depth rms"),
        ("holdout", "depth_t1", "held-out depth t<1.25"), ("realbg", "mask_iou", "real-bg mask IoU"))


def parse_budget(text: str) -> int:
    return int(float(text[:-1]) * 1000) if text.lower().endswith("k") else int(text)


def run_ranks(command: str) -> int:
    """The torchrun processes of a finished run, from the command its done.json keeps (1 without torchrun)."""
    words = shlex.split(command)
    return int(words[words.index("--nproc_per_node") + 1]) if "--nproc_per_node" in words else 1


def dataset(work: Path, name: str, settings: dict, val_fraction: float = 0.05) -> Path:
    """make-dataset → shard, once; the shards are reused while their manifest is there."""
    from pipeline.make_dataset import MakeSettings, make_dataset
    from pipeline.shard import ShardSettings, shard

    shards = work / name / "shards"
    if not (shards / "manifest.json").is_file():
        make_dataset(MakeSettings(out=str(work / name / "data"), overwrite=True, workers=os.cpu_count() or 1, **settings))
        shard(ShardSettings(src=(str(work / name / "data"),), out=str(shards), shard_size=1000, overwrite=True,
                            val_fraction=val_fraction, workers=os.cpu_count() or 1), log=lambda *_: None)
    return shards


def held_out(out: Path, name: str, shards: Path, res: int, loader: str, checkout: Path) -> dict:
    """The run's last checkpoint on a held-out set (all of it is its "train" split), scored by
    the checkout that trained it, once: kept in the run folder as <name>.json."""
    path = out / f"{name}.json"
    if not path.is_file():
        cmd = [sys.executable, "-m", "train.cli", "evaluate", "--checkpoint", str(out / "last.pt"), "--shards",
               str(shards), "--split", "train", "--res", str(res), "--loader", loader, "--device", "cpu", "--json"]
        done = subprocess.run(cmd, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"evaluate on the {name} set failed:\n{done.stderr[-2000:]}")
        path.write_text(done.stdout.strip().splitlines()[-1])
    return {k.replace("/", "_", 1): v for k, v in json.loads(path.read_text()).items()}


def baselines(shards: Path, device: str, res: int, loader: str):
    """Fitted on the train split, scored on val, through the runs' own loader (the two loaders
    decode and resize a little differently): (the fitted baselines, their val figures)."""
    from pipeline.loaders import build_loader
    from train import baselines as bl

    common = {"res": res, "batch_size": 64, "loader": loader, "device": device, "train": False, "workers": 1}
    t0 = time.time()
    b = bl.fit(build_loader(shards, split="train", **common))
    m = bl.score(b, build_loader(shards, split="val", **common))
    return b, {**m, "threshold": b.threshold, "train_iou": b.train_iou, "wall_s": time.time() - t0}


def score_holdout(fitted, held_out: Path, res: int, loader: str) -> dict:
    """The same fitted baselines on the held-out set (its "train" split is all of it)."""
    from pipeline.loaders import build_loader
    from train import baselines as bl

    return bl.score(fitted, build_loader(held_out, split="train", res=res, batch_size=64, loader=loader, device="cpu",
                                         train=False, workers=1))


def run_folder(a, name: str, budget: int) -> Path:
    return Path(a.work) / "runs" / f"{a.dataset}-{name.partition('@')[0]}-{a.res}px-{budget}"


def run_one(name: str, flags: str, budget: int, a, shards: Path, sets: dict[str, Path]) -> dict:
    """One training run of `budget` samples seen; its val records and its held-out figures."""
    from pipeline.epoch import plan

    name, _, checkout = name.partition("@")
    words = shlex.split(flags)
    batch = int(words[words.index("--batch-size") + 1]) if "--batch-size" in words else a.batch_size
    per_epoch = plan(shards, "train", batch, 0, a.ranks, True).batches * batch * a.ranks
    # The trainer's --epochs: the budget exactly (a fraction of the last epoch), or for another
    # checkout's trainer, which may take whole epochs only, at least the budget.
    epochs = f"{budget / per_epoch:.6g}" if not checkout else str(max(1, math.ceil(budget / per_epoch)))
    out = run_folder(a, name, budget)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.ranks)] if a.ranks > 1
                else [sys.executable])
    trainer = Path(checkout or ROOT) / "train" / "main.py"
    cmd = [*launcher, str(trainer), "--shards", str(shards), "--out", str(out), "--res", str(a.res),
           "--batch-size", str(a.batch_size), "--epochs", str(epochs), "--device", a.device, "--loader", a.loader,
           "--seed", str(a.seed), "--vis-samples", "0", "--log-every", "20", *a.train_args.split(), *shlex.split(flags)]
    if a.workers:
        cmd += ["--workers", str(a.workers)]
    if not (out / "done.json").is_file():  # a finished run is kept: rerunning adds only what is missing
        subprocess.run(["rm", "-rf", str(out)], check=True)
        t0 = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // a.ranks))}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} at {budget} failed:\n{proc.stdout[-3000:]}")
        (out / "done.json").write_text(json.dumps({"wall_s": time.time() - t0, "started": t0, "command": shlex.join(cmd)}))
    done = json.loads((out / "done.json").read_text())
    trained_by = Path(shlex.split(done["command"])[shlex.split(done["command"]).index("--shards") - 1]).parent.parent
    held = {set_name: held_out(out, set_name, path, a.res, a.loader, trained_by) for set_name, path in sets.items()}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    batch = json.loads((out / "settings.json").read_text())["batch_size"]  # a variant may set its own
    global_batch = (batch[0] if isinstance(batch, list) else batch) * run_ranks(done["command"])  # the run's, not today's --ranks
    curve = [{**r, "seen": r["step"] * global_batch} for r in log if r["kind"] == "val"]
    print(f"{name:>16} {budget:>7,}: mask IoU {curve[-1]['mask_iou']:.4f}, depth rms {curve[-1]['depth_rms']:.4f}; "
          f"held out {held['holdout']['mask_iou']:.4f}, {held['holdout']['depth_rms']:.4f} ({done['wall_s']:.0f} s)", flush=True)
    return {"variant": name, "flags": flags, "budget": budget, "epochs": epochs, "final": curve[-1], "held": held,
            "curve": curve, **done}


COLUMNS = (("mask_iou", "mask IoU"), ("mask_rms", "mask rms"), ("depth_rms", "depth rms"),
           ("depth_t1", "depth t<1.25"), ("depth_abs_rel", "depth abs-rel"))


def table(results: list[dict], base: dict, held_base: dict) -> str:
    """Markdown: the baselines, then every run; held-out columns only for the sets that were scored."""
    held = [h for h in HELD if h[0] in held_base]
    cell = lambda d, key: f"{d[key]:.4f}"  # noqa: E731
    head = "| variant | samples seen | " + " | ".join(t for _, t in COLUMNS) + "".join(f" | {t}" for *_, t in held) + " | wall s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + len(held) + 3)]
    lines.append(f"| baselines (threshold {base['threshold']:.2f}, mean depth) | 0 | "
                 + " | ".join(cell(base, k.replace("_", "/", 1)) for k, _ in COLUMNS)
                 + "".join(f" | {cell(held_base[name], k.replace('_', '/', 1))}" for name, k, _ in held) + f" | {base['wall_s']:.0f} |")
    for r in results:
        f = r["final"]
        lines.append(f"| {r['variant']} | {f['seen']:,} | " + " | ".join(cell(f, k) for k, _ in COLUMNS)
                     + "".join(f" | {cell(r['held'][name], k)}" for name, k, _ in held) + f" | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("mask_iou", "mask IoU"), ("depth_rms", "depth rms"), ("depth_t1", "depth t<1.25"))
    xs = (("samples seen", lambda r: r["final"]["seen"]), ("minutes (whole run)", lambda r: r["wall_s"] / 60))
    fig, axes = plt.subplots(len(xs), len(panels), figsize=(5 * len(panels), 4 * len(xs)), squeeze=False)
    names = list(dict.fromkeys(r["variant"] for r in results))
    for i, name in enumerate(names):
        runs = sorted((r for r in results if r["variant"] == name), key=lambda r: r["budget"])
        for row, (xlabel, x) in zip(axes, xs):
            for ax, (key, title) in zip(row, panels):
                ax.plot([x(r) for r in runs], [r["final"][key] for r in runs], "o-", color=f"C{i % 10}", label=name)
                ax.plot([x(r) for r in runs], [r["held"]["holdout"][key] for r in runs], "s--", color=f"C{i % 10}",
                        label=f"{name}, held out")
                longest = runs[-1]  # dotted: its validation after each epoch (on a schedule not yet ended)
                if xlabel.startswith("samples"):
                    points = [(c["seen"], c[key]) for c in longest["curve"]]
                else:  # minutes since the run started (runs recorded before "started" was kept have none)
                    points = [((c["time"] - longest["started"]) / 60, c[key]) for c in longest["curve"] if "started" in longest]
                if len(points) > 1:
                    ax.plot(*zip(*points), ":", color=f"C{i % 10}")
    for row, (xlabel, _) in zip(axes, xs):
        for ax, (key, title) in zip(row, panels):
            ax.axhline(base[key.replace("_", "/", 1)], color="k", ls="--", lw=1, label="baseline (val)")
            ax.set(title=title, xlabel=xlabel, xscale="log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/depthseg-bench-quality", help="dataset, shards, runs, results (default: %(default)s)")
    p.add_argument("--dataset", default="40k", choices=tuple(DATASETS), help="the training set (default: %(default)s)")
    p.add_argument("--real-bg", type=Path, help="a folder of photos: also score on them as backgrounds (mask figures)")
    p.add_argument("--budgets", default="4k,16k,32k", help="samples seen, comma-separated (default: %(default)s)")
    p.add_argument("--variant", action="append", help=f"repeatable: {', '.join(VARIANTS)}, NAME=FLAGS or NAME@CHECKOUT=FLAGS "
                                                      "(default: reference, fast)")
    p.add_argument("--res", type=int, default=64, help="training and validation resolution (default: %(default)s)")
    p.add_argument("--ranks", type=int, default=2, help="torchrun processes (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="per rank (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--loader", default="dali", help="dali or torch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="loader workers per rank; 0 = the trainer's default")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, e.g. several on one GPU (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the trainer's seed (default: %(default)s)")
    p.add_argument("--finished-only", action="store_true", help="train nothing: the table and curves of the runs already done")
    p.add_argument("--train-args", default="", help="more train/main.py flags for every run, e.g. '--precision float32'")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = [(v.split("=", 1)[0], v.split("=", 1)[1]) if "=" in v else (v, VARIANTS[v])
                for v in (a.variant or ["reference", "fast"])]
    budgets = [parse_budget(b) for b in a.budgets.split(",")]
    shards = dataset(work, a.dataset, DATASETS[a.dataset])
    sets = {"holdout": dataset(work, "holdout", HOLDOUT, val_fraction=0)}
    if a.real_bg:
        sets["realbg"] = dataset(work, "realbg", {**REAL_BG, "bg_dir": str(a.real_bg)}, val_fraction=0)
    cached = work / f"baselines-{a.dataset}-{a.res}px-{a.loader}.json"  # the same shards, the same figures: fitted once
    cached_base = json.loads(cached.read_text()) if cached.is_file() else {}
    fitted = None
    if "val" not in cached_base:
        fitted, cached_base["val"] = baselines(shards, "cpu", a.res, a.loader)
        cached_base["threshold_fitted"] = fitted.threshold
    missing = [name for name in sets if name not in cached_base]
    if missing:
        fitted = fitted or baselines(shards, "cpu", a.res, a.loader)[0]  # fitted once: 38,000 samples take minutes
        cached_base.update({name: score_holdout(fitted, sets[name], a.res, a.loader) for name in missing})
    cached.write_text(json.dumps(cached_base))
    base, held_base = cached_base["val"], {name: cached_base[name] for name in sets}
    print(f"baselines: threshold {base['threshold']:.2f} (train IoU {base['train_iou']:.4f}): val mask IoU "
          f"{base['mask/iou']:.4f}, held out {held_base['holdout']['mask/iou']:.4f}; mean depth map: val depth rms "
          f"{base['depth/rms']:.4f}, held out {held_base['holdout']['depth/rms']:.4f}", flush=True)
    jobs = [(name, flags, b) for name, flags in variants for b in budgets]
    if a.finished_only:
        jobs = [j for j in jobs if (run_folder(a, j[0], j[2]) / "done.json").is_file()]
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(lambda j: run_one(*j, a, shards, sets), jobs))
    (work / "results.json").write_text(json.dumps({"baselines": base, "holdout_baselines": held_base, "runs": results,
                                                   "args": vars(a)}, indent=1, default=str))
    print(f"\n{a.ranks} rank(s) x batch {a.batch_size} on {a.device}, {a.res} px, dataset {a.dataset} "
          f"{DATASETS[a.dataset]}, held out {HOLDOUT}\n")
    print(table(results, base, held_base))
    best = max(results, key=lambda r: r["final"]["mask_iou"])
    print(f"\n{len(results)} runs; best mask IoU {best['final']['mask_iou']:.4f} ({best['variant']}, "
          f"{best['final']['seen']:,} samples) vs threshold baseline {base['mask/iou']:.4f}")
    try:
        plot(results, base, work / "curves.png")
        print(f"curves in {work / 'curves.png'}")
    except ImportError:
        print("no curves.png: the picture needs matplotlib (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
