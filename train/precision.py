"""The precision and memory format the model computes in: bf16 autocast or float32, chosen by
what is measured on this machine, never by a rule drawn on another.

    p = precision.choose("cpu", "auto", probe=Probe("unet", res=64, batch=16))   # a Precision
    model = p.prepare(model)
    with p.autocast():
        mask, depth = model(p.input(x))

`auto` on a CUDA GPU: bf16 where it is native (Ampere and later). On a CPU: a few interleaved
steps of each, timed on this model, resolution and batch (training steps for the trainer,
forward passes for evaluate and predict), the faster kept. Whether bf16 pays depends on the CPU
(AMX, AVX512-BF16 alone, neither) and on the model, which no flag test predicts: see
BENCHMARKS.md, "Precision chosen by measurement". The result is cached per CPU, torch version,
oneDNN cap, threads, model, resolution and batch in ~/.cache/depthseg/precision.json (or
$DEPTHSEG_PRECISION_CACHE), so a second run pays nothing. Ranks measure together, as they will
train, and agree on one choice. channels_last everywhere: oneDNN and cuDNN both run convolutions
faster on it. Losses, the sigmoid outputs and metrics stay IEEE float32 or better whatever
autocast or TF32 say (train.model's heads and train.losses see to it); ONNX export is float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

MODES = ("auto", "bf16", "float32")
TIMED_STEPS = 3  # per precision at most, after one warm-up each, interleaved: the least of each
TIMING_BUDGET_S = 5.0  # no further round once the timed steps took this long (224 px on a slow CPU)


@dataclass(frozen=True)
class Precision:
    device_type: str
    bf16: bool
    channels_last: bool = True
    why: str = field(default="", compare=False)  # how it was chosen, for the run's first lines

    def autocast(self):
        """A context in which the model runs: bf16 autocast, or nothing."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __str__(self) -> str:
        return ("bf16 autocast" if self.bf16 else "float32") + (", channels_last" if self.channels_last else "")


@dataclass(frozen=True)
class Probe:
    """What `auto` times on a CPU: this model at this resolution and per-rank batch, training
    steps (train=True) or forward passes."""

    model: str
    res: int
    batch: int
    train: bool = True


def cuda_bf16_is_native(device: torch.device) -> bool:
    try:  # emulated bf16 (before Ampere) is slower than float32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no such argument and counts only native support
        return torch.cuda.is_bf16_supported()


