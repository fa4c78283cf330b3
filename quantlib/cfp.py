"""CBQ's coarse-to-fine pre-processing (CFP) of outliers, applied to one block before quantization.

Weights: per output channel, coarse candidates are |w| above Q3 + 1.5 IQR; the fine step sorts the
candidates (in units of the row's mean |w|, so the cut does not depend on the weights' scale) and
picks the split maximizing (distance between the two sets' means) - lam x (sum of their variances);
values beyond the split are outliers and get truncated to it (a lossy step,
justified by the range it saves every other weight in the group).
Activations: input channels of a norm-fed Linear group whose max |x| is an IQR outlier among the
channels are scaled down by s_c = sqrt(max|x_c| / max|W[:, c]|) (SmoothQuant, alpha = 0.5); the
group's weight columns are multiplied by s_c and the norm's scale divided by it, so the FP function
is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import ModelAdapter

__all__ = ["CFPConfig", "weight_outlier_threshold", "truncate_weight_outliers", "activation_scales", "fold_scales",
           "norm_fed_absmax", "group_weight_absmax", "apply_cfp"]


@dataclass(frozen=True)
class CFPConfig:
    weights: bool = True
    activations: bool = True
    iqr_k: float = 1.5
    lam: float = 1.0  # weight of the intra-set variance in the fine split
    max_scale: float = 16.0

    def __post_init__(self) -> None:
        if self.iqr_k <= 0 or self.lam < 0 or self.max_scale < 1:
            raise ValueError("CFP needs iqr_k > 0, lam >= 0 and max_scale >= 1")


def _iqr_upper(x: torch.Tensor, k: float) -> torch.Tensor:
    """Q3 + k IQR along the last dimension."""
    q1, q3 = torch.quantile(x, 0.25, dim=-1, keepdim=True), torch.quantile(x, 0.75, dim=-1, keepdim=True)
    return q3 + k * (q3 - q1)


def _fine_split(values: torch.Tensor, lam: float) -> float:
    """values: sorted ascending 1-D candidates (>= 2). The threshold between the split sets that
    maximizes mean distance - lam * (var_low + var_high): every split at once from prefix sums of
    v and v^2 (float64), the first best split on ties."""
    v = values.double()
    n = v.numel()
    i = torch.arange(1, n, dtype=torch.float64, device=v.device)  # the low set is v[:i]
    s1, s2 = v.cumsum(0), (v * v).cumsum(0)
    lo_mean, lo_sq = s1[:-1] / i, s2[:-1] / i
    hi_mean, hi_sq = (s1[-1] - s1[:-1]) / (n - i), (s2[-1] - s2[:-1]) / (n - i)
    var = (lo_sq - lo_mean ** 2).clamp_min(0) + (hi_sq - hi_mean ** 2).clamp_min(0)
    best = int(torch.argmax((hi_mean - lo_mean) - lam * var))
    return float(values[best])


def weight_outlier_threshold(w_row: torch.Tensor, cfg: CFPConfig) -> float | None:
    """Truncation threshold on |w| for one output channel, or None when it has no outliers.

    The split runs on |w| / mean|w| (the row's own unit): its score adds a distance of means to
    variances, which scale differently, so on raw magnitudes the cut would move with the weights'
    overall scale; normalized, thr(c w) = c thr(w)."""
    return _thresholds(w_row[None], cfg)[0]


def _thresholds(w: torch.Tensor, cfg: CFPConfig) -> list[float | None]:
    """weight_outlier_threshold of every row of (out, in) w, all rows at once: each row's candidates
    sorted to its front (the rest padded with zeros after them), prefix sums of v and v^2 (float64)
    give every split of every row, and rows with fewer than 2 candidates have none. The sums run in
    _fine_split's order, so each row's cut equals _fine_split on that row alone."""
    if w.shape[1] < 2:
        return [None] * w.shape[0]
    a = w.abs().float()
    ref = a.mean(1, keepdim=True).clamp_min(1e-30)  # (out, 1)
    u = a / ref
    cand = u > _iqr_upper(u, cfg.iqr_k)  # the IQR rule is scale-free: the same set as on |w|
    lam = (cfg.lam * u.var(1, unbiased=False)).double()  # (out,)
    n = cand.sum(1)  # (out,) candidates per row
    k = max(int(n.max()), 2)  # the widest row's candidates: columns past k hold none
    v = torch.sort(torch.where(cand, u, torch.inf), dim=1).values[:, :k]  # (out, k): candidates first, ascending
    z = torch.where(n[:, None] > torch.arange(k, device=w.device), v, 0).double()
    c1, c2 = z.cumsum(1), (z * z).cumsum(1)  # (out, k); the last column: each row's totals
    s1, s2 = c1[:, :-1], c2[:, :-1]  # (out, k - 1): sums of the low set, the first i = 1, 2, ... values
    i = torch.arange(1, k, dtype=torch.float64, device=w.device)
    hi_n = (n[:, None] - i).clamp_min(1)  # splits at i >= n are masked below
    lo_mean, lo_sq = s1 / i, s2 / i
    hi_mean, hi_sq = (c1[:, -1:] - s1) / hi_n, (c2[:, -1:] - s2) / hi_n
    var = (lo_sq - lo_mean ** 2).clamp_min(0) + (hi_sq - hi_mean ** 2).clamp_min(0)
    score = torch.where(i < n[:, None], (hi_mean - lo_mean) - lam[:, None] * var, -torch.inf)
    thr = v.gather(1, score.argmax(1, keepdim=True)).double() * ref.double()  # (out, 1)
    return [float(t) if k >= 2 else None for t, k in zip(thr[:, 0].tolist(), n.tolist())]


def truncate_weight_outliers(w: torch.Tensor, cfg: CFPConfig) -> tuple[torch.Tensor, int]:
    """(out, in) -> weights with each row's outliers clipped to its threshold; and how many."""
    thr = torch.tensor([float("inf") if t is None else t for t in _thresholds(w, cfg)], dtype=w.dtype,
                       device=w.device)[:, None]
    count = int((w.abs() > thr).sum())
    return torch.minimum(torch.maximum(w, -thr), thr), count


def activation_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, cfg: CFPConfig) -> torch.Tensor:
    """Per input channel scale (in,): > 1 only on IQR-outlier channels of max |x|."""
    outlier = x_absmax > _iqr_upper(x_absmax, cfg.iqr_k)
    s = torch.sqrt(x_absmax.clamp_min(1e-8) / w_absmax.clamp_min(1e-8)).clamp(1.0, cfg.max_scale)
    return torch.where(outlier, s, torch.ones_like(s))


