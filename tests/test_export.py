"""ONNX export and batch prediction: the exported file agrees with PyTorch on validation samples,
its batch (and with --dynamic its size) really is dynamic, predict writes the same files from
either runtime and any batch size, the README's snippet runs as printed, bad input is one
sentence; --fp16 and --opset, a NaN that must not pass the check, --device auto with the CPU-only
onnxruntime. One checkpoint of random weights at 32 px (nothing trained) and one export serve
most tests; those of an option make their own small export."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from train import cli as cli_module
from train.cli import main as cli
from pipeline.loaders import build_loader
from train import checkpoint, export
from train.metrics import MetricSums
from train.model import MODELS, build_model

ROOT = Path(__file__).resolve().parent.parent
RES = 32


def save_checkpoint(path: Path, model: str = "unet", seed: int = 0) -> Path:
    """train/main.py's checkpoint format, minus what only --resume needs; the default model (a
    name build_model does not know holds the reference network's weights)."""
    torch.manual_seed(seed)
    net = build_model(model if model in MODELS else "reference")
    checkpoint.save(path, {"model": model, "model_args": {"dropout": 0.2}, "res": RES, "state_dict": net.state_dict(),
                           "step": 8, "epoch": 2, "metrics": {"loss": 1.5}, "settings": {"shards": "nowhere", "res": RES}})
    return path


def one_line_error(r) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.output.count("\n") == 1, r.output
    return r.output


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture(scope="module")
def exported(ckpt, small_shards, tmp_path_factory):
    """The one export: dynamic batch, H and W; checked on 8 val samples of small_shards."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--dynamic",
                                 "--shards", str(small_shards), "--check-samples", "8"])
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """5 pairs of different sizes in bgs/ and scenes/ (paired by name)."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for d in ("bgs", "scenes"):
        (root / d).mkdir()
    for i, (w, h) in enumerate(((50, 37), (64, 64), (33, 80), (96, 72), (40, 40))):
        bg = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(bg).save(root / "bgs" / f"p{i}.png")
        bg[h // 4:h // 2, w // 4:w // 2] = (250, 240, 30)
        Image.fromarray(bg).save(root / "scenes" / f"p{i}.jpg")
    return root


def run_both(onnx_path: Path, model: torch.nn.Module, bg: torch.Tensor, fg_bg: torch.Tensor):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["mask", "depth"], {"bg": bg.numpy(), "fg_bg": fg_bg.numpy()})
    with torch.inference_mode():
        ref = model(torch.cat([bg, fg_bg], 1))
    return got, [t.numpy() for t in ref]


def metrics(mask, depth, batch) -> dict:
    sums = MetricSums()
    sums.update(torch.as_tensor(mask), torch.as_tensor(depth), batch["mask"], batch["depth"])
    return sums.compute()


def test_export_agrees_with_pytorch_on_a_validation_batch(exported, ckpt, small_shards):
    out, output = exported
    m = re.search(r"on 8 val samples of .*: max abs diff (\S+), metric diff (\S+) \(tolerance", output)
    assert m and float(m[1]) <= 1e-4 and float(m[2]) <= 1e-3, output
    batch = next(iter(build_loader(small_shards, split="val", res=RES, batch_size=12, loader="torch", train=False, workers=1)))
    model = checkpoint.load_model(checkpoint.load(ckpt))
    got, ref = run_both(out, model, batch["bg"], batch["fg_bg"])
    assert max(np.abs(g - r).max() for g, r in zip(got, ref)) < 1e-4
    a, b = metrics(*got, batch), metrics(*ref, batch)
    assert max(abs(a[k] - b[k]) for k in a) < 1e-3
    # A model that is not the checkpoint's is told apart: the comparison can fail.
    other = checkpoint.load_model({**checkpoint.load(save_checkpoint(out.parent / "other.pt", seed=1))})
    assert export.compare(out, other, {k: batch[k] for k in ("bg", "fg_bg")})["max_abs_diff"] > 1e-3


def test_file_says_what_it_is(exported):
    out, _ = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("bg", "tensor(float)"), ("fg_bg", "tensor(float)")]
    assert [o.name for o in session.get_outputs()] == ["mask", "depth"]
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape[::2] + session.get_inputs()[0].shape[3:])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["format"] == "depthseg-onnx/1" and meta["res"] == str(RES) and meta["model"] == "unet"
    assert (meta["step"], meta["epoch"], json.loads(meta["dynamic_hw"]), json.loads(meta["fp16"])) == ("8", "2", True, False)
    assert json.loads(meta["metrics"]) == {"loss": 1.5} and json.loads(meta["settings"])["res"] == RES


