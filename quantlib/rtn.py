"""Round-to-nearest: the floor every method must beat."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .primitives import expand, minmax_qparams, quantize, search_qparams
from .qweight import QuantizedWeight
from .spec import QuantSpec

__all__ = ["RTNConfig", "rtn_quantize"]


@dataclass(frozen=True)
class RTNConfig:
    """clip_search: grid-search a per-group clipping ratio instead of plain min-max."""

    clip_search: bool = False


def rtn_quantize(w: torch.Tensor, spec: QuantSpec, cfg: RTNConfig = RTNConfig()) -> QuantizedWeight:
    """w: (out, in) -> codes with min-max (or searched) qparams per group."""
    w = w.float()
    scale, zero = search_qparams(w, spec) if cfg.clip_search else minmax_qparams(w, spec)
    n = w.shape[1]
    q = quantize(w, expand(scale, n), expand(zero, n), spec.maxq)
    g_idx = torch.arange(n, dtype=torch.int32) // spec.group_width(n)
    return QuantizedWeight(q, scale, zero, g_idx, spec)
