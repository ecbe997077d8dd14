"""train/metrics.py: reference definitions on hand-computed cases, accumulation, the table."""

import math

import pytest
import torch

from train.metrics import MetricSums, format_table


def t(rows) -> torch.Tensor:
    """A 1×1×H×W tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def computed(*batches, valid=None) -> dict:
    sums = MetricSums()
    for b in batches:
        sums.update(*b, valid=valid)
    return sums.compute()


def random_batch(n: int, seed: int, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    mask_pred, depth_pred, depth = (torch.rand(n, 1, size, size, generator=g) for _ in range(3))
    mask = (torch.rand(n, 1, size, size, generator=g) > 0.5).float()
    return mask_pred, depth_pred, mask, depth


def test_perfect_prediction():
    _, _, mask, depth = random_batch(3, seed=0)
    m = computed((mask.clone(), depth.clone(), mask, depth))
    for head in ("mask", "depth", "avg"):
        assert m[f"{head}/rms"] == 0.0
        assert m[f"{head}/t1"] == m[f"{head}/t2"] == m[f"{head}/t3"] == 1.0
    assert m["mask/iou"] == 1.0 and m["depth/abs_rel"] == 0.0 and m["samples"] == 3


def test_hand_computed_values():
    # depth pixels (pred, gt) -> ratio after clamping to [0.1, 1]:
    # (0.6, 0.4) 1.5; (0.45, 0.5) 1.11; (0.2, 0.5) 2.5; (0.05 -> 0.1, 0.15) 1.5
    depth_pred, depth = t([[0.6, 0.45], [0.2, 0.05]]), t([[0.4, 0.5], [0.5, 0.15]])
    # mask: pred > 0.5 at (0,0), (0,1); gt > 0.5 at (0,0), (1,0) -> IoU 1/3.
    # ratios (gt 0 -> 0.1): 1/0.9 = 1.11, 0.6/0.1 = 6, 1/0.4 = 2.5, 0.1/0.1 = 1
    mask_pred, mask = t([[0.9, 0.6], [0.4, 0.1]]), t([[1.0, 0.0], [1.0, 0.0]])
    m = computed((mask_pred, depth_pred, mask, depth))
    assert m["depth/rms"] == pytest.approx(math.sqrt((0.04 + 0.0025 + 0.09 + 0.01) / 4))
    assert (m["depth/t1"], m["depth/t2"], m["depth/t3"]) == (0.25, 0.75, 0.75)
    assert m["depth/abs_rel"] == pytest.approx((0.2 / 0.4 + 0.05 / 0.5 + 0.3 / 0.5 + 0.05 / 0.15) / 4)
    assert m["mask/rms"] == pytest.approx(math.sqrt((0.01 + 0.36 + 0.36 + 0.01) / 4))
    assert (m["mask/t1"], m["mask/t2"], m["mask/t3"]) == (0.5, 0.5, 0.5)
    assert m["mask/iou"] == pytest.approx(1 / 3)
    assert m["avg/rms"] == pytest.approx((m["mask/rms"] + m["depth/rms"]) / 2)
    assert m["avg/t1"] == pytest.approx(0.375)


def test_empty_masks_have_iou_one_and_nothing_counted_is_nan():
    zeros = torch.zeros(2, 1, 4, 4)
    m = computed((zeros + 0.1, zeros + 0.5, zeros, zeros + 0.5))
    assert m["mask/iou"] == 1.0
    empty = MetricSums().compute()
    assert math.isnan(empty["depth/rms"]) and math.isnan(empty["mask/iou"]) and empty["samples"] == 0


def test_reduction_is_over_pixels_of_the_set_not_per_batch_means():
    # Batch A: 1 pixel image with error 1; batch B: 1 pixel image with error 0, then 3 more -> rms
    # over the set is sqrt(1/5), whereas averaging per-batch figures would give something else.
    one = torch.ones(1, 1, 1, 1)
    a = (one, one * 0, one, one)           # depth error 1
    b = (torch.ones(4, 1, 1, 1),) * 4      # perfect
    assert computed(a, b)["depth/rms"] == pytest.approx(math.sqrt(1 / 5))


def test_two_halves_equal_one_batch_and_ranks_sum():
    full = random_batch(6, seed=1)
    halves = [tuple(x[:3] for x in full), tuple(x[3:] for x in full)]
    whole = MetricSums()
    whole.update(*full)
    split = MetricSums()
    for h in halves:
        split.update(*h)
    assert torch.allclose(whole.tensor, split.tensor, rtol=1e-12)
    # Two "ranks", each with one half, summed as all_reduce would.
    ranks = [MetricSums(), MetricSums()]
    for r, h in zip(ranks, halves):
        r.update(*h)
    reduced = MetricSums()
    reduced.tensor = ranks[0].tensor + ranks[1].tensor
    a, b = whole.compute(), reduced.compute()
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-12) for k in a)
    assert whole.tensor.dtype == torch.float64


def test_valid_excludes_padded_samples():
    batch = random_batch(4, seed=2)
    batch[1][1] = math.nan  # padding may hold anything; it must not leak into the sums
    valid = torch.tensor([True, False, True, False])
    got = computed(batch, valid=valid)
    expected = computed(tuple(x[valid] for x in batch))
    assert got == pytest.approx(expected) and got["samples"] == 2
    assert computed(batch)["depth/rms"] != pytest.approx(got["depth/rms"])


def test_format_table():
    text = format_table(computed(random_batch(2, seed=3)))
    lines = text.splitlines()
    assert len(lines) == 4
    for header in ("rms", "t<1.25", "t<1.25^2", "t<1.25^3", "IoU", "abs-rel"):
        assert header in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["Mask", "Depth", "Avg"]
    assert lines[1].split()[-1] == "-" and lines[2].split()[-2] == "-"   # no abs-rel / IoU
    assert lines[3].split()[-2:] == ["-", "-"]
    assert all(len(line.split()) == 7 for line in lines[1:])
