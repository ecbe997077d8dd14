"""Shuffle quality of the training order, before and after a change, black-box: each checkout's
train loader (dali and torch, no augmentation) is run in a subprocess of its own for rank r of
world W over a few epochs, each sample it gives is known by a hash of its tensors, and the hashes
are named by the after checkout's keys (its loaders carry batch["keys"]; the before's do not).

Per checkout, loader and world size (figures pooled over ranks and epochs; "rand" is what a
uniformly random order would give):
- same-bg: consecutive samples of a rank's stream whose keys share the background
  (bg003_fg012_T_000004: bg003), and within a batch the pairs that share one;
- spearman: rank correlation of a sample's position in epoch e and in e+1 (position = (step·W +
  rank)·B + place in batch), over samples in both, mean over e (an order that moves whole shards
  keeps a noise of about 1/sqrt(shards) around 0);
- co-batch: pairs sharing a batch in epoch e+1 that shared one in epoch e (rand ≈ (B-1)/(N-1));
- shards/batch: distinct shards a batch reads from (the order's locality; rand: nearly B);
- same rank: samples in epochs e and e+1 that a rank trains both times (rand: 1/W);
- distinct, dups: samples trained per epoch over all ranks (min over epochs), and repeats within
  an epoch (max over epochs). Samples with identical tensors (the generator's placements can
  coincide at a small --size) are one sample, named by the first of their keys, that may appear
  as often as it has keys.

    D=/work/t22/orderset  # 3,800 train samples in 38 shards
    .venv/bin/depthcli make-dataset --out $D/set.zip --num-bg 20 --num-fg 20 --placements 5 --size 64
    .venv/bin/depthcli shard --src $D/set.zip --out $D/shards --shard-size 100 --val-fraction 0.05
    .venv/bin/python scripts/bench_order.py --data $D --before /work/prev22 --after /work/main \
        --worlds 1,2 --epochs 3 --json /work/t22/order_bench.json

Each run imports the package of its checkout (cwd and PYTHONPATH set to it), by running this
file again with --emit; the samples are read at res 32 with 1 worker, seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROLES = ("bg", "fg_bg", "mask", "depth")
RES, WORKERS, SEED = 32, 1, 0


# ---- in the checkout's own process ---------------------------------------------------------

def digest(batch: dict, i: int) -> str:
    import hashlib

    data = b"".join(batch[r][i].cpu().contiguous().numpy().tobytes() for r in ROLES)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def emit(a) -> None:
    """Writes JSON to a.out: "map" (world 0: [hash, key] of every train sample once, in shard
    order) or "epochs" ([epoch][rank][batch] of hashes, and the loader's own keys if it has them)."""
    import pipeline
    from pipeline.augment import Augment
    from pipeline.loaders import build_loader

    common = dict(split="train", res=RES, batch_size=a.batch, loader=a.loader, augment=Augment.off(), workers=WORKERS)
    out = {"package": str(Path(pipeline.__file__).parent)}
    if a.world == 0:  # validation mode over the train split: every sample once, unaugmented
        rows = [[digest(b, i), b["keys"][i]] for b in build_loader(a.shards, train=False, **common)
                for i in range(len(b["bg"])) if b["valid"][i]]  # valid=False: padding repeats
        out["map"] = rows
    else:
        hashes = [[None] * a.world for _ in range(a.epochs)]
        keys = [[None] * a.world for _ in range(a.epochs)]
        for r in range(a.world):  # one loader per rank, one after another: the same order as in parallel
            loader = build_loader(a.shards, rank=r, world_size=a.world, seed=SEED, **common)
            for e in range(a.epochs):
                batches = list(loader)
                hashes[e][r] = [[digest(b, i) for i in range(len(b["bg"]))] for b in batches]
                keys[e][r] = [list(b["keys"]) for b in batches] if batches and "keys" in batches[0] else None
            del loader
        out["epochs"], out["keys"] = hashes, keys
    Path(a.out).write_text(json.dumps(out))


# ---- in the benchmark's process ------------------------------------------------------------

def run_checkout(checkout: str, shards: str, loader: str, world: int, epochs: int, batch: int) -> dict:
    """This file's --emit in a subprocess that imports `checkout`'s package."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "PYTHONPATH": checkout}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--emit", "--shards", shards, "--loader", loader,
               "--world", str(world), "--epochs", str(epochs), "--batch", str(batch), "--out", f.name]
        subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
        got = json.loads(Path(f.name).read_text())
    if Path(got["package"]).resolve() != (Path(checkout) / "pipeline").resolve():
        raise SystemExit(f"{checkout}: imported {got['package']} instead")
    return got


def key_map(rows: list) -> tuple[dict, list]:
    """hash → key, and the keys that share a hash (identical samples, which hashing cannot tell apart)."""
    names: dict[str, set] = {}
    for h, k in rows:
        names.setdefault(h, set()).add(k)
    return {h: sorted(ks)[0] for h, ks in names.items()}, [sorted(ks) for ks in names.values() if len(ks) > 1]


def shard_of(shards: str, rows: list) -> dict:
    """key → its shard, from the manifest's counts: the map's rows come in shard order."""
    entries = json.loads((Path(shards) / "manifest.json").read_text())["splits"]["train"]["shards"]
    ends = np.cumsum([e["samples"] for e in entries])
    return {k: int(np.searchsorted(ends, i, side="right")) for i, (_, k) in enumerate(rows)}


def name(streams: list, hmap: dict) -> list:
    """[epoch][rank][batch] of hashes → of keys; a hash the map lacks is a failure to identify."""
    missing = {h for ep in streams for rank in ep for b in rank for h in b if h not in hmap}
    if missing:
        raise SystemExit(f"{len(missing)} sample(s) match no key of the unaugmented set")
    return [[[[hmap[h] for h in b] for b in rank] for rank in ep] for ep in streams]


def bg(key: str) -> str:
    return key.split("_", 1)[0]


def pair_share(items: list) -> float:
    """Fraction of pairs of `items` that are equal."""
    n = len(items)
    return sum(c * (c - 1) for c in Counter(items).values()) / (n * (n - 1))


def positions(ep: list) -> dict:
    """key → its first position in the epoch's global stream: (step·W + rank)·B + place."""
    world, pos, out = len(ep), 0, {}
    for step in range(len(ep[0])):
        for r in range(world):
            for k in ep[r][step]:
                out.setdefault(k, pos)
                pos += 1
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))  # positions are distinct: no ties
    return float(np.corrcoef(rx, ry)[0, 1])


