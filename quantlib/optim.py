"""The optimizer and learning-rate schedule shared by reconstruction windows and global QAT.

AdamW without weight decay (or SignSGD, SignRound's p -= lr sign(grad)) over named parameter groups,
each with its own base rate, scaled by one factor per step: a linear warm-up over the first `warmup`
steps ((it + 1) / (warmup + 1)), then the schedule's shape over the remaining steps, with
t = (it - warmup) / (steps - warmup) clipped to [0, 1]: cosine 0.5 (1 + cos(pi t)), linear 1 - t,
constant 1.

The training forward's arithmetic (`training_autocast`) is shared too: `amp` "fp32" runs it exactly,
"bf16" under bf16 autocast (matmuls and attention in bf16, reductions such as softmax and the losses
in fp32; every trainable parameter and its optimizer state stays fp32), "auto" is bf16 on CUDA and on
a CPU with native bf16 matmuls (AMX or AVX512-BF16), fp32 elsewhere. There oneDNN's bf16 matmuls
cut 4 QAT steps of SmolLM2-135M from 191 s to 76 s, their matmul time from 106.7 s to 16.6 s
(docs/benchmarks/profile.md, `python -m flows.bench_profile --only qat --amp fp32|bf16`).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from torch import nn

__all__ = ["SignSGD", "OPTIMIZERS", "optimizer_with_schedule", "SCHEDULES", "AMP_MODES", "schedule_factor",
           "adamw_with_schedule", "training_autocast", "uses_bf16", "cpu_has_native_bf16"]

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adam", "sign")
AMP_MODES = ("auto", "bf16", "fp32")
_SHAPES = {"cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)), "linear": lambda t: 1 - t,
           "constant": lambda t: 1.0}


def schedule_factor(it: int, steps: int, schedule: str, warmup: int = 0) -> float:
    """The learning-rate multiplier at step `it` of `steps`."""
    if it < warmup:
        return (it + 1) / (warmup + 1)
    return _SHAPES[schedule](min((it - warmup) / max(steps - warmup, 1), 1.0))


class SignSGD(torch.optim.Optimizer):
    """p -= lr sign(grad) (SignRound's optimizer): every parameter moves by exactly lr per step whatever
    its gradient's scale, so lr is a distance (lr ~ 1 / steps with a linear decay bounds the total
    move by about 1/2, a rounding offset's range)."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def optimizer_with_schedule(kind: str, groups: list[tuple[list[nn.Parameter], float]], steps: int, schedule: str,
                            warmup: int = 0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """adamw_with_schedule, or the same schedule over SignSGD (kind "sign")."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    if kind == "adam":
        return adamw_with_schedule(groups, steps, schedule, warmup)
    return _scheduled(SignSGD([{"params": ps, "lr": lr} for ps, lr in groups if ps]), steps, schedule, warmup)


def _scheduled(opt: torch.optim.Optimizer, steps: int, schedule: str, warmup: int):
    """(opt, its LambdaLR following schedule_factor); an unknown schedule fails here."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: schedule_factor(it, steps, schedule, warmup))


def adamw_with_schedule(groups: list[tuple[list[nn.Parameter], float]], steps: int, schedule: str,
                        warmup: int = 0) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """(optimizer, scheduler) over [(parameters, base lr), ...]; empty groups are left out."""
    return _scheduled(torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups if ps], weight_decay=0.0),
                      steps, schedule, warmup)


def uses_bf16(device: torch.device, amp: str) -> bool:
    """Whether a training forward on `device` runs under bf16 autocast for this `amp` mode."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return amp == "bf16" or (amp == "auto" and native)


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (the amx_bf16 or avx512_bf16 flag Linux reports);
    False where the flags cannot be read (another OS): bf16 would then be emulated, slower than fp32."""
    try:
        flags = next((line for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))


def training_autocast(device: torch.device, amp: str) -> torch.autocast:
    """The autocast context a training forward (and its held-out evaluation) runs in."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, amp))
