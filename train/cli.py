"""`depthcli`, the console script: the data commands of pipeline.cli (make-dataset, shard, verify,
upload, bench, cache) and, added here to the same group, the model commands (evaluate, predict,
export). It sits above both halves: train imports pipeline, never the reverse. The train modules
load inside each command (they import torch), so the data commands start without them.
"""

from __future__ import annotations

import click

from pipeline.cli import CPUS, cache_options, main, resolve_device, user_errors

__all__ = ["main"]


def _onnx_device(name: str) -> str:
    """--device for onnxruntime: auto takes the GPU only if this onnxruntime has the CUDA provider
    (the one pyproject installs has not), so auto never fails where the CPU would do; a cuda the
    user named still needs it (OnnxRunner says so)."""
    from train.export import cuda_provider

    return "cpu" if name == "auto" and not cuda_provider() else resolve_device(name)


def _legacy_bf16(ctx, param, value):
    """--bf16 / --no-bf16 of earlier versions, said as --precision auto / float32."""
    if value is not None:
        ctx.params["precision"] = "auto" if value else "float32"


def precision_options(fn):
    """--precision for the commands that run the model in PyTorch (--bf16/--no-bf16: its old names)."""
    fn = click.option("--bf16/--no-bf16", default=None, hidden=True, expose_value=False, callback=_legacy_bf16)(fn)
    return click.option("--precision", type=click.Choice(["auto", "bf16", "float32"]), default="auto", show_default=True,
                        is_eager=True, help="PyTorch in bf16 autocast or float32; auto: bf16 where it is measured faster "
                        "on this machine (native bf16 on GPUs; a few timed batches on a CPU, cached).")(fn)


@main.command("evaluate")
@click.option("--checkpoint", "ckpt_path", required=True, type=click.Path(), help="A checkpoint from train/main.py.")
@click.option("--shards", default="shards", show_default=True, type=click.Path(), help="Shard folder or s3://bucket/prefix.")
@click.option("--split", default="val", show_default=True, help="Split to evaluate.")
@click.option("--res", default=0, help="Resolution. (default: the checkpoint's)")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--loader", type=click.Choice(["dali", "torch"]), default="dali", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@precision_options
@click.option("--baseline", is_flag=True, help="Also score the non-learned baselines (mask: |fg_bg - bg| > t, t "
              "chosen on the train split; depth: the train split's mean map) and compare in the last line.")
@cache_options
@user_errors
def evaluate_cmd(ckpt_path, shards, split, res, batch_size, loader, device, as_json, precision, baseline, cache_dir,
                 cache_limit):
    """Print the metric table (rows Mask, Depth, Avg) of a checkpoint over a split."""
    import json

    from train.evaluate import evaluate_checkpoint
    from train.metrics import format_table

    r = evaluate_checkpoint(ckpt_path, shards, split, res, batch_size, loader, resolve_device(device), precision, baseline,
                            cache_dir, cache_limit)
    metrics, base = r["metrics"], r["baseline"]
    if as_json:
        click.echo(json.dumps(metrics))
        return
    click.echo(format_table(metrics))
    if base:
        click.echo(f"baselines (mask |fg_bg - bg| > {r['threshold']:.2f}, depth = the train split's mean map):\n"
                   + format_table(base))
    vs = (lambda key: f" (baseline {base[key]:.4f})") if base else (lambda key: "")
    click.echo(f"{split}: {int(metrics['samples']):,} samples at {r['res']}px, loss {metrics['loss']:.4f}, "
               f"mask IoU {metrics['mask/iou']:.4f}{vs('mask/iou')}, depth rms {metrics['depth/rms']:.4f}"
               f"{vs('depth/rms')} ({r['model']} model, step {r['step']})")


