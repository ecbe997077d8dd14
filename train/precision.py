"""The precision and memory format a device computes the model in fastest, chosen per process.

    p = precision.choose(torch.device("cpu"))   # Precision(bf16=True, channels_last=True) with AMX
    model = p.prepare(model)
    with p.autocast():
        mask, depth = model(p.input(x))

bf16 autocast on CUDA GPUs and on CPUs with AMX, whose tile units run oneDNN's bf16
convolutions at about twice float32's rate. Elsewhere float32: measured on whole training steps
(BENCHMARKS.md, "Precision on the CPU"), bf16 on AVX512-BF16 without AMX was 0.85× float32, on
plain AVX512 (emulated) 0.46×, on AVX2 0.1×; PyTorch's own test (`_is_mkldnn_bf16_supported`)
says yes to all but the last. channels_last everywhere: oneDNN and cuDNN both run
convolutions faster on it, in float32 too. Losses, the sigmoid outputs and metrics stay float32
(train.model's heads and train.losses see to it), and ONNX export is a float32 graph.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU has AMX and oneDNN may use it: ONEDNN_MAX_CPU_ISA (oneDNN's own cap,
    which also makes a test machine act like an older CPU) must allow AMX."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return bool(amx()) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        try:  # emulated bf16 (before Ampere) is slower than float32
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no such argument and counts only native support
            return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_is_fast()


@dataclass(frozen=True)
class Precision:
    device_type: str
    bf16: bool
    channels_last: bool

    def autocast(self):
        """A context in which the model runs: bf16 autocast, or nothing."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __str__(self) -> str:
        return ("bf16 autocast" if self.bf16 else "float32") + (", channels_last" if self.channels_last else "")


def choose(device: torch.device | str, bf16: bool = True, channels_last: bool = True) -> Precision:
    """The fastest precision for `device`; bf16=False (--no-bf16) keeps float32 everywhere."""
    device = torch.device(device)
    return Precision(device.type, bf16 and bf16_is_fast(device), channels_last)
