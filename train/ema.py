"""An exponential moving average of the weights (--ema DECAY): what validation scores, what
checkpoints give users (their state_dict), and what --resume restores beside the live weights.

    ema = WeightEMA(model, decay=0.995)
    ... optimizer.step(); ema.update(model) ...
    ema.copy_buffers(model)    # before scoring or saving: BatchNorm statistics are the model's
    evaluate(ema.model, ...)

Short runs gain most: the average smooths the last steps' noise where the cosine has not yet
brought the learning rate down (BENCHMARKS.md, "A better model from the same samples").
"""

from __future__ import annotations

import copy

import torch


class WeightEMA:
    """ema = d·ema + (1 − d)·w after every optimizer step, with d = min(decay, (1 + n) / (10 + n))
    at update n, so the first steps are not pulled toward the random initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = list(self.model.parameters())
        live = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, live, 1 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_buffers(self, model: torch.nn.Module) -> None:
        """BatchNorm's running statistics are not averaged: they are the live model's."""
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)

    def reset(self, model: torch.nn.Module) -> None:
        """Start the average again from `model` (a new stage from the previous one's best)."""
        self.model.load_state_dict(model.state_dict())
        self.updates = 0
