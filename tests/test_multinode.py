"""Several nodes, on one machine: two torchrun launchers joined by c10d rendezvous on 127.0.0.1
are two nodes of one process each (gloo, --device cpu)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(node: int, port: int, shards: Path, out: Path, *more: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
           "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "depthseg-test", str(ROOT / "train" / "main.py"), "--shards", str(shards), "--out", str(out),
           "--device", "cpu", "--res", "32", "--batch-size", "4", "--epochs", "1", "--workers", "1", "--log-every", "2", *more]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_nodes(shards: Path, out0: Path, out1: Path, *more: str) -> tuple[list[int], list[str]]:
    port = free_port()
    nodes = [launcher(0, port, shards, out0, *more), launcher(1, port, shards, out1, *more)]
    try:
        outputs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    return [n.returncode for n in nodes], outputs


def test_two_nodes_train_and_validate_and_only_global_rank_0_writes(exact_shards, tmp_path):
    """39 train samples, 2 ranks × batch 4: 4 steps. Node 1 gets its own --out, as a node with its
    own disk would: its process is local rank 0 but global rank 1, so it writes nothing. Resumed
    so, rank 0 would go on from step 4 and rank 1 from 0: both stop with one sentence instead."""
    out0, out1 = tmp_path / "node0", tmp_path / "node1"
    codes, outputs = run_nodes(exact_shards, out0, out1)
    assert codes == [0, 0], outputs
    assert "2 rank(s) on cpu" in outputs[0] and "4 steps per epoch" in outputs[0]
    assert "training" not in outputs[1]  # rank 1 prints nothing
    ckpt = torch.load(out0 / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["world_size"]) == (4, 1, 2)
    # Every val sample once: ranks 0 and 1 read parts of 12 and 13 (both reading rank 0's part,
    # as local ranks would choose, would count 24).
    assert ckpt["metrics"]["samples"] == 25
    records = [json.loads(line) for line in (out0 / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert (out0 / "vis" / "epoch_001.png").is_file() and (out0 / "best.pt").is_file()
    assert not out1.exists()

    codes, outputs = run_nodes(exact_shards, out0, out1, "--resume", "auto", "--epochs", "2")
    assert codes != [0, 0]
    for rank, text in enumerate(outputs):
        assert f"error (rank {rank}): the ranks would resume from different steps (0 to 4)" in text, text
    assert torch.load(out0 / "last.pt")["step"] == 4  # nothing trained out of step
