"""Checkpoints: plain dicts of tensors and numbers, saved atomically, loadable with torch.load.

Each one says what made it: format, model name and arguments, resolution, the run's settings,
the command line, step and epoch, the last validation metrics, and the torch version. A training
checkpoint also holds the optimizer, scheduler and RNG states that --resume needs.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

from pipeline.errors import DepthsegError
from train.model import build_model

FORMAT = "depthseg-ckpt/1"


class CheckpointError(DepthsegError):
    """A checkpoint that cannot be used; the message is one sentence for the user."""


def save(path: str | os.PathLike, state: dict) -> None:
    """Write to a temporary name, then rename: a crash leaves the old checkpoint or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "torch_version": str(torch.__version__), "command": " ".join(sys.argv), **state}, tmp)
    os.replace(tmp, path)


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """dst becomes a copy of src, atomically (best.pt from the last.pt just written)."""
    tmp = Path(str(dst) + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load(path: str | os.PathLike) -> dict:
    """torch.load with weights_only (no code runs); one sentence if it is not a checkpoint of ours."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike; torch's own words run to a page
        why = ("it holds objects other than tensors and plain data" if "Unsupported global" in str(e)
               else "the file is damaged, cut short, or not written by torch.save")
        raise CheckpointError(f"{path} is not a readable checkpoint: {why}.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint.")
    return ckpt


def load_model(ckpt: dict, device: torch.device | str = "cpu", name: str = "the checkpoint") -> torch.nn.Module:
    """The checkpoint's model with its weights, in eval mode; one sentence naming `name` (its
    path) if the model is unknown here or the weights are another model's."""
    try:
        model = build_model(ckpt["model"], **ckpt.get("model_args", {}))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}.") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # torch's own words run to a page of key names
        raise CheckpointError(f"{name}'s weights do not fit its {ckpt['model']!r} model ({str(e).splitlines()[0][:120]} "
                              f"the checkpoint is from another version of the model).") from None
    return model.to(device).eval()
