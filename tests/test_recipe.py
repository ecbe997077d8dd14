"""The training recipe: the learning-rate schedule and its scaling, what --recipe and each option
set, the mask loss and head priors, the model variant, the non-learned baselines (exact on a
hand-made case), and a short run that learns beyond the threshold baseline."""

import json
import math
import zipfile

import numpy as np
import pytest
import torch

from pipeline.loaders import build_loader
from pipeline.shard import ShardSettings, shard
from conftest import coordinate_bg, encode
from train import baselines, precision
from train.dist import DistContext
from train.evaluate import loss_weights
from train.losses import LossWeights, dice_loss, head_loss, kl_bce, lovasz_loss
from train.main import main as train_main
from train.run import Run, lr_factor, peak_lr
from train.settings import RECIPES, TrainSettings, settings_from
from train.model import build_model, init_output_bias

CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    s = TrainSettings(schedule="cosine", warmup=0.1)  # 100 steps: 10 of warm-up
    lr = [lr_factor(step, 100, 10, s) for step in range(100)]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)
    assert lr[10] == 1.0  # the peak, where the cosine starts
    assert lr[55] == pytest.approx(0.5)  # half-way through the cosine
    assert lr[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr_factor(100, 100, 10, s) == 0.0  # past the end (a resumed run with more epochs): no negative LR
    assert lr_factor(0, 100, 10, TrainSettings(schedule="cosine", warmup=0)) == 1.0


def test_step_schedule_is_the_reference_steplr():
    s = TrainSettings(schedule="step", lr_step=2, lr_gamma=0.5)
    # 10 steps an epoch: epochs 0-1 at 1, 2-3 at 0.5, 4-5 at 0.25
    assert [lr_factor(step, 60, 10, s) for step in (0, 19, 20, 39, 40, 59)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_lr_scales_with_the_global_batch():
    s = TrainSettings(lr=1e-3, lr_batch=32)
    assert peak_lr(s, 32) == pytest.approx(1e-3)
    assert peak_lr(TrainSettings(lr=1e-3, lr_batch=32, lr_scaling="sqrt"), 128) == pytest.approx(2e-3)
    assert peak_lr(TrainSettings(lr=1e-3, lr_batch=32, lr_scaling="linear"), 128) == pytest.approx(4e-3)
    assert peak_lr(TrainSettings(lr=1e-3, lr_batch=32, lr_scaling="none"), 128) == pytest.approx(1e-3)
    capped = TrainSettings(lr=1e-3, lr_batch=32, lr_scaling="sqrt", lr_max=3e-3)
    assert peak_lr(capped, 128) == pytest.approx(2e-3) and peak_lr(capped, 1024) == pytest.approx(3e-3)
    assert peak_lr(TrainSettings(lr=1e-3, lr_batch=32, lr_scaling="sqrt", lr_max=0), 1024) == pytest.approx(1e-3 * 32 ** 0.5)


def test_the_default_rate_grows_with_the_batch_up_to_its_cap():
    """The default's 4e-3 at a global batch of 32 follows the square root up to 2e-2 (one GPU's
    1,024 would be 2.26e-2) and no further: 8 GPUs' 8,192 would be 6.4e-2."""
    s = TrainSettings()
    assert peak_lr(s, 32) == pytest.approx(4e-3) and peak_lr(s, 512) == pytest.approx(1.6e-2)
    assert peak_lr(s, 1024) == pytest.approx(2e-2) and peak_lr(s, 8192) == pytest.approx(2e-2)
    assert peak_lr(TrainSettings(lr_max=0.0), 8192) == pytest.approx(6.4e-2)  # --lr-max 0: no cap
    assert peak_lr(TrainSettings(lr=5e-2), 32) == peak_lr(TrainSettings(lr=5e-2), 8192) == pytest.approx(5e-2)  # given: kept
    for recipe in ("diff", "reference"):  # the defaults before, exactly: no cap
        assert settings_from(["--recipe", recipe]).lr_max == 0.0


def test_recipe_reference_sets_the_seed_recipe_and_flags_still_win():
    ref = settings_from(["--recipe", "reference"])
    for key, value in RECIPES["reference"].items():
        assert getattr(ref, key) == value
    # The seed's recipe, spelled out (not read back from the table it is checked against).
    assert (ref.model, ref.optimizer, ref.lr, ref.lr_scaling, ref.schedule, ref.lr_step, ref.lr_gamma, ref.warmup) == \
        ("reference", "adam", (1e-3,), "none", "step", 2, 0.5, 0.0)
    assert (ref.dropout, ref.mask_prior, ref.depth_prior, ref.w_dice, ref.w_lovasz, ref.mask_image_terms, ref.aug_shared) == \
        (0.2, 0.0, 0.0, 0.0, 0.0, True, False)
    fast = settings_from([])
    assert fast == TrainSettings() and fast.recipe == "fast"
    assert any(getattr(fast, k) != v for k, v in RECIPES["reference"].items())
    mixed = settings_from(["--recipe", "reference", "--dropout", "0", "--schedule", "cosine"])
    assert (mixed.dropout, mixed.schedule, mixed.optimizer) == (0.0, "cosine", "adam")


def test_aug_ops_choose_the_augmentation_and_reference_keeps_all_of_it(capsys):
    from pipeline.augment import OPS, Augment

    ref = settings_from(["--recipe", "reference"])
    assert ref.augmentation() == Augment(shared=False) and ref.ema == 0.0  # the seed's, whatever the defaults
    off = lambda a: all(v == 0 for k, v in a.to_dict().items() if k.endswith("_p"))  # noqa: E731
    assert off(settings_from([]).augmentation())  # the default: none (the quality benchmark's choice)
    assert settings_from(["--recipe", "diff"]).augmentation() == Augment(shared=True)  # the defaults before the unet
    some = settings_from(["--aug-ops", "hflip,color"]).augmentation()
    assert (some.hflip_p, some.color_p) == (0.5, 0.5) and (some.vflip_p, some.rotate_p, some.noise_p, some.dropout_p) == (0,) * 4
    assert off(settings_from(["--aug-ops", ""]).augmentation())
    assert off(settings_from(["--no-augment", "--aug-ops", ",".join(OPS)]).augmentation())
    assert train_main(["--aug-ops", "hflip,blur", "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: --aug-ops hflip,blur: no op blur; choose from {', '.join(OPS)}.")


def first_stage(argv: list[str], steps_per_epoch: int = 10) -> Run:
    """A Run as the trainer builds it, over a train loader of `steps_per_epoch` batches."""
    s = settings_from(argv)
    return Run(s, s.stages()[0], CPU, precision.choose("cpu", "float32"), [None] * steps_per_epoch)


def test_run_builds_what_the_settings_say():
    ref = first_stage(["--recipe", "reference", "--res", "32", "--batch-size", "8"])
    assert sum(p.numel() for p in ref.raw.parameters()) == 3_165_170  # the seed's network
    assert ref.scheduler.base_lrs == [1e-3]  # Adam at 1e-3 whatever the batch, as the seed
    fast = first_stage(["--res", "32", "--batch-size", "8", "--lr", "2e-3", "--lr-batch", "32"])
    assert type(ref.optimizer) is torch.optim.Adam and type(fast.optimizer) is torch.optim.AdamW
    assert fast.scheduler.base_lrs[0] == pytest.approx(1e-3)  # 2e-3 at 32, sqrt-scaled to a global batch of 8
    assert fast.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(0, 50, 10, fast.s))
    dropouts = {m.p for m in ref.raw.modules() if isinstance(m, torch.nn.Dropout2d)}
    assert dropouts == {0.2} and {m.p for m in fast.raw.modules() if isinstance(m, torch.nn.Dropout2d)} == {0.0}
    assert not ref.weights.w_dice and ref.weights.mask_image_terms
    assert fast.weights.w_dice == 1.0 and not fast.weights.mask_image_terms


def test_sync_bn_on_the_cpu_is_one_sentence(tmp_path, capsys):
    """PyTorch's SyncBatchNorm takes CUDA tensors only: on the CPU the flag is refused up front."""
    assert train_main(["--sync-bn", "--device", "cpu", "--out", str(tmp_path / "r"), "--shards", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: --sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA tensors only; drop it on the CPU."


def test_head_priors_set_the_first_predictions():
    torch.manual_seed(0)
    model = build_model("reference", dropout=0).eval()
    x = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        init_output_bias(model, mask_prior=0.1, depth_prior=0.6)
        mask, depth = model(x)
        assert model.mask_head.out.bias.item() == pytest.approx(math.log(0.1 / 0.9))
        # the weights' contribution is small at init, so the outputs sit near the priors
        assert abs(mask.mean().item() - 0.1) < 0.05 and abs(depth.mean().item() - 0.6) < 0.1
        before = model.depth_head.out.bias.clone()
        init_output_bias(model, mask_prior=0, depth_prior=0)  # 0: left alone
        assert torch.equal(model.depth_head.out.bias, before)


def test_mask_loss_terms():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:8, 4:8] = 1
    pred = torch.full_like(target, 0.25)
    # Dice: 2·(16·0.25) / (256·0.25 + 16) = 8 / 80
    assert dice_loss(pred, target, eps=0) == pytest.approx(1 - 8 / 80)
    assert dice_loss(target, target).item() == pytest.approx(0, abs=1e-7)
    only = LossWeights(w_bce=1.0, w_dice=2.0, mask_image_terms=False)
    assert head_loss(pred, target, only, bce=True) == pytest.approx(kl_bce(pred, target) + 2 * dice_loss(pred, target))
    with_image = LossWeights(w_bce=1.0, w_dice=2.0, mask_image_terms=True)
    assert head_loss(pred, target, with_image, bce=True) > head_loss(pred, target, only, bce=True)
    # the depth head keeps its image terms whatever the mask's setting
    assert head_loss(pred, target, only) == pytest.approx(head_loss(pred, target, with_image))


def test_lovasz_term_is_one_minus_the_batchs_iou_on_hard_masks():
    """On 0/1 predictions the Lovász extension is the set function itself: 1 − IoU of the whole
    batch (the metric's definition); between them it is a convex interpolation with gradient."""
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        pred, target = ((torch.rand(3, 1, 16, 16, generator=g) > q).float() for q in (0.6, 0.7))
        iou = (pred * target).sum() / ((pred + target) > 0).sum()
        assert lovasz_loss(pred, target).item() == pytest.approx(1 - iou.item(), abs=1e-6)
    assert lovasz_loss(target, target).item() == 0.0 and lovasz_loss(1 - target, target).item() == pytest.approx(1.0)
    assert lovasz_loss(target * 0.7 + 0.15, target).item() == pytest.approx(0.15)  # every error 0.15: hull of the vertices
    soft = torch.rand(3, 1, 16, 16, generator=g).requires_grad_()
    lovasz_loss(soft, target).backward()
    assert torch.isfinite(soft.grad).all() and (soft.grad[target > 0.5] <= 0).all() and (soft.grad[target < 0.5] >= 0).all()
    only = LossWeights(w_bce=0.0, w_lovasz=2.0, mask_image_terms=False)
    assert head_loss(soft, target, only, bce=True).item() == pytest.approx(2 * lovasz_loss(soft, target).item())
    assert head_loss(soft, target, only).item() > 0  # the depth head: image terms only, no Lovász


def test_the_default_mask_loss_has_the_lovasz_term_and_the_old_recipes_do_not():
    """The validation loss of the trainer and of evaluate is the run's: its weights by name."""
    assert loss_weights(TrainSettings().__dict__).w_lovasz == 1.0
    for recipe in ("reference", "diff"):
        assert loss_weights(settings_from(["--recipe", recipe]).__dict__).w_lovasz == 0.0
    assert loss_weights({"w_dice": 1.0}).w_lovasz == 0.0  # a run saved before the term trained without it


def test_diff_model_sees_the_change_and_reference_keeps_its_size():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("reference")) == 3_165_170
    assert count(build_model("diff")) == 3_165_170 + 3 * 32 * 9
    model = build_model("diff", dropout=0).eval()
    bg = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        stem_in = []
        model.fg_bg_stem.register_forward_hook(lambda m, i, o: stem_in.append(i[0]))
        model(torch.cat([bg, bg + 0.1], 1))
    assert stem_in[0].shape[1] == 6 and torch.allclose(stem_in[0][:, 3:], torch.full_like(bg, 0.1), atol=1e-6)


# --- baselines ---------------------------------------------------------------------------------

def hand_made_batches():
    """Two 4×4 samples. bg = 0. Sample 0: fg_bg changed by 0.3 on 3 pixels, mask = those 3 plus
    one unchanged pixel. Sample 1: changed by 0.05 (noise) on 2 pixels, by 0.6 on 1, mask = the
    0.6 pixel. Depth: sample 0 all 0.2, sample 1 all 0.6."""
    bg = torch.zeros(2, 3, 4, 4)
    fg_bg = bg.clone()
    mask = torch.zeros(2, 1, 4, 4)
    fg_bg[0, 1, 0, :3] = 0.3  # one channel is enough: the max over channels
    mask[0, 0, 0, :4] = 1
    fg_bg[1, :, 3, :2] = 0.05
    fg_bg[1, 2, 2, 2] = 0.6
    mask[1, 0, 2, 2] = 1
    depth = torch.cat([torch.full((1, 1, 4, 4), 0.2), torch.full((1, 1, 4, 4), 0.6)])
    return [{"bg": bg, "fg_bg": fg_bg, "mask": mask, "depth": depth, "valid": torch.ones(2, dtype=torch.bool)}]


def test_baselines_are_exact_on_a_hand_made_case():
    b = baselines.fit(hand_made_batches(), thresholds=torch.tensor([0.01, 0.1, 0.5]))
    # t = 0.01: 6 predicted, 4 + 1 true, inter 4 → 4 / 7. t = 0.1: inter 4, union 5 → 0.8. t = 0.5: 1 / 5.
    assert b.threshold == pytest.approx(0.1) and b.train_iou == pytest.approx(0.8)
    assert torch.allclose(b.mean_depth, torch.full((1, 4, 4), 0.4))
    m = baselines.score(b, hand_made_batches())
    assert m["mask/iou"] == pytest.approx(0.8)
    assert m["mask/rms"] == pytest.approx(math.sqrt(1 / 32))  # one of 32 pixels wrong
    assert m["depth/rms"] == pytest.approx(0.2) and m["depth/t1"] == 0.0  # 0.4 vs 0.2 and 0.6: ratios 2 and 1.5
    assert m["samples"] == 2


def test_baselines_skip_padding_samples():
    batches = hand_made_batches()
    batches[0]["valid"] = torch.tensor([True, False])
    b = baselines.fit(batches, thresholds=torch.tensor([0.01, 0.1, 0.5]))
    assert b.train_iou == pytest.approx(0.75) and torch.allclose(b.mean_depth, torch.full((1, 4, 4), 0.2))


# --- a short run learns beyond the threshold baseline -----------------------------------------

def checker_sample(rng, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle whose pixels alternate between a bright colour and bg's own (a checkerboard):
    a per-pixel threshold finds half of it at best, a CNN learns to fill the holes."""
    size = bg.shape[0]
    h, w = rng.integers(size // 4, size // 2, 2)
    y, x = rng.integers(2, size - h - 2), rng.integers(2, size - w - 2)
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + h, x:x + w] = 255
    yy, xx = np.mgrid[0:size, 0:size]
    fg_bg = bg.copy()
    fg_bg[(mask > 0) & ((yy + xx) % 2 == 0)] = (250, 240, 30)
    return fg_bg, mask


@pytest.fixture(scope="module")
def checker_shards(tmp_path_factory):
    """32×32 PNG samples (no resizing blurs the checkerboard): 96 train-ish, 32 val-ish."""
    root = tmp_path_factory.mktemp("checker")
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(root / "src.zip", "w") as zf:
        for b in range(1, 5):
            bg = coordinate_bg(32, b) * 3
            zf.writestr(f"bg/bg{b:03d}.png", encode(bg))
            for i in range(32):
                fg_bg, mask = checker_sample(rng, bg)
                key = f"bg{b:03d}_fg{i + 1:03d}_F_{i:06d}"
                zf.writestr(f"fg_bg/bg{b:03d}/{key}.png", encode(fg_bg))
                zf.writestr(f"fg_bg_masks/bg{b:03d}/{key}.png", encode(mask))
                zf.writestr(f"fg_bg_depth/bg{b:03d}/{key}.png", encode(bg[..., 0]))
    out = root / "shards"
    shard(ShardSettings(src=(str(root / "src.zip"),), out=str(out), shard_size=32, val_fraction=0.25, workers=1),
          log=lambda *_: None)
    return out


def test_a_short_run_learns_beyond_the_threshold_baseline(checker_shards, tmp_path):
    common = {"res": 32, "batch_size": 16, "loader": "torch", "train": False, "workers": 1}
    b = baselines.fit(build_loader(checker_shards, split="train", **common))
    base = baselines.score(b, build_loader(checker_shards, split="val", **common))
    assert 0.3 < base["mask/iou"] < 0.6  # half the checkerboard at best
    out = tmp_path / "run"
    assert train_main(["--shards", str(checker_shards), "--out", str(out), "--res", "32", "--batch-size", "16",
                       "--epochs", "12", "--no-augment", "--log-every", "3", "--workers", "1", "--loader", "torch",
                       "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert val[-1]["mask_iou"] > base["mask/iou"] + 0.25, (val[-1]["mask_iou"], base["mask/iou"])
    # The logged learning rate follows the schedule: after step k it is the one for step k.
    s, steps_per_epoch = TrainSettings(), val[0]["step"]
    peak = peak_lr(TrainSettings(), 16)
    for r in (r for r in records if r["kind"] == "train"):
        assert r["lr"] == pytest.approx(peak * lr_factor(r["step"], 12 * steps_per_epoch, steps_per_epoch, s))


def test_bce_gradient_is_finite_where_the_sigmoid_saturates():
    """float32 sigmoid gives exactly 0 and 1 for large logits; the loss and its gradient stay finite."""
    logits = torch.tensor([[[[-120.0, -20.0, 20.0, 120.0]]]], requires_grad=True)
    target = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]]]])
    loss = kl_bce(torch.sigmoid(logits), target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_quality_table_puts_the_baselines_beside_each_run():
    """scripts/bench_quality.py's table: a baselines row first (0 samples seen), then each run's
    final validation and held-out figures, every metric column in the same order."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    bq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bq)
    keys = [k for k, _ in bq.COLUMNS]
    base = {"threshold": 0.12, "wall_s": 3.0, **{k.replace("_", "/", 1): 0.1 * (i + 1) for i, k in enumerate(keys)}}
    held_base = {"holdout": {"mask/iou": 0.7, "depth/rms": 0.8, "depth/t1": 0.9}}  # no real-bg set scored
    run = {"variant": "fast", "wall_s": 99.4, "final": {"seen": 34816, **{k: 0.01 * (i + 1) for i, k in enumerate(keys)}},
           "held": {"holdout": {"mask_iou": 0.02, "depth_rms": 0.04, "depth_t1": 0.06}}}
    lines = bq.table([run], base, held_base).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == len(keys) + 3 + 4 and "real-bg" not in lines[0]
    assert lines[2] == ("| baselines (threshold 0.12, mean depth) | 0 | 0.1000 | 0.2000 | 0.3000 | 0.4000 | 0.5000 | "
                        "0.7000 | 0.8000 | 0.9000 | 3 |")
    assert lines[3] == "| fast | 34,816 | 0.0100 | 0.0200 | 0.0300 | 0.0400 | 0.0500 | 0.0200 | 0.0400 | 0.0600 | 99 |"
    held_base["realbg"], run["held"]["realbg"] = {"mask/iou": 0.5}, {"mask_iou": 0.25}
    lines = bq.table([run], base, held_base).splitlines()
    assert lines[0].endswith("| real-bg mask IoU | wall s |") and lines[3].endswith("| 0.0600 | 0.2500 | 99 |")
    assert bq.parse_budget("4k") == 4000 and bq.parse_budget("32k") == 32000 and bq.parse_budget("500") == 500


def test_a_run_from_before_aug_ops_and_lovasz_goes_on_as_it_trained(tmp_path):
    """Settings saved before --aug-ops and --w-lovasz existed (no such keys) trained with the
    reference's ops and no Lovász term: --resume and --config keep both, where today's defaults
    are no ops and the term."""
    from dataclasses import asdict

    from pipeline.augment import OPS
    from train import checkpoint

    old = {k: v for k, v in asdict(TrainSettings(out=str(tmp_path / "old"))).items() if k not in ("aug_ops", "w_lovasz")}
    checkpoint.save(tmp_path / "old" / "last.pt", {"settings": old})
    resumed = settings_from(["--out", str(tmp_path / "old"), "--resume"])
    assert (resumed.aug_ops, resumed.w_lovasz) == (",".join(OPS), 0.0)
    (tmp_path / "settings.json").write_text(json.dumps(old))
    copied = settings_from(["--config", str(tmp_path / "settings.json"), "--out", str(tmp_path / "new")])
    assert (copied.aug_ops, copied.w_lovasz) == (",".join(OPS), 0.0)
    assert (settings_from([]).aug_ops, settings_from([]).w_lovasz) == ("", 1.0)