@pytest.mark.parametrize("batch, h, w", [(1, RES, RES), (7, RES, RES), (2, 48, 64)])
def test_dynamic_batch_and_size(exported, ckpt, batch, h, w):
    out, _ = exported
    g = torch.Generator().manual_seed(batch)
    bg, fg_bg = (torch.rand(batch, 3, h, w, generator=g) for _ in range(2))
    got, ref = run_both(out, checkpoint.load_model(checkpoint.load(ckpt)), bg, fg_bg)
    assert [x.shape for x in got] == [(batch, 1, h, w)] * 2
    assert max(np.abs(a - b).max() for a, b in zip(got, ref)) < 1e-4


def test_static_export_and_a_failed_check_keeps_nothing_under_the_name(ckpt, tmp_path, monkeypatch):
    """Without --dynamic H and W are fixed; a disagreement beyond the tolerance (here: any at
    all) writes no model.onnx, keeps the file as model.onnx.rejected and says so."""
    monkeypatch.setitem(export.TOLERANCE, False, (0.0, 0.0))
    monkeypatch.setattr(export, "compare", lambda *a: {"max_abs_diff": 1e-7, "metric_diff": float("nan")})
    out = tmp_path / "model.onnx"
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--check-samples", "2"])
    assert "onnxruntime disagrees with PyTorch on 2 random inputs" in one_line_error(r)
    assert not out.exists() and (tmp_path / "model.onnx.rejected").exists()
    shape = ort.InferenceSession(str(tmp_path / "model.onnx.rejected")).get_inputs()[0].shape
    assert isinstance(shape[0], str) and shape[1:] == [3, RES, RES]


def test_fp16_export_agrees_within_its_tolerance_in_half_the_bytes(exported, ckpt, small_shards, tmp_path):
    out = tmp_path / "half.onnx"
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--fp16",
                                 "--shards", str(small_shards), "--check-samples", "8"])
    assert r.exit_code == 0, r.output
    m = re.search(r"batch dynamic, fp16\); .*: max abs diff (\S+), metric diff (\S+) \(tolerance 2e-02\)", r.stdout)
    assert m and float(m[1]) <= 2e-2 and float(m[2]) <= 2e-2, r.stdout
    assert out.stat().st_size < 0.6 * exported[0].stat().st_size  # float16 weights: half of float32's
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"] * 2  # float32 outside, float16 inside
    assert json.loads(session.get_modelmeta().custom_metadata_map["fp16"]) is True
    batch = next(iter(build_loader(small_shards, split="val", res=RES, batch_size=12, loader="torch", train=False, workers=1)))
    got, ref = run_both(out, checkpoint.load_model(checkpoint.load(ckpt)), batch["bg"], batch["fg_bg"])
    assert max(np.abs(g - r).max() for g, r in zip(got, ref)) <= 2e-2


def test_fp16_overflow_is_a_disagreement(ckpt, tmp_path):
    """Weights that take float16 past its range make onnxruntime's outputs NaN; NaN compares
    False both ways, so only a check written as `<= tolerance` rejects it."""
    big = checkpoint.load(ckpt)
    first_conv = next(k for k, v in big["state_dict"].items() if v.dim() == 4)
    big["state_dict"][first_conv] *= 1e8  # float32 copes; float16 ends at 65504
    checkpoint.save(tmp_path / "big.pt", big)
    out = tmp_path / "model.onnx"
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "big.pt"), "--out", str(out), "--fp16",
                                 "--check-samples", "2"])
    assert "max abs diff nan (not finite: the model overflows float16" in one_line_error(r)
    assert not out.exists()


def test_a_nan_anywhere_is_the_worst_difference():
    assert math.isnan(export.worst([0.1, math.nan])) and math.isnan(export.worst([math.nan, 0.1]))
    ok = {"max_abs_diff": 1e-5, "metric_diff": math.nan}
    assert export.agrees(ok, 1e-4, 1e-3, has_targets=False)  # random inputs: no metric to compare
    assert not export.agrees(ok, 1e-4, 1e-3, has_targets=True)
    assert not export.agrees({**ok, "max_abs_diff": math.inf}, 1e-4, 1e-3, has_targets=False)


