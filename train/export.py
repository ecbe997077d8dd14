"""A checkpoint to one ONNX file that runs without this project, checked against PyTorch.

    depthcli export --checkpoint runs/r224/best.pt --out model.onnx [--res 224] [--dynamic] [--fp16]

The file takes `bg` and `fg_bg` (float32 B×3×H×W in [0, 1], RGB) and gives `mask` and `depth`
(float32 B×1×H×W in [0, 1]). The batch axis is always dynamic; --dynamic makes H and W dynamic
too (multiples of 4). The resolution, the model and its training record are in the file's
metadata_props. PyTorch's supported exporter does the work (torch.onnx.export with dynamo=True:
torch.export, then onnxscript); then onnxruntime runs the file on the CPU beside the PyTorch
model, on validation samples when there are shards, and the export fails if they disagree.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.epoch import check_res
from pipeline.errors import DepthsegError
from train import checkpoint
from train.metrics import MetricSums

FORMAT = "depthseg-onnx/1"
INPUTS, OUTPUTS = ("bg", "fg_bg"), ("mask", "depth")
# Agreement asked of onnxruntime vs PyTorch (float32 on the CPU), on outputs in [0, 1] and on the
# metric figures. Float32 reorderings differ by ~1e-7; fp16 weights and activations by ~1e-3.
TOLERANCE = {False: (1e-4, 1e-3), True: (2e-2, 2e-2)}  # fp16 -> (max abs diff, metric diff)
CHECK_SAMPLES = 16


class ExportError(DepthsegError):
    """Bad input or a failed export; the message is one sentence for the user."""


class PairModel(nn.Module):
    """The model with the file's interface: bg and fg_bg apart (the model takes them concatenated);
    float32 in and out whatever precision runs inside."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype

    def forward(self, bg: torch.Tensor, fg_bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, depth = self.model(torch.cat([bg, fg_bg], 1).to(self.dtype))
        return mask.float(), depth.float()


def cuda_provider() -> bool:
    """Whether this onnxruntime can run on a GPU: the onnxruntime that pyproject installs cannot,
    onnxruntime-gpu can."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRunner:
    """An exported file in onnxruntime, called like predict.TorchRunner: (bg, fg_bg) float32
    arrays B×3×H×W to (mask, depth) B×1×H×W. CUDA when asked for and the wheel has it."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise ExportError(f"{path} does not exist.")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            if not cuda_provider():
                raise ExportError("--device cuda needs onnxruntime with the CUDA provider (pip install onnxruntime-gpu).")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime's own exception types, for any unreadable file
            raise ExportError(f"{path} is not a readable ONNX model ({str(e).strip().splitlines()[0][:120]}).") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise ExportError(f"{path} is not a {FORMAT} file (depthcli export writes them).")
        self.res, self.dynamic_hw, self.meta = int(meta["res"]), json.loads(meta["dynamic_hw"]), meta
        self.name = f"onnxruntime {self.session.get_providers()[0]}"

    def __call__(self, bg: np.ndarray, fg_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self.session.run(list(OUTPUTS), {"bg": bg, "fg_bg": fg_bg}))


def _load_model(ckpt_path: str) -> tuple[dict, nn.Module]:
    ckpt = checkpoint.load(ckpt_path)
    return ckpt, checkpoint.load_model(ckpt, name=ckpt_path)


def _dynamic_shapes(dynamic_hw: bool) -> dict:
    """Batch always dynamic; H and W as 4·h, 4·w when asked, so the model's multiple-of-4 check
    holds for every size the file accepts instead of pinning the example's size."""
    from torch.export import Dim

    axes = {0: Dim("batch", min=1, max=65536)}
    if dynamic_hw:
        axes.update({2: 4 * Dim("h", min=4, max=4096), 3: 4 * Dim("w", min=4, max=4096)})
    return {name: axes for name in INPUTS}


def _to_onnx(wrapper: PairModel, res: int, dynamic_hw: bool, opset: int | None):
    """torch.onnx.export (dynamo) of `wrapper`, quietly: its progress lines and warnings are not
    the user's business; a failure becomes one sentence."""
    import onnx

    if opset is not None and not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset must be between 7 and {onnx.defs.onnx_opset_version()} (this onnx's newest), got {opset}.")
    example = tuple(torch.rand(2, 3, res, res) for _ in INPUTS)  # batch 2: torch.export pins sizes 0 and 1
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for log in loggers:
            log.setLevel(logging.CRITICAL)
        try:
            program = torch.onnx.export(wrapper, example, input_names=list(INPUTS), output_names=list(OUTPUTS),
                                        dynamic_shapes=_dynamic_shapes(dynamic_hw), opset_version=opset,
                                        dynamo=True, verbose=False)
        except Exception as e:
            raise ExportError(f"the ONNX exporter failed ({str(e).strip().splitlines()[0][:200]}).") from None
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)
    made = program.model.opset_imports.get("", None)
    if opset is not None and made != opset:
        # The exporter falls back to its own opset (with a warning) when it cannot convert down.
        raise ExportError(f"the exporter cannot convert this model to opset {opset} (it fell back to {made}); "
                          f"choose another --opset or leave it out.")
    return program


def metadata(ckpt: dict, ckpt_path: str, res: int, dynamic_hw: bool, fp16: bool, opset: int) -> dict[str, str]:
    """What the file says about itself (ONNX metadata_props: string to string)."""
    return {
        "format": FORMAT, "res": str(res), "dynamic_hw": json.dumps(dynamic_hw), "fp16": json.dumps(fp16),
        "opset": str(opset),
        "inputs": "bg, fg_bg: float32 Bx3xHxW RGB in [0, 1], resized to res x res (bilinear); H, W multiples of 4",
        "outputs": "mask, depth: float32 Bx1xHxW in [0, 1] (depth: near = 1)",
        "model": ckpt["model"], "model_args": json.dumps(ckpt.get("model_args", {})),
        "train_res": str(ckpt["res"]), "step": str(ckpt.get("step", "")), "epoch": str(ckpt.get("epoch", "")),
        "metrics": json.dumps(ckpt.get("metrics", {})), "settings": json.dumps(ckpt.get("settings", {})),
        "checkpoint": str(ckpt_path), "checkpoint_created": str(ckpt.get("created", "")),
        "torch_version": str(torch.__version__),
    }


def check_inputs(shards: str | None, ckpt: dict, res: int, n: int) -> tuple[dict[str, torch.Tensor], str]:
    """The batch to compare on and where it came from: the validation split of `shards`, else of
    the shards the checkpoint was trained on if they are here, else random inputs (no targets)."""
    from pipeline.loaders import build_loader

    saved = ckpt.get("settings", {}).get("shards")
    folder = shards or (saved if saved and (Path(saved) / "manifest.json").is_file() else None)
    if folder is None:
        g = torch.Generator().manual_seed(0)
        return {k: torch.rand(n, 3, res, res, generator=g) for k in INPUTS}, f"{n} random inputs (no shards found)"
    loader = build_loader(folder, split="val", res=res, batch_size=n, loader="torch", device="cpu", train=False, workers=1)
    batch = next(iter(loader))
    keep = batch["valid"]
    batch = {k: batch[k][keep] for k in (*INPUTS, *OUTPUTS)}
    return batch, f"{len(batch['bg'])} val samples of {folder}"


def _metrics(mask: torch.Tensor, depth: torch.Tensor, batch: dict) -> dict[str, float]:
    sums = MetricSums()
    sums.update(mask, depth, batch["mask"], batch["depth"])
    return sums.compute()


def worst(diffs) -> float:
    """The largest of `diffs`, NaN if any is NaN: an fp16 overflow gives NaN outputs, and
    Python's max() keeps or drops a NaN depending on where it stands."""
    return float(np.max(np.asarray(list(diffs), dtype=np.float64)))


def agrees(result: dict, tol_out: float, tol_metric: float, has_targets: bool) -> bool:
    """Both differences within their tolerance; `<=` and not `>`, so NaN (and inf) disagree. The
    metric difference is NaN by design where the inputs have no targets."""
    return result["max_abs_diff"] <= tol_out and (not has_targets or result["metric_diff"] <= tol_metric)


def compare(onnx_path: str | Path, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """onnxruntime (CPU) against the float32 PyTorch model on `batch`: the largest absolute
    difference of any output pixel, and (when the batch has targets) of any metric figure."""
    runner = OnnxRunner(onnx_path, "cpu")
    with torch.inference_mode():
        ref = model(torch.cat([batch["bg"], batch["fg_bg"]], 1))
    got = runner(batch["bg"].numpy(), batch["fg_bg"].numpy())
    out = {"max_abs_diff": worst(np.abs(g - r.numpy()).max() for g, r in zip(got, ref)), "metric_diff": math.nan}
    if "mask" in batch:
        a, b = _metrics(*ref, batch), _metrics(*(torch.from_numpy(g) for g in got), batch)
        out["metric_diff"] = worst(abs(a[k] - b[k]) for k in a if k != "samples")
        out["mask_iou"], out["depth_rms"] = a["mask/iou"], a["depth/rms"]
    return out


def export(ckpt_path: str, out: str, res: int = 0, dynamic: bool = False, fp16: bool = False,
           opset: int | None = None, shards: str | None = None, samples: int = CHECK_SAMPLES) -> dict:
    """Write `out` (atomically, only once the check passed) and return what the summary says."""
    ckpt, model = _load_model(ckpt_path)
    res = check_res(res or ckpt["res"])
    batch, source = check_inputs(shards, ckpt, res, samples)
    dtype = torch.float16 if fp16 else torch.float32
    wrapper = PairModel(checkpoint.load_model(ckpt), dtype).eval()
    program = _to_onnx(wrapper, res, dynamic, opset)
    made_opset = program.model.opset_imports[""]
    program.model.metadata_props.update(metadata(ckpt, ckpt_path, res, dynamic, fp16, made_opset))
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    program.save(tmp, external_data=False)  # one self-contained file (12.7 MB in float32)

    tol_out, tol_metric = TOLERANCE[fp16]
    result = compare(tmp, model, batch)
    if dynamic:  # another batch size and a non-square size the example never had
        g = torch.Generator().manual_seed(1)
        other = {k: torch.rand(3, 3, max(16, res // 8 * 4), res + 4, generator=g) for k in INPUTS}
        result["max_abs_diff"] = worst([result["max_abs_diff"], compare(tmp, model, other)["max_abs_diff"]])
    if not agrees(result, tol_out, tol_metric, "mask" in batch):
        os.replace(tmp, out_path.with_name(out_path.name + ".rejected"))
        overflow = fp16 and not math.isfinite(result["max_abs_diff"])
        why = " (not finite: the model overflows float16; export it without --fp16)" if overflow else ""
        raise ExportError(f"onnxruntime disagrees with PyTorch on {source}: max abs diff {result['max_abs_diff']:.2e}{why} "
                          f"(tolerance {tol_out:.0e}), metric diff {result['metric_diff']:.2e} (tolerance {tol_metric:.0e}); "
                          f"the file is kept as {out_path.name}.rejected.")
    os.replace(tmp, out_path)
    return {**result, "out": str(out_path), "res": res, "opset": made_opset, "dynamic": dynamic, "fp16": fp16,
            "source": source, "tolerance": tol_out, "metric_tolerance": tol_metric, "bytes": out_path.stat().st_size,
            "model": ckpt["model"]}
