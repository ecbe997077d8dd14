"""Small data made on the fly: a procedural dataset, its shards, and a hand-made layout whose mask
marks exactly where fg_bg differs from bg (lossless PNG), for the synchronization tests; a local
S3-compatible server with the shards uploaded, and its request log. Every test's shard cache and
precision cache is under the session's temporary folder, never the user's."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.make_dataset import MakeSettings, make_dataset
from pipeline.shard import ShardSettings, shard

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "depthseg"
CACHE = Path(tempfile.mkdtemp(prefix="depthseg-test-cache-"))
os.environ["DEPTHSEG_CACHE_DIR"] = str(CACHE)  # subprocesses (torchrun) inherit it
# auto precision's timings: measured once per test session, never read from or left in the user's
os.environ["DEPTHSEG_PRECISION_CACHE"] = str(CACHE / "precision.json")


def pytest_unconfigure(config):
    shutil.rmtree(CACHE, ignore_errors=True)


def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def exact_sample(rng: np.random.Generator, bg: np.ndarray, ident: int) -> dict[str, np.ndarray]:
    """fg_bg: bg with a bright rectangle pasted, its blue channel = 100 + ident so a test can tell
    which sample it holds; mask: 255 exactly where fg_bg differs from bg; depth: a left-to-right
    ramp x·255/(size−1), the same function of x as bg's red channel (2x), so a test can check
    that depth and bg went through the same geometry."""
    size = bg.shape[0]
    h, w = rng.integers(size // 6, size // 3, 2)
    y, x = rng.integers(4, size - h - 4), rng.integers(4, size - w - 4)
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + h, x:x + w] = 255
    fg_bg = bg.copy()
    fg_bg[mask > 0] = (250, 250, 100 + ident)
    xx = np.arange(size)[None, :].repeat(size, 0)
    depth = np.round(xx * 255 / (size - 1)).astype(np.uint8)
    return {"fg_bg": fg_bg, "mask": mask, "depth": depth}


def coordinate_bg(size: int, b: int) -> np.ndarray:
    """Red = 2x, green = 2y (where a pixel came from), blue tells the backgrounds apart."""
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([xx * 2, yy * 2, np.full_like(xx, 20 * b)], -1).astype(np.uint8)


def write_layout(zf: zipfile.ZipFile, n_bg: int, per_bg: int, seed: int = 0, size: int = 64) -> list[str]:
    """A zip in the original layout, with PNG images (lossless); returns the keys in order (the
    sample with ident i is keys[i])."""
    rng = np.random.default_rng(seed)
    keys = []
    for b in range(1, n_bg + 1):
        bg = coordinate_bg(size, b)
        zf.writestr(f"bg/bg{b:03d}.png", encode(bg))
        for i in range(per_bg):
            s = exact_sample(rng, bg, len(keys))
            key = f"bg{b:03d}_fg{i + 1:03d}_{'T' if i % 2 else 'F'}_{i:06d}"
            zf.writestr(f"fg_bg/bg{b:03d}/{key}.png", encode(s["fg_bg"]))
            zf.writestr(f"fg_bg_masks/bg{b:03d}/{key}.png", encode(s["mask"]))
            zf.writestr(f"fg_bg_depth/bg{b:03d}/{key}.png", encode(s["depth"]))
            keys.append(key)
    return keys


@pytest.fixture(scope="session")
def small_zip(tmp_path_factory) -> Path:
    """48 procedural samples: 3 backgrounds x 4 foregrounds x 2 flips x 2 placements."""
    out = tmp_path_factory.mktemp("data") / "small.zip"
    make_dataset(MakeSettings(out=str(out), num_bg=3, num_fg=4, placements=2, size=96, workers=2))
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, small_zip) -> Path:
    out = tmp_path_factory.mktemp("shards")
    shard(ShardSettings(src=(str(small_zip),), out=str(out), shard_size=10, val_fraction=0.25, workers=2), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def exact_shards(tmp_path_factory) -> Path:
    """64×64 PNG samples whose mask marks exactly where fg_bg differs from bg: 39 train, 25 val
    (odd, so two ranks get parts of 12 and 13)."""
    root = tmp_path_factory.mktemp("exact")
    src = root / "exact.zip"
    with zipfile.ZipFile(src, "w") as zf:
        write_layout(zf, n_bg=4, per_bg=16)
    out = root / "shards"
    shard(ShardSettings(src=(str(src),), out=str(out), shard_size=8, val_fraction=0.39, workers=1), log=lambda *_: None)
    return out


def dealt_keys(shards: Path, batch: int, seed: int, world: int, epoch: int, first: tuple[int, int] = (0, 0)):
    """keys[i][rank]: what each rank trains on at step i of `epoch` in the order pipeline.epoch deals."""
    from pipeline.epoch import Deal, order_for, plan
    from pipeline.reader import SampleReader

    deals = [Deal(p, order_for(p, seed), first) for p in (plan(shards, "train", batch, r, world, True) for r in range(world))]
    reader = SampleReader(deals[0].plan.tars, deals[0].plan.indexes, str(shards))
    return [[[reader.key(k, j) for k, j in d.samples(epoch, i).tolist()] for d in deals] for i in range(deals[0].batches(epoch))]


def read_trace(path: Path) -> dict[tuple[int, int], dict]:
    """--trace-samples' lines by (step, rank); a step trained again after a kill -9 counts as its last line."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {(t["step"], t["rank"]): t for t in lines}