@torch.no_grad()
def fold_scales(adapter: ModelAdapter, block: nn.Module, norm: str, group: int, scales: torch.Tensor) -> None:
    """x -> x / s at `norm`'s output, W[:, c] -> W[:, c] s_c for every Linear of `group`: exact."""
    n = block.get_submodule(norm)
    off = adapter.family.norm_offset
    n.weight.copy_(((off + n.weight.float()) / scales - off).to(n.weight.dtype))
    if getattr(n, "bias", None) is not None:
        n.bias.copy_((n.bias.float() / scales).to(n.bias.dtype))
    for name in adapter.groups(block)[group]:
        m = block.get_submodule(name)
        adapter.set_weight(m, adapter.get_weight(m).float() * scales[None, :])


@torch.no_grad()
def norm_fed_absmax(adapter: ModelAdapter, block: nn.Module, inputs, call, device) -> dict[int, torch.Tensor]:
    """{group index: (in,) max |x| per input channel} for every norm-fed group of the block, over the
    calibration inputs (an iterable of (b, T, d) batches): one forward with hooks."""
    from .capture import run_with_hooks

    groups = adapter.groups(block)
    amax: dict[int, torch.Tensor] = {}

    def hook(g):
        def fn(_m, args, _out):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[g] = a if g not in amax else torch.maximum(amax[g], a)
        return fn

    handles = [block.get_submodule(groups[g][0]).register_forward_hook(hook(g)) for _, g in adapter.family.norms]
    run_with_hooks(block, inputs, call, device, handles)
    return amax


def group_weight_absmax(adapter: ModelAdapter, block: nn.Module, group: int) -> torch.Tensor:
    """(in,) max |W[:, c]| over every Linear of the block's group."""
    return torch.stack([adapter.get_weight(block.get_submodule(n)).abs().amax(0).float()
                        for n in adapter.groups(block)[group]]).amax(0)


@torch.no_grad()
def apply_cfp(adapter: ModelAdapter, block: nn.Module, inputs, call, cfg: CFPConfig, device) -> dict[str, int]:
    """CFP on one block in place, given its calibration inputs (an iterable of (b, T, d) batches).
    Returns counts: scaled activation channels and truncated weights."""
    counts = {"scaled_channels": 0, "truncated_weights": 0}
    if cfg.activations:
        amax = norm_fed_absmax(adapter, block, inputs, call, device)
        for norm, g in adapter.family.norms:
            s = activation_scales(amax[g], group_weight_absmax(adapter, block, g), cfg)
            counts["scaled_channels"] += int((s > 1).sum())
            fold_scales(adapter, block, norm, g, s)
    if cfg.weights:
        for name, m in adapter.linears(block).items():
            w, c = truncate_weight_outliers(adapter.get_weight(m).float(), cfg)
            adapter.set_weight(m, w)
            counts["truncated_weights"] += c
    return counts
