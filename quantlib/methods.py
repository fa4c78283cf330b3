"""Registry of per-Linear quantization methods, keyed by config type (no if-chains on names)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .boa import BoAConfig, solve_attention
from .gptq import GPTQConfig, gptq_quantize
from .qweight import QuantizedWeight
from .rtn import RTNConfig, rtn_quantize
from .spec import QuantSpec

__all__ = ["Method", "register_method", "method_for", "quantize_weight", "hessian_error"]


@dataclass(frozen=True)
class Method:
    """solve(w (out, in), h (in, in) or None, spec, cfg) -> QuantizedWeight.

    solve_group (optional): for Linears that need more than their own input Hessian (BoA's q/k/v),
    solve_group(adapter, block, group, inputs, call, spec_of, cfg, device) -> {name: (QuantizedWeight,
    error)} for the names of `group` it solves jointly ({} when none); the engine solves the rest.
    spec_of(name) is the scheme of the block's Linear `name` (one per Linear under mixed precision)."""

    name: str
    solve: Callable[[torch.Tensor, torch.Tensor | None, QuantSpec, object], QuantizedWeight]
    needs_hessian: bool
    solve_group: Callable[..., dict[str, tuple[QuantizedWeight, float]]] | None = None


_REGISTRY: dict[type, Method] = {}


def register_method(cfg_type: type, method: Method) -> None:
    _REGISTRY[cfg_type] = method


def method_for(cfg: object) -> Method:
    try:
        return _REGISTRY[type(cfg)]
    except KeyError:
        known = ", ".join(m.name for m in _REGISTRY.values())
        raise ValueError(f"no quantization method registered for {type(cfg).__name__}; known: {known}") from None


def quantize_weight(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: object) -> QuantizedWeight:
    return method_for(cfg).solve(w, h, spec, cfg)


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Layer output error proxy tr(D H D^T) / tr(W H W^T), D = W - W_hat; what GPTQ minimizes."""
    d = (w.float() - w_hat.float()).to(h.device)
    w = w.float().to(h.device)
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


register_method(RTNConfig, Method("rtn", lambda w, h, spec, cfg: rtn_quantize(w, spec, cfg), needs_hessian=False))
register_method(GPTQConfig, Method("gptq", gptq_quantize, needs_hessian=True))
register_method(
    BoAConfig,
    Method("boa", lambda w, h, spec, cfg: gptq_quantize(w, h, spec, cfg.gptq()), needs_hessian=True,
           solve_group=solve_attention),
)
