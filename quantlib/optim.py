"""The optimizer and learning-rate schedule shared by reconstruction windows and global QAT.

AdamW without weight decay over named parameter groups, each with its own base rate, scaled by one
factor per step: a linear warm-up over the first `warmup` steps ((it + 1) / (warmup + 1)), then the
schedule's shape over the remaining steps, t = (it - warmup) / (steps - warmup) clipped to [0, 1]:
cosine 0.5 (1 + cos(pi t)), linear 1 - t, constant 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SCHEDULES", "schedule_factor", "adamw_with_schedule"]

SCHEDULES = ("cosine", "linear", "constant")
_SHAPES = {"cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)), "linear": lambda t: 1 - t,
           "constant": lambda t: 1.0}


def schedule_factor(it: int, steps: int, schedule: str, warmup: int = 0) -> float:
    """The learning-rate multiplier at step `it` of `steps`."""
    if it < warmup:
        return (it + 1) / (warmup + 1)
    return _SHAPES[schedule](min((it - warmup) / max(steps - warmup, 1), 1.0))


def adamw_with_schedule(groups: list[tuple[list[nn.Parameter], float]], steps: int, schedule: str,
                        warmup: int = 0) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """(optimizer, scheduler) over [(parameters, base lr), ...]; empty groups are left out."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups if ps], weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: schedule_factor(it, steps, schedule, warmup))
