"""`depthcli`'s data commands: make a dataset, shard it, verify, upload and cache shards, benchmark
loaders. The model commands (evaluate, predict, export) join this group in train/cli.py, where
the console script points: nothing here imports train/.

Every command explains itself with --help, shows a progress bar on long work, ends with a one-line
summary, and on bad input exits non-zero with one sentence instead of a traceback.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import MISSING, fields

import click

from pipeline.cache import CACHE_DIR_HELP, CACHE_LIMIT_HELP
from pipeline.errors import DepthsegError
from pipeline.make_dataset import MakeSettings
from pipeline.shard import ShardSettings
from pipeline.workers import cpu_share

CPUS = cpu_share()


def default(settings, name: str):
    """A settings dataclass's default for `name`: an option shows the value its command will use,
    from the one place that holds it."""
    f = next(f for f in fields(settings) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def user_errors(fn):
    """Our errors (every one a DepthsegError) and OS errors (disk full, permission denied) become one
    line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DepthsegError, ValueError) as e:  # ValueError: bad option values found deep down
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def cache_options(fn):
    """--cache-dir and --cache-limit, for the commands that read shards."""
    fn = click.option("--cache-limit", default="", help=CACHE_LIMIT_HELP)(fn)
    return click.option("--cache-dir", default="", help=CACHE_DIR_HELP)(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """depthseg: foreground mask + monocular depth, from dataset to predictions."""


@main.command("make-dataset")
@click.option("--out", required=True, type=click.Path(), help="Output .zip, or a folder for any other name.")
@click.option("--bg-dir", type=click.Path(exists=True, file_okay=False), help="Background images (depth/<stem>.png beside them is used if present). (default: procedural scenes)")
@click.option("--fg-dir", type=click.Path(exists=True, file_okay=False), help="Foreground cut-outs: RGBA images, or RGB with masks/<stem>.png. (default: procedural figures)")
@click.option("--num-bg", type=int, help="Backgrounds to use. (default: 100, or all of --bg-dir)")
@click.option("--num-fg", type=int, help="Foregrounds to use. (default: 100, or all of --fg-dir)")
@click.option("--placements", default=default(MakeSettings, "placements"), show_default=True, help="Random positions per background, foreground and flip.")
@click.option("--size", default=default(MakeSettings, "size"), show_default=True, help="Side of the square images in pixels.")
@click.option("--quality", default=default(MakeSettings, "quality"), show_default=True, help="JPEG quality of every written image.")
@click.option("--seed", default=default(MakeSettings, "seed"), show_default=True, help="Same seed, same bytes.")
@click.option("--workers", default=default(MakeSettings, "workers"), show_default=True, help="Worker processes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@user_errors
def make_dataset_cmd(**kw):
    """Make a dataset in the original layout (bg/, fg_bg/, fg_bg_masks/, fg_bg_depth/, labels/):
    every foreground pasted at --placements random positions on every background, flipped and not.
    The defaults give the reference's 100 x 100 x 2 x 20 = 400,000 samples."""
    from pipeline.make_dataset import MakeSettings, make_dataset

    r = make_dataset(MakeSettings(**kw))
    click.echo(f"wrote {r['samples']:,} samples ({r['backgrounds']} backgrounds x {r['foregrounds']} foregrounds) "
               f"to {r['out']}, {r['bytes'] / 1e6:,.1f} MB of images")


@main.command("shard")
@click.option("--src", "src", multiple=True, required=True, type=click.Path(), help="A zip or folder in the original layout; repeat for several.")
@click.option("--out", default=default(ShardSettings, "out"), show_default=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--shard-size", default=default(ShardSettings, "shard_size"), show_default=True, help="Samples per shard.")
@click.option("--val-fraction", default=default(ShardSettings, "val_fraction"), show_default=True, help="Fraction of samples for the val split.")
@click.option("--seed", default=default(ShardSettings, "seed"), show_default=True, help="Seed of the shuffle and the split.")
@click.option("--workers", default=default(ShardSettings, "workers"), show_default=True, help="Worker processes.")
@click.option("--strict", is_flag=True, help="Stop at the first bad sample instead of skipping it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing shard set in --out.")
@user_errors
def shard_cmd(src, **kw):
    """Pack datasets in the original layout into shuffled WebDataset shards (depthseg-wds/1) with
    DALI index files and manifest.json. Bad samples are skipped and listed in the manifest."""
    from pipeline.shard import ShardSettings, shard

    m = shard(ShardSettings(src=tuple(src), **kw), log=click.echo)
    t = m["totals"]
    for item in m["skipped"][:10]:
        click.echo(f"skipped {item['key']}: {item['reason']}", err=True)
    if t["skipped"] > 10:
        click.echo(f"... and {t['skipped'] - 10} more, all listed in {kw['out']}/manifest.json", err=True)
    shards = sum(len(v["shards"]) for v in m["splits"].values())
    splits = ", ".join(f"{k} {v['samples']:,}" for k, v in m["splits"].items())
    click.echo(f"packed {t['packed']:,} of {t['found']:,} samples ({splits}; skipped {t['skipped']:,}) into {shards} shards, "
               f"{t['bytes'] / 1e6:,.1f} MB in {t['seconds']:.1f} s ({t['found'] / max(t['seconds'], 1e-9):,.0f} samples/s)")


@main.command("verify")
@click.argument("folder", type=click.Path(), default="shards")  # or s3://bucket/prefix
@click.option("--decode", is_flag=True, help="Also decode every image.")
@click.option("--workers", default=CPUS, show_default=True, help="Worker processes.")
@cache_options
@user_errors
def verify_cmd(folder, decode, workers, cache_dir, cache_limit):
    """Check a shard folder (or s3://bucket/prefix) against its manifest: files, sizes, sha256,
    index files, sample counts and members. Names the first bad shard and exits 1. From s3://,
    shards are checked in the node's shard cache, fetched into it if missing (when the set fits)."""
    from pipeline.verify import verify

    r = verify(folder, decode=decode, workers=workers, cache_dir=cache_dir, cache_limit=cache_limit)
    click.echo(f"ok: {r['shards']} shards, {r['samples']:,} samples, {r['bytes'] / 1e6:,.1f} MB"
               + (", every image decoded" if r["decoded"] else "") + (f", in the shard cache {r['cache']}" if r["cache"] else ""))


@main.command("upload")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("url")
@click.option("--overwrite", is_flag=True, help="Replace a shard set already at URL.")
@user_errors
def upload_cmd(folder, url, overwrite):
    """Copy a finished shard FOLDER to object storage at URL (s3://bucket/prefix): tars and indexes
    first, manifest.json last, so a reader never sees a half set. Endpoint and credentials: the
    standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    from pathlib import Path

    from tqdm import tqdm

    from pipeline.manifest import MANIFEST, read_manifest
    from pipeline.store import is_remote, make_room, upload

    if not is_remote(url):
        raise click.ClickException(f"{url} is not an s3:// URL.")
    entries = [e for v in read_manifest(folder)["splits"].values() for e in v["shards"]]
    names = [e[k] for e in entries for k in ("tar", "index")]
    total = sum((Path(folder) / n).stat().st_size for n in [*names, MANIFEST])
    make_room(url, MANIFEST, overwrite)
    with tqdm(total=total, unit="B", unit_scale=True, desc="upload") as bar:
        sent = upload(Path(folder), url, names, MANIFEST, bar.update)
    click.echo(f"uploaded {len(entries)} shards and their indexes, then {MANIFEST}, to {url}: {sent / 1e6:,.1f} MB")


def resolve_device(name: str) -> str:
    """--device: auto = the GPU if there is one; a cuda asked for without one is one sentence."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise click.ClickException("--device cuda was asked for, but no GPU is available.")
    return name


@main.command("bench")
@click.option("--shards", default="shards", show_default=True, type=click.Path(), help="Shard folder or s3://bucket/prefix.")
@click.option("--loader", type=click.Choice(["dali", "torch", "all"]), default="all", show_default=True,
              help="Loader to time; all = every available one, in this process, with their ratio.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--res", default=224, show_default=True, help="Square resolution the loader resizes to.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--batches", default=50, show_default=True, help="Timed batches, after --warmup.")
@click.option("--warmup", default=5, show_default=True, help="Batches before the clock starts.")
@click.option("--workers", type=int, help="CPU threads (dali) or worker processes (torch). (default: all cores)")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Full training augmentation, or decode and resize only.")
@click.option("--rotate-interp", type=click.Choice(["linear", "nearest"]), default="linear", show_default=True,
              help="Interpolation of bg and fg_bg when rotated (mask and depth: always nearest).")
@click.option("--hw-decoder-load", type=click.FloatRange(0, 1), help="dali on a GPU: share of JPEGs for the hardware decoder. (default: 0.9)")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per loader, for scripts.")
@cache_options
@user_errors
def bench_cmd(loader, as_json, **kw):
    """Time a loader on the train split: samples/s and images/s after warm-up."""
    import json

    from pipeline.bench import bench_loader
    from pipeline.loaders import available_loaders

    kw["device"] = resolve_device(kw["device"])
    names = available_loaders() if loader == "all" else [loader]
    results = [bench_loader(loader=name, **kw) for name in names]
    for r in results:
        click.echo(json.dumps(r) if as_json else
                   f"{r['loader']:5s} {r['device']:6s} res {r['res']} batch {r['batch_size']}"
                   f"{'' if r['augment'] else ' (no augmentation)'}: {r['samples_per_s']:,.0f} samples/s, "
                   f"{r['images_per_s']:,.0f} images/s"
                   + (f"; GPU memory: torch peak {r['gpu_peak_gb']:.1f} GB, DALI and the rest {r['gpu_other_gb']:.1f} GB"
                      if "gpu_peak_gb" in r else ""))
    if len(results) == 2 and not as_json:
        click.echo(f"dali / torch = {results[0]['samples_per_s'] / results[1]['samples_per_s']:.2f}")


@main.group("cache")
def cache_group():
    """The node-local cache of s3:// shards: what it holds (show) and emptying it (clear)."""


@cache_group.command("show")
@click.option("--cache-dir", default="", help=CACHE_DIR_HELP)
@click.option("--cache-limit", default="", help=CACHE_LIMIT_HELP)
@user_errors
def cache_show_cmd(cache_dir, cache_limit):
    """One line per cached shard set (its s3:// prefix, shards, bytes, last use), then the total."""
    import time

    from pipeline.cache import Cache, mb

    cache = Cache(cache_dir or None, cache_limit)
    sets = cache.show()
    for r in sets:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"])) if r["last_used"] else "never"
        click.echo(f"{r['url']} ({r['endpoint']}): {r['shards']} shards, {mb(r['bytes'])}, last used {used}"
                   + (", in use" if r["in_use"] else "") + f"  [{r['dir']}]")
    click.echo(f"{cache.root}: {len(sets)} shard set(s), {mb(cache.used())} of a {mb(cache.limit)} budget")


@cache_group.command("clear")
@click.argument("url", required=False)
@click.option("--cache-dir", default="", help=CACHE_DIR_HELP)
@user_errors
def cache_clear_cmd(url, cache_dir):
    """Remove the cached shards (of URL only, if given) that no running loader uses."""
    from pipeline.cache import Cache, mb

    cache = Cache(cache_dir or None, 0)
    removed, kept = cache.clear(url)
    click.echo(f"removed {removed} shard(s) from {cache.root}" + (f" ({url})" if url else "")
               + (f"; kept {kept} in use" if kept else "") + f"; it now holds {mb(cache.used())}")