def child_pids(pid: int) -> list[int]:
    """The worker processes torchrun started (scripts/bench_train.py's walk of /proc)."""
    return _bench_train().children(pid)


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run a Python file from the repository root in its own session; on a timeout its worker
    processes are killed with it. A file, not `-c`: the worker pools import the main script, so a
    patch at its top level reaches the workers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- a local S3-compatible server --------------------------------------------------------------

def _s3_server_module():
    """scripts/s3_server.py (MotoServer, free_port): the benchmarks' server is the tests' too."""
    spec = importlib.util.spec_from_file_location("s3_server", ROOT / "scripts" / "s3_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_server = _s3_server_module()
MotoServer, free_port = _server.MotoServer, _server.free_port


def server_env(server: MotoServer, auth: bool) -> dict:
    """AWS settings for the server, with a user and key made through its IAM when `auth`, and
    the bucket made."""
    import boto3

    env = server.env()
    if auth:  # the first 3 requests, unauthenticated, make a user and its key
        iam = boto3.client("iam", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="x",
                           aws_secret_access_key="x")
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        env = server.env(key["AccessKeyId"], key["SecretAccessKey"])
    boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
    return env


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """The session's server, with IAM checks on."""
    pytest.importorskip("moto", reason="needs moto[server] (pip install -e '.[dev]') for a local S3 server")
    server = MotoServer(tmp_path_factory.mktemp("moto") / "requests.log", auth=True)
    try:
        server.env = server_env(server, auth=True)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(moto) -> dict:
    return moto.env


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    from pipeline import store

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(store, "_clients", {})  # a client made with these settings
    return s3_server


def upload(env: dict, folder: Path, url: str, *args: str) -> None:
    """`depthcli upload` with the server's settings, whatever the test's environment."""
    from click.testing import CliRunner

    from pipeline import store
    from pipeline.cli import main as cli

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    store._clients.clear()
    try:
        r = CliRunner().invoke(cli, ["upload", str(folder), url, *args])
        assert r.exit_code == 0, r.output
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        store._clients.clear()


@pytest.fixture(scope="session")
def s3_shards(s3_server, exact_shards) -> str:
    url = f"s3://{BUCKET}/exact"
    upload(s3_server, exact_shards, url)
    return url


def one_sentence(r) -> str:
    """A CLI result that failed with one sentence and no traceback: that sentence."""
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]  # after a progress bar, if any
    assert "Traceback" not in r.output and last.startswith("Error: ") and last.count(". ") == 0, r.output
    return last
