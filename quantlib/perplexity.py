"""Perplexity over fixed windows of token ids: each window scored on its own, no BOS, no carry-over."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .logits import LOGIT_BUDGET, chunked_sum, final_hidden

__all__ = ["window_nll", "perplexity"]


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, score_from: int = 0,
               budget: int = LOGIT_BUDGET) -> tuple[float, int]:
    """windows: (B, T) ids. Sum of next-token NLL over positions t >= score_from (targets t+1),
    accumulated in float64, and the number of predicted tokens. The LM head runs on chunks of at most
    `budget` logits (quantlib.logits), so a 262k vocabulary costs no more memory than a small one."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    hidden = final_hidden(model, windows)[:, score_from:-1]  # (B, T-1-s, d): the full logits never exist
    targets = windows[:, score_from + 1 :]

    def nll(logits: torch.Tensor, sl: slice) -> torch.Tensor:  # logits (B, c, V) fp32
        return F.cross_entropy(logits.flatten(0, 1), targets[:, sl].flatten(), reduction="sum").double()

    return float(chunked_sum(model, hidden, nll, budget)), targets.numel()


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