@pytest.mark.parametrize("opset", [17, 7])
def test_opset_is_the_one_asked_for_or_refused(opset, ckpt, tmp_path):
    """The exporter writes its own opset and converts down to --opset; where it cannot, it falls
    back to its own with a warning, which the export turns into a refusal: the user asked for a
    file their runtime can load."""
    out = tmp_path / "model.onnx"
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--opset", str(opset),
                                 "--check-samples", "2"])
    if opset == 17:
        assert r.exit_code == 0 and f"opset {opset}, " in r.stdout, r.output
        model = onnx.load(out)
        assert {o.domain: o.version for o in model.opset_import}[""] == opset
        assert {p.key: p.value for p in model.metadata_props}["opset"] == str(opset)
    else:
        assert f"cannot convert this model to opset {opset} (it fell back to" in one_line_error(r)
        assert not out.exists() and not list(tmp_path.glob("model.onnx*"))


def predict(args: list[str], out: Path) -> str:
    r = CliRunner().invoke(cli, ["predict", *args, "--out", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    return r.stdout


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), np.int16) for p in sorted(folder.glob("*.png"))}


def test_predict_onnx_and_any_batch_size_write_the_same_files(exported, ckpt, images, tmp_path, monkeypatch):
    onnx_path, _ = exported
    pair = ["--bg", str(images / "bgs"), "--fg-bg", str(images / "scenes")]
    # IEEE float32 PyTorch, as onnxruntime computes the file: bf16 would differ by more, and so
    # would cuDNN's TF32 convolutions (on by default) on a GPU.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    predict(["--checkpoint", str(ckpt), *pair, "--batch-size", "1", "--precision", "float32"], tmp_path / "b1")
    predict(["--checkpoint", str(ckpt), *pair, "--batch-size", "3", "--workers", "3", "--no-bf16"], tmp_path / "b3")
    line = predict(["--onnx", str(onnx_path), *pair, "--batch-size", "4"], tmp_path / "onnx")
    predict(["--onnx", str(onnx_path), *pair, "--no-side"], tmp_path / "no_side")
    assert sorted(p.name for p in (tmp_path / "no_side").iterdir()) == sorted(
        f"p{i}_{kind}.png" for i in range(5) for kind in ("mask", "depth"))
    assert line.startswith("predicted 5 pair(s)") and "onnxruntime CPUExecutionProvider, 32px, batch 4" in line
    ref = pngs(tmp_path / "b1")
    assert len(ref) == 15 and ref["p2_mask.png"].shape == (80, 33) and ref["p3_side.png"].shape == (72, 4 * 96, 3)
    for other in ("b3", "onnx"):
        got = pngs(tmp_path / other)
        assert got.keys() == ref.keys()
        # 8-bit outputs: float differences of 1e-7 may round one grey level the other way.
        assert max(np.abs(got[k] - ref[k]).max() for k in ref) <= 1, other


def test_predict_onnx_on_auto_uses_the_cpu_where_onnxruntime_has_no_cuda(exported, images, tmp_path, monkeypatch):
    """On a GPU machine --device auto means cuda, but pyproject's onnxruntime has no CUDA
    provider: auto falls back to the CPU; only a --device cuda the user named gets the sentence."""
    onnx_path, _ = exported
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not export.cuda_provider()
    pair = ["--onnx", str(onnx_path), "--bg", str(images / "bgs"), "--fg-bg", str(images / "scenes")]
    assert "onnxruntime CPUExecutionProvider" in predict(pair, tmp_path / "auto")
    r = CliRunner().invoke(cli, ["predict", *pair, "--out", str(tmp_path / "cuda"), "--device", "cuda"])
    assert "--device cuda needs onnxruntime with the CUDA provider" in one_line_error(r)
    monkeypatch.setattr(export, "cuda_provider", lambda: True)  # onnxruntime-gpu: auto takes the GPU
    assert cli_module._onnx_device("auto") == "cuda"


