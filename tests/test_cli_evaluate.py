"""`depthcli evaluate`: with --baseline its last line (the demo's last line) gives the validation
mask IoU and depth rms, each beside its non-learned baseline's; a store that fails under the torch
loader's workers is one sentence. A checkpoint of random weights (test_export's) on exact_shards,
whose mask marks exactly where fg_bg differs from bg, so the threshold baseline is near perfect."""

import json

import pytest
from click.testing import CliRunner

from pipeline import store
from train.cli import main as cli
from test_export import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def evaluate(*args: str) -> str:
    r = CliRunner().invoke(cli, ["evaluate", *args, "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    return r.stdout  # the progress bar is on stderr


def test_baseline_figures_stand_beside_the_models_in_the_last_line(ckpt, exact_shards):
    args = ["--checkpoint", str(ckpt), "--shards", str(exact_shards), "--baseline"]
    lines = evaluate(*args).strip().splitlines()
    m = json.loads(evaluate(*args, "--json"))
    assert lines[-1].startswith("val: 25 samples at 32px, loss ")
    assert (f"mask IoU {m['mask/iou']:.4f} (baseline {m['baseline/mask/iou']:.4f}), "
            f"depth rms {m['depth/rms']:.4f} (baseline {m['baseline/depth/rms']:.4f}) (unet model, step 8)") in lines[-1]
    assert m["baseline/mask/iou"] > 0.9 > m["mask/iou"]  # the baseline's figure, not the model's twice
    assert any(line.startswith("baselines (mask |fg_bg - bg| > ") for line in lines)
    assert "(baseline" not in evaluate("--checkpoint", str(ckpt), "--shards", str(exact_shards)).strip().splitlines()[-1]


@pytest.mark.parametrize("cache", ["off", "on"])
def test_a_failing_store_under_the_torch_loaders_workers_is_one_sentence(ckpt, exact_shards, monkeypatch, tmp_path, cache):
    """s3:// shards whose manifest and listing are served from exact_shards but whose tars cannot
    be read: with the cache off (a ranged GET a sample), the StoreError raised
    in a DataLoader worker (forked, so it has these patches) reaches the user as its one
    sentence, without the worker's traceback; through the cache, the fetch's does."""
    says = "the object store at http://127.0.0.1:9 does not answer; check AWS_ENDPOINT_URL."

    def unreachable(url, *_, **__):
        raise store.StoreError(says)

    monkeypatch.setattr(store, "read_bytes", lambda url: (exact_shards / url.rsplit("/", 1)[1]).read_bytes())
    monkeypatch.setattr(store, "sizes", lambda prefix: {p.name: p.stat().st_size for p in exact_shards.iterdir()})
    monkeypatch.setattr(store, "read_range", unreachable)
    monkeypatch.setattr(store, "download", unreachable)
    r = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(ckpt), "--shards", "s3://depthseg/exact",
                                 "--loader", "torch", "--batch-size", "8",
                                 "--cache-dir", "off" if cache == "off" else str(tmp_path)])
    assert r.exit_code == 1 and r.output.rstrip().endswith(f"Error: {says}"), r.output  # after the progress bar
    assert r.output.count("Error") == 1 and "Traceback" not in r.output, r.output
