"""Time of one training loss call (forward + backward of train.losses.total_loss), median of
--calls after warm-up; the model is left out.

    python scripts/bench_loss.py --device cpu --res 224 --batch-size 16 --calls 50

On a GPU the clock stops only after a synchronize.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from train.losses import LossWeights, total_loss  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1, steadier on a shared machine)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    shape = (a.batch_size, 1, a.res, a.res)
    preds = [torch.rand(shape, generator=g).to(a.device).requires_grad_() for _ in range(2)]
    targets = [torch.rand(shape, generator=g).to(a.device) for _ in range(2)]
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(a.calls + 5):
        sync()
        t0 = time.perf_counter()
        loss, _ = total_loss(*preds, *targets, LossWeights())
        loss.backward()
        sync()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    print(f"total_loss forward + backward, batch {a.batch_size} at {a.res}px on {a.device}: "
          f"median {statistics.median(times) * 1e3:.2f} ms over {a.calls} calls")


if __name__ == "__main__":
    main()
