"""Pure quantization primitives: (scale, zero) from ranges, quantize, dequantize, fake-quant with STE.

Shapes: a weight is (out, in); qparams are (out, G) with G = in / group_size (G = 1 per-channel);
`expand` repeats them to (out, in) so every op is elementwise.
"""
from __future__ import annotations

import torch

from .spec import QuantSpec

__all__ = [
    "qparams_from_range",
    "minmax_qparams",
    "search_qparams",
    "expand",
    "contiguous_groups",
    "quantize",
    "dequantize",
    "fake_quant",
    "ste_codes",
    "floor_ste",
    "round_ste",
]


def qparams_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for ranges [wmin, wmax]; the range always contains 0 so zero is exact."""
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    if spec.sym:
        amax = torch.maximum(-wmin, wmax)
        scale = 2 * amax / spec.maxq
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        scale = (wmax - wmin) / spec.maxq
        zero = None
    # all-zero rows/groups: any positive scale reproduces them exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.round(-wmin / scale).clamp(0, spec.maxq)
    return scale, zero


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(out, in) -> (out, G, g) view of the groups."""
    out, n = w.shape
    g = spec.group_width(n)
    spec.groups(n)  # validates divisibility
    return w.reshape(out, n // g, g)


def minmax_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (scale, zero), each (out, G)."""
    wg = _grouped(w.float(), spec)
    return qparams_from_range(wg.amin(-1), wg.amax(-1), spec)


def search_qparams(
    w: torch.Tensor,
    spec: QuantSpec,
    grid: int = 80,
    max_shrink: float = 0.75,
    norm: float = 2.4,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping search: shrink each group's range by p in (1 - max_shrink, 1] and keep the p
    minimizing sum(weight * |w - Q(w)|^norm) per group. `weight` (in,) e.g. diag(H) for a
    Hessian-aware choice; None means uniform."""
    wg = _grouped(w.float(), spec)  # (out, G, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    cw = None if weight is None else _grouped(weight.float().reshape(1, -1), spec)  # (1, G, g)
    best_s, best_z = qparams_from_range(lo, hi, spec)
    best_err = torch.full_like(lo, float("inf"))
    for i in range(grid):
        p = 1.0 - max_shrink * i / grid
        s, z = qparams_from_range(p * lo, p * hi, spec)
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, spec.maxq)
        e = (s[..., None] * (q - z[..., None]) - wg).abs().pow(norm)
        err = (e if cw is None else e * cw).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def expand(p: torch.Tensor, in_features: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """(out, G) -> (out, in): column j uses group g_idx[j] (default j // (in / G))."""
    if g_idx is None:
        return p.repeat_interleave(in_features // p.shape[1], dim=1)
    return p[:, g_idx.long()]


def contiguous_groups(g_idx: torch.Tensor, groups: int) -> bool:
    """Whether column j is in group j // (in / groups), the layout every solver here writes, so (out, in)
    tensors can be handled as (out, groups, group size) views."""
    n = g_idx.numel()
    return n % groups == 0 and torch.equal(g_idx.long().cpu(), torch.arange(n) // (n // groups))


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (same shape as w, uint8) for elementwise-broadcast scale/zero."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q.to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q.to(scale.dtype) - zero)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """floor() forward, identity gradient (straight-through estimator)."""
    return x + (torch.floor(x) - x).detach()


def ste_codes(w_over_s: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Float codes clamp(round(w / s) + z, 0, maxq), rounded exactly as `quantize` rounds (half to
    even before the zero is added, so ties land where RTN and GPTQ put them); the round is
    straight-through, the clamp and the zero carry true gradients."""
    return torch.clamp(round_ste(w_over_s) + zero, 0, maxq)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Differentiable quantize-dequantize (the one weight fake-quant: reconstruction's and QAT's
    modules use ste_codes and dequantize as this does): STE through round, true gradient through
    clamp, scale and zero (as in LSQ/OmniQuant). Forward equals dequantize(quantize(w))."""
    return dequantize(ste_codes(w / scale, zero, maxq), scale, zero)
