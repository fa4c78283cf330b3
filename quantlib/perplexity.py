"""Perplexity over fixed windows of token ids: each window scored on its own, no BOS, no carry-over."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["window_nll", "perplexity"]


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, score_from: int = 0) -> tuple[float, int]:
    """windows: (B, T) ids. Sum of next-token NLL over positions t >= score_from (targets t+1),
    computed in float64, and the number of predicted tokens."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    logits = model(input_ids=windows, use_cache=False).logits[:, score_from:-1]  # (B, T-1-s, V)
    targets = windows[:, score_from + 1 :]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll.double()), targets.numel()


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    score_from: int = 0,
    progress: Callable[[int], None] | None = None,
) -> float:
    """exp(total NLL / total predicted tokens) over (W, T) windows, in batches (deterministic:
    fixed order, float64 accumulation). score_from > 0 gives strided evaluation where the first
    tokens of each window are context only."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (W, T) with T >= 2, got {tuple(windows.shape)}")
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        nll, n = window_nll(model, windows[i : i + batch_size], score_from)
        total += nll
        count += n
        if progress is not None:
            progress(min(batch_size, windows.shape[0] - i))
    return math.exp(total / count)
