"""Activation quantization: symmetric integer inputs to the quantized Linears, dynamic per token.

Each Linear's input row x (one token, `in` values) is quantized on the fly with its own scale
s = max|x| / qmax (qmax = 2^(b-1) - 1), q = clamp(round(x / s), -qmax - 1, qmax), and the matmul
sees q s: what vLLM's int8 W8A8 kernels and compressed-tensors' `dynamic: true, strategy: token`
compute. In training the rounding passes the gradient straight through (STE).

Activations are attached to a model with forward pre-hooks (`attach`), so every method, the
evaluation and a loaded release see the same quantized inputs, whatever module class holds the
weights (nn.Linear, QuantLinear, GPT-2's Conv1D).

SmoothQuant (`smooth_block`): per input channel of a norm-fed Linear group, s_c = max|x_c|^alpha /
max|W[:, c]|^(1 - alpha); the norm divides by s, the group's columns multiply by it: the FP function
is unchanged and the activations' outlier channels move into the weights, where per-channel or
per-group weight scales absorb them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ActSpec", "parse_activations", "quantize_tokens", "fake_quant_tokens", "attach", "attached", "smooth_scales",
           "smooth_block"]


@dataclass(frozen=True)
class ActSpec:
    """Symmetric `bits`-bit activations, one dynamic scale per token (row of the Linear's input)."""

    bits: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ValueError(f"activation bits must be 4 or 8, got {self.bits!r}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        return f"a{self.bits}"


def parse_activations(name: str | None) -> ActSpec | None:
    """`a8` / `a4` (dynamic per-token, symmetric) or None / "none" (weight-only)."""
    if name is None or str(name).strip().lower() in ("", "none", "null"):
        return None
    m = re.fullmatch(r"a(\d+)", str(name).strip().lower())
    if not m:
        raise ValueError(f"unknown activation scheme {name!r}; expected a8, a4 or null (weight-only)")
    return ActSpec(int(m.group(1)))


def quantize_tokens(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., in) -> (codes int8 (..., in), scale fp32 (..., 1)), x ~ codes * scale: per-token
    symmetric, the scale computed in fp32; an all-zero row gets codes 0 (scale 1e-12)."""
    xf = x.float()
    s = (xf.abs().amax(-1, keepdim=True) / spec.qmax).clamp_min(1e-12)  # (..., 1)
    return torch.clamp(torch.round(xf / s), -spec.qmax - 1, spec.qmax).to(torch.int8), s


def fake_quant_tokens(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """x (..., in) -> its per-token symmetric quantization (quantize_tokens), dequantized, same
    dtype; the rounding is straight-through for gradients."""
    q, s = quantize_tokens(x.detach(), spec)
    return x + ((q.float() * s).to(x.dtype) - x).detach()


class _Hook:
    def __init__(self, spec: ActSpec) -> None:
        self.spec = spec

    def __call__(self, _module: nn.Module, args: tuple):
        return (fake_quant_tokens(args[0], self.spec), *args[1:])


def attach(model: nn.Module, names, spec: ActSpec) -> list:
    """Quantize the input of every module in `names` (dotted paths in `model`); returns the handles
    (`handle.remove()` detaches). A module is marked `act_spec` so a second attach is refused."""
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():  # all checked before any hook goes on: nothing half-attached
        if getattr(module, "act_spec", None) is not None:
            raise ValueError(f"{name} already quantizes its inputs ({module.act_spec.name})")
    handles = []
    for module in modules.values():
        module.act_spec = spec
        handles.append(_Handle(module, module.register_forward_pre_hook(_Hook(spec))))
    return handles


class _Handle:
    def __init__(self, module: nn.Module, handle) -> None:
        self.module, self.handle = module, handle

    def remove(self) -> None:
        self.handle.remove()
        self.module.act_spec = None


def attached(model: nn.Module) -> dict[str, str]:
    """{module path: activation scheme name} of every module whose inputs are quantized."""
    return {n: m.act_spec.name for n, m in model.named_modules() if getattr(m, "act_spec", None) is not None}


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """(in,) SmoothQuant scales max|x|^alpha / max|W|^(1 - alpha), 1 where a channel is all zero."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    x, w = x_absmax.float().clamp_min(1e-5), w_absmax.float().clamp_min(1e-5)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    return torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))


@torch.no_grad()
def smooth_block(adapter, block: nn.Module, inputs, call, alpha: float, device) -> int:
    """SmoothQuant on one block in place, from its calibration inputs (an iterable of (b, T, d)
    batches): every norm-fed group of adapter.family.norms. Returns the number of smoothed channels."""
    from .cfp import fold_scales, group_weight_absmax, norm_fed_absmax

    amax = norm_fed_absmax(adapter, block, inputs, call, device)
    channels = 0
    for norm, g in adapter.family.norms:
        s = smooth_scales(amax[g], group_weight_absmax(adapter, block, g), alpha)
        fold_scales(adapter, block, norm, g, s)
        channels += s.numel()
    return channels