def choose(device: torch.device | str, mode: str = "auto", channels_last: bool = True, probe: Probe | None = None) -> Precision:
    """The precision for `mode`: bf16 or float32 as asked; auto as the module docstring says (on
    a CPU without a probe, nothing to time: float32)."""
    device = torch.device(device)
    if mode not in MODES:
        raise ValueError(f"precision must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return Precision(device.type, mode == "bf16", channels_last, "asked for")
    if device.type == "cuda":
        native = cuda_bf16_is_native(device)
        return Precision("cuda", native, channels_last, "native on this GPU" if native else "bf16 is emulated on this GPU")
    if device.type != "cpu" or probe is None:
        return Precision(device.type, False, channels_last, "nothing measured")
    return _measured(probe, channels_last)


def _measured(probe: Probe, channels_last: bool) -> Precision:
    """bf16 or float32 for the probe on this CPU, from the cache or timed now by every rank at
    once; every rank gets the same answer."""
    key = cache_key(probe, channels_last)
    entry = _cached(key)
    if not _all_ranks(entry is not None):
        seconds = time_steps(probe, channels_last)
        entry = _agree({"float32": seconds[0], "bf16": seconds[1]})
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            _store(key, entry)
        how = "timed just now"
    else:
        entry = _agree(entry)
        how = f"timed earlier, cached in {cache_path()}"
    bf16 = entry["bf16"] < entry["float32"]
    ratio = entry["float32"] / entry["bf16"]
    return Precision("cpu", bf16, channels_last, f"bf16 at {ratio:.2f}x float32's speed on this CPU, {how}")


def time_steps(probe: Probe, channels_last: bool, steps: int = TIMED_STEPS) -> tuple[float, float]:
    """Seconds of one step in float32 and in bf16 (the least of up to `steps` each, after a
    warm-up, interleaved so a drifting machine load falls on both; fewer past TIMING_BUDGET_S): a fresh model of the probe's kind on
    random tensors; training steps are the trainer's (autocast forward, the loss in float32,
    backward, fused AdamW). Leaves the global RNG as it was."""
    from train.losses import LossWeights, total_loss
    from train.model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        kinds = [Precision("cpu", bf16, channels_last) for bf16 in (False, True)]
        net = kinds[0].prepare(build_model(probe.model)).train(probe.train)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=True)
        x = kinds[0].input(torch.rand(probe.batch, 6, probe.res, probe.res))
        mask, depth = torch.rand(2, probe.batch, 1, probe.res, probe.res).unbind(0)

        def step(p: Precision) -> float:
            t0 = time.perf_counter()
            with torch.set_grad_enabled(probe.train), p.autocast():
                m, d = net(x)
            if probe.train:
                loss, _ = total_loss(m, d, mask, depth, LossWeights(w_dice=1.0, w_lovasz=1.0, mask_image_terms=False))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return time.perf_counter() - t0

        for p in kinds:
            step(p)  # warm-up: oneDNN makes its primitives on the first call of each shape and type
        best, spent = [float("inf"), float("inf")], 0.0
        for _ in range(steps):
            times = [step(p) for p in kinds]
            best, spent = [min(b, t) for b, t in zip(best, times)], spent + sum(times)
            if spent > TIMING_BUDGET_S:
                break
    return best[0], best[1]


def cpu_identity() -> str:
    """The CPU as oneDNN sees it: vendor, family, model, stepping and feature flags (model names
    such as "AMD EPYC" name several generations), and the ISA cap oneDNN is given."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("vendor_id", "cpu family", "model", "stepping", "model name", "flags") and k.strip() not in info:
                info[k.strip()] = v.strip()
    except OSError:
        import platform

        info["processor"] = platform.processor() or platform.machine()
    info["onednn_cap"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL")
    return json.dumps(info, sort_keys=True)


def cache_key(probe: Probe, channels_last: bool) -> str:
    cpu = hashlib.sha256(cpu_identity().encode()).hexdigest()[:16]
    return (f"cpu {cpu} torch {torch.__version__} threads {torch.get_num_threads()} {probe.model} {probe.res}px "
            f"batch {probe.batch} {'train' if probe.train else 'infer'}{'' if channels_last else ' nchw'}")


def cache_path() -> Path:
    if os.environ.get("DEPTHSEG_PRECISION_CACHE"):
        return Path(os.environ["DEPTHSEG_PRECISION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "depthseg" / "precision.json"


def _read() -> dict:
    try:
        table = json.loads(cache_path().read_text())
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: measured again, rewritten
        return {}


def _cached(key: str) -> dict | None:
    entry = _read().get(key)
    ok = isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0 for k in ("float32", "bf16"))
    return {"float32": float(entry["float32"]), "bf16": float(entry["bf16"])} if ok else None


def _store(key: str, entry: dict) -> None:
    """Atomically, beside what other runs stored; a cache that cannot be written costs a
    measurement next time, not the run."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {**_read(), key: {**entry, "measured": time.strftime("%Y-%m-%d")}}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def _all_ranks(flag: bool) -> bool:
    """Whether `flag` holds on every rank (a rank whose node has no cache entry makes all measure)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _agree(entry: dict) -> dict:
    """The ranks' seconds summed: one decision for all, from what all of them timed."""
    if not dist.is_initialized():
        return entry
    t = torch.tensor([entry["float32"], entry["bf16"]], dtype=torch.float64)
    dist.all_reduce(t)
    return {"float32": t[0].item(), "bf16": t[1].item()}
