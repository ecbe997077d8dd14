"""scripts/loss_curves.py: a run's losses are read at the samples seen by its global batch
(batch × the ranks of bench_quality's command), and a point logged late says where it is."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fake_run(folder: Path, batch: int, command: str) -> Path:
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps({"batch_size": [batch]}))
    (folder / "done.json").write_text(json.dumps({"command": command, "wall_s": 1.0}))
    steps = [{"kind": "train", "step": s, "loss_mask": s / 1000, "loss_depth": s / 100} for s in (10, 20, 30, 40)]
    steps.append({"kind": "val", "step": 40, "mask_iou": 0.9, "depth_rms": 0.02})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    return folder


def test_losses_are_read_at_the_samples_of_the_global_batch(tmp_path):
    eight = fake_run(tmp_path / "eight", 4, "python -m torch.distributed.run --nproc_per_node 8 train/main.py")
    one = fake_run(tmp_path / "one", 4, "python train/main.py --batch-size 4")
    out = subprocess.run([sys.executable, ROOT / "scripts" / "loss_curves.py", eight, one, "--at", "640,1000"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    # 8 ranks × 4 = 32 a step: 640 samples at step 20, 1,000 first passed at step 40 (1,280: said)
    assert out[2] == "| eight | 32 | 0.020 / 0.200 | 0.040 / 0.400 (at 1,280) | 0.9000 | 0.0200 |"
    # 1 rank × 4: 640 samples are past the last step (160): its last point, and where it is
    assert out[3].startswith("| one | 4 | 0.040 / 0.400 (at 160) |")


def test_a_run_without_bench_qualitys_record_takes_the_ranks_given(tmp_path):
    bare = fake_run(tmp_path / "bare", 16, "unused")
    (bare / "done.json").unlink()  # a train/main.py run of one's own: no command kept
    out = subprocess.run([sys.executable, ROOT / "scripts" / "loss_curves.py", bare, "--at", "640", "--ranks", "2"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[2] == "| bare | 32 | 0.020 / 0.200 | 0.9000 | 0.0200 |"  # 2 × 16: 640 samples at step 20