@main.command("predict")
@click.option("--checkpoint", "ckpt_path", type=click.Path(), help="A checkpoint from train/main.py (or give --onnx).")
@click.option("--onnx", "onnx_path", type=click.Path(), help="A file from depthcli export, run in onnxruntime instead of PyTorch.")
@click.option("--bg", required=True, type=click.Path(), help="Background image, or a folder of them.")
@click.option("--fg-bg", required=True, type=click.Path(), help="The scene with the object, or a folder of them (paired by name).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--res", default=0, help="Resolution the model runs at. (default: the checkpoint's or the file's)")
@click.option("--batch-size", default=16, show_default=True, help="Pairs per model call.")
@click.option("--workers", default=min(4, CPUS), show_default=True, help="Threads that read, resize and write images.")
@click.option("--threads", default=0, help="CPU threads of the model (torch or onnxruntime). (default: the library's, all cores)")
@click.option("--side/--no-side", default=True, show_default=True, help="Also write <name>_side.png (most of the writing time).")
@precision_options
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu or cuda. With --onnx, auto takes the GPU only through onnxruntime-gpu.")
@user_errors
def predict_cmd(ckpt_path, onnx_path, bg, fg_bg, out, res, batch_size, workers, threads, side, precision, device):
    """Predict mask and depth for images of any size: writes <name>_mask.png and <name>_depth.png
    at the input's size, and <name>_side.png (bg | fg_bg | mask | depth). Pairs run in batches,
    in PyTorch (--checkpoint) or onnxruntime (--onnx), while threads read and write images."""
    from train.predict import predict

    device = _onnx_device(device) if onnx_path else resolve_device(device)
    r = predict(ckpt_path, bg, fg_bg, out, device=device, res=res, batch_size=batch_size,
                workers=workers, onnx_path=onnx_path, threads=threads, side=side, mode=precision)
    click.echo(f"predicted {r['pairs']} pair(s) into {out} in {r['seconds']:.1f} s ({r['pairs'] / r['seconds']:,.1f} pairs/s; "
               f"{r['runner']}, {r['res']}px, batch {r['batch_size']}), e.g. {r['written'][0]}")


@main.command("export")
@click.option("--checkpoint", "ckpt_path", required=True, type=click.Path(), help="A checkpoint from train/main.py.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--res", default=0, help="Input height and width of the file. (default: the checkpoint's)")
@click.option("--dynamic", is_flag=True, help="Dynamic height and width too (multiples of 4); the batch axis always is.")
@click.option("--fp16", is_flag=True, help="Weights and activations in float16 inside (inputs and outputs stay float32): half the file; for GPUs, slower on a CPU.")
@click.option("--opset", type=int, help="ONNX opset to write. (default: the exporter's)")
@click.option("--shards", type=click.Path(), help="Shards whose val split the check runs on. (default: the checkpoint's own, if here; else random inputs)")
@click.option("--check-samples", default=16, show_default=True, type=click.IntRange(1), help="Samples the check compares.")
@user_errors
def export_cmd(ckpt_path, out, res, dynamic, fp16, opset, shards, check_samples):
    """Export a checkpoint to ONNX (inputs bg, fg_bg: B×3×H×W float in [0, 1]; outputs mask,
    depth: B×1×H×W) with its resolution and training record in the metadata, then check that
    onnxruntime on the CPU agrees with PyTorch; the file is written only if it does."""
    from train.export import export

    r = export(ckpt_path, out, res=res, dynamic=dynamic, fp16=fp16, opset=opset, shards=shards, samples=check_samples)
    metric = "n/a (no targets)" if r["metric_diff"] != r["metric_diff"] else f"{r['metric_diff']:.1e}"
    click.echo(f"exported {r['model']} to {r['out']} ({r['bytes'] / 1e6:.1f} MB, opset {r['opset']}, {r['res']}px, batch"
               f"{', H, W' if r['dynamic'] else ''} dynamic{', fp16' if r['fp16'] else ''}); onnxruntime vs PyTorch on "
               f"{r['source']}: max abs diff {r['max_abs_diff']:.1e}, metric diff {metric} (tolerance {r['tolerance']:.0e})")


if __name__ == "__main__":
    main()
