"""pipeline.workers.cpu_share: every threads and workers default is this process's share of its node."""

import json
import os
import subprocess
import sys

import pytest

from pipeline import workers
from pipeline.workers import cpu_share, node_processes


def test_two_nodes_of_two_ranks_share_their_node_not_the_world(monkeypatch):
    """WORLD_SIZE counts every node; a rank shares its CPUs with LOCAL_WORLD_SIZE processes only."""
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert node_processes() == 2
    assert cpu_share() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # outside torchrun: the process has its CPUs to itself
    assert cpu_share() == 8


def test_more_ranks_than_cpus_still_get_one(monkeypatch):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpu_share() == 1


def test_without_an_affinity_call_the_cpu_count_is_used(monkeypatch):
    monkeypatch.delattr(workers.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_share() == 3


PROBE = """
import json
from pipeline.cli import CPUS
from pipeline.make_dataset import MakeSettings
from pipeline.shard import ShardSettings
from pipeline.workers import cpu_share
print(json.dumps({"share": cpu_share(), "cli": CPUS, "shard": ShardSettings(src=()).workers,
                  "make": MakeSettings(out="x").workers}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity calls on this OS")
def test_a_process_limited_to_one_cpu_defaults_to_one_worker_everywhere():
    """As a SLURM job or a container limits it: os.cpu_count() would still count the machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "WORLD_SIZE")}
    first = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {first}))
    assert json.loads(out.stdout) == {"share": 1, "cli": 1, "shard": 1, "make": 1}