def test_readme_example_runs_as_printed(exported, images, tmp_path):
    """The README's onnxruntime snippet, extracted verbatim, run in a fresh interpreter in a
    folder with model.onnx, bg.jpg and scene.jpg: it imports neither torch nor this project, and
    writes what `depthcli predict --onnx` writes (within one grey level: JPEG in, same code)."""
    onnx_path, _ = exported
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    snippet = next(b for b in blocks if "import onnxruntime" in b)
    (tmp_path / "model.onnx").write_bytes(onnx_path.read_bytes())
    Image.open(images / "bgs" / "p3.png").save(tmp_path / "bg.jpg", quality=95)
    (tmp_path / "scene.jpg").write_bytes((images / "scenes" / "p3.jpg").read_bytes())
    check = '\nimport sys\nassert not {"torch", "pipeline", "train"} & set(sys.modules), sorted(sys.modules)\n'
    r = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    predict(["--onnx", str(onnx_path), "--bg", str(tmp_path / "bg.jpg"), "--fg-bg", str(tmp_path / "scene.jpg")], tmp_path / "p")
    for name in ("mask", "depth"):
        a, b = (np.asarray(Image.open(p), np.int16) for p in (tmp_path / f"scene_{name}.png", tmp_path / "p" / f"scene_{name}.png"))
        assert a.shape == (72, 96) and np.abs(a - b).max() <= 1


@pytest.mark.parametrize("case, says", [
    ("not_a_checkpoint", "is not a readable checkpoint"),
    ("unknown_model", "unknown model 'resnet9000'"),
    ("other_weights", "w.pt's weights do not fit its 'unet' model (Error(s) in loading state_dict for UNet: the checkpoint"),
    ("predict_other_weights", "w.pt's weights do not fit its 'unet' model"),
    ("opset", "--opset must be between 7 and"),
    ("res", "--res must be a multiple of 4"),
    ("predict_not_onnx", "is not a readable ONNX model"),
    ("predict_both", "give either --checkpoint or --onnx"),
    ("predict_res", "was exported for"),
])
def test_bad_input_is_one_sentence(case, says, ckpt, exported, tmp_path, images):
    out = str(tmp_path / "m.onnx")
    args = ["export", "--checkpoint", str(ckpt), "--out", out]
    pair = ["--bg", str(images / "bgs"), "--fg-bg", str(images / "scenes"), "--out", str(tmp_path / "p")]
    if case == "not_a_checkpoint":
        (tmp_path / "x.pt").write_text("hello")
        args[2] = str(tmp_path / "x.pt")
    elif case == "unknown_model":
        args[2] = str(save_checkpoint(tmp_path / "u.pt", model="resnet9000"))
    elif case.endswith("other_weights"):  # a 'unet' checkpoint holding the reference network's weights
        checkpoint.save(tmp_path / "w.pt", {**checkpoint.load(ckpt), "state_dict": build_model("reference").state_dict()})
        args = (["predict", "--checkpoint", str(tmp_path / "w.pt"), *pair] if case.startswith("predict")
                else ["export", "--checkpoint", str(tmp_path / "w.pt"), "--out", out])
    elif case == "opset":
        args += ["--opset", "99"]
    elif case == "res":
        args += ["--res", "30"]
    elif case == "predict_not_onnx":
        args = ["predict", "--onnx", str(ckpt), *pair]
    elif case == "predict_both":
        args = ["predict", "--onnx", str(ckpt), "--checkpoint", str(ckpt), *pair]
    else:  # the exported file, marked as exported without --dynamic, asked to run at 64 px
        model = onnx.load(exported[0])
        for prop in model.metadata_props:
            prop.value = "false" if prop.key == "dynamic_hw" else prop.value
        onnx.save(model, tmp_path / "static.onnx")
        args = ["predict", "--onnx", str(tmp_path / "static.onnx"), "--res", "64", *pair]
    r = CliRunner().invoke(cli, args)
    assert says in one_line_error(r)
    assert not Path(out).exists()


def test_check_runs_on_the_checkpoints_own_shards_when_none_are_given(small_shards):
    batch, source = export.check_inputs(None, {"settings": {"shards": str(small_shards)}}, RES, 4)
    assert source == f"4 val samples of {small_shards}" and batch["mask"].shape == (4, 1, RES, RES)
    batch, source = export.check_inputs(None, {"settings": {"shards": "nowhere"}}, RES, 3)
    assert source == "3 random inputs (no shards found)" and set(batch) == {"bg", "fg_bg"}