def co_batch(prev: list, cur: list) -> float:
    """Pairs sharing a batch in `cur` that shared one in `prev` (batch = one rank's one step)."""
    where = {k: (r, s) for r, rank in enumerate(prev) for s, b in enumerate(rank) for k in b}
    again = total = 0
    for rank in cur:
        for b in rank:
            total += len(b) * (len(b) - 1) // 2
            again += sum(c * (c - 1) // 2 for c in Counter(where.get(k, k) for k in b).values())
    return again / total


def metrics(epochs: list, shard: dict, twins: Counter) -> dict:
    streams = [[sum(rank, []) for rank in ep] for ep in epochs]  # a rank's samples in an epoch, in order
    consec = [bg(a) == bg(b) for ep in streams for s in ep for a, b in zip(s, s[1:])]
    batches = [b for ep in epochs for rank in ep for b in rank]
    pos = [positions(ep) for ep in epochs]
    rho = []
    for p, q in zip(pos, pos[1:]):
        common = sorted(set(p) & set(q))
        rho.append(spearman(np.array([p[k] for k in common]), np.array([q[k] for k in common])))
    trained = [sum(ep, []) for ep in streams]
    ranks = [{k: r for r, s in enumerate(ep) for k in s} for ep in streams]
    kept = [np.mean([p[k] == q[k] for k in set(p) & set(q)]) for p, q in zip(ranks, ranks[1:])]
    return {"same_bg_consecutive": float(np.mean(consec)),
            "same_bg_in_batch": float(np.mean([pair_share([bg(k) for k in b]) for b in batches])),
            "spearman": float(np.mean(rho)), "spearman_each": rho,
            "co_batch": float(np.mean([co_batch(a, b) for a, b in zip(epochs, epochs[1:])])),
            "shards_per_batch": float(np.mean([len({shard[k] for k in b}) for b in batches])),
            "same_rank": float(np.mean(kept)),
            "distinct_each": [len(set(t)) for t in trained], "trained": max(len(t) for t in trained),
            "dups_each": [sum(max(0, c - twins[k]) for k, c in Counter(t).items()) for t in trained],
            "identical_epochs": sum(a == b for a, b in zip(epochs, epochs[1:]))}


def table(results: list, rand: dict) -> str:
    cols = ["checkout", "loader", "W", "same-bg consec", "same-bg batch", "spearman e→e+1", "co-batch",
            "shards/batch", "same rank e→e+1", "distinct", "dups", "identical epochs"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        m = r["metrics"]
        cells = [r["checkout"], r["loader"], r["world"], f"{m['same_bg_consecutive']:.4f}",
                 f"{m['same_bg_in_batch']:.4f}", f"{m['spearman']:+.3f}", f"{m['co_batch']:.4f}",
                 f"{m['shards_per_batch']:.1f}", f"{m['same_rank']:.3f}",
                 f"{min(m['distinct_each'])}/{rand['samples']}",
                 max(m["dups_each"]), m["identical_epochs"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append(f"| random | | | {rand['same_bg']:.4f} | {rand['same_bg']:.4f} | 0 | {rand['co_batch']:.4f} | "
                 f"{rand['shards_per_batch']:.1f} | 1/W | | 0 | 0 |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/t22/orderset", help="folder with shards/ (see the docstring)")
    ap.add_argument("--before", help="the checkout before the change")
    ap.add_argument("--after", help="the checkout with it (its loaders name the samples)")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--loaders", default="dali,torch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", default="")
    ap.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)  # the subprocess's side
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--loader", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.emit:
        return emit(a)
    if not (a.before and a.after):
        ap.error("--before and --after are required")
    shards = str(Path(a.data, "shards").resolve())
    checkouts = {"before": str(Path(a.before).resolve()), "after": str(Path(a.after).resolve())}
    results, maps, collisions = [], {}, {}
    for loader in a.loaders.split(","):
        # Each loader decodes its own way: its own hashes, named by the after checkout.
        rows = run_checkout(checkouts["after"], shards, loader, 0, 0, a.batch)["map"]
        maps[loader], collisions[loader] = key_map(rows)
        shard = shard_of(shards, rows)
        canon = {k: maps[loader][h] for h, k in rows}  # key → the name its tensors go by
        twins = Counter(canon.values())
        for world in map(int, a.worlds.split(",")):
            for label, checkout in checkouts.items():
                t = time.perf_counter()
                got = run_checkout(checkout, shards, loader, world, a.epochs, a.batch)
                epochs = name(got["epochs"], maps[loader])
                own = got["keys"][0][0] is not None and [[[[canon[k] for k in b] for b in rank] for rank in ep]
                                                          for ep in got["keys"]]
                if own and own != epochs:  # a loader that names its samples must agree with the hashes
                    raise SystemExit(f"{label} {loader} W={world}: hashes and batch keys disagree")
                results.append({"checkout": label, "loader": loader, "world": world,
                                "metrics": metrics(epochs, shard, twins), "seconds": round(time.perf_counter() - t, 1)})
                print(f"{label} {loader} W={world}: {results[-1]['seconds']} s", file=sys.stderr)
    keys = [k for _, k in rows]
    n, per_bg, n_shards = len(keys), Counter(bg(k) for k in keys).values(), len(set(shard.values()))
    rand = {"samples": len(set(canon.values())), "same_bg": sum(c * (c - 1) for c in per_bg) / (n * (n - 1)),
            "co_batch": (a.batch - 1) / (n - 1),
            "shards_per_batch": n_shards * (1 - (1 - 1 / n_shards) ** a.batch)}
    print(table(results, rand))
    print(f"\nhash collisions (distinct keys with identical tensors): "
          + ", ".join(f"{k}: {len(v)}" for k, v in collisions.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "random": rand, "collisions": collisions,
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
