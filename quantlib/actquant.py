"""Activation quantization: symmetric integer inputs to the quantized Linears, dynamic per token
or static per tensor.

Dynamic (`a8`, `a4`): each Linear's input row x (one token, `in` values) is quantized on the fly
with its own scale s = max|x| / qmax (qmax = 2^(b-1) - 1), q = clamp(round(x / s), -qmax - 1, qmax),
and the matmul sees q s: what vLLM's int8 W8A8 kernels and compressed-tensors' `dynamic: true,
strategy: token` compute. Static (`a8s`, `a4s`): one scale per Linear, s = max|x| / qmax over every
input it received on the calibration set (`calibrate_static`), fixed at run time; inputs beyond the
calibrated range clip (compressed-tensors' `dynamic: false, strategy: tensor`, with an `input_scale`
per module; vLLM's static int8 path). In training the rounding passes the gradient straight through.

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

__all__ = ["ActSpec", "parse_activations", "quantize_tokens", "fake_quant_tokens", "quantize_static",
           "fake_quant_static", "calibrate_static", "attach", "attached", "input_scales", "scales_to_json",
           "scales_from_json", "smooth_scales",
           "smooth_block"]


@dataclass(frozen=True)
class ActSpec:
    """Symmetric `bits`-bit activations: one dynamic scale per token (row of the Linear's input), or
    with `static` one calibrated scale per Linear."""

    bits: int = 8
    static: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ValueError(f"activation bits must be 4 or 8, got {self.bits!r}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        return f"a{self.bits}" + ("s" if self.static else "")


def parse_activations(name: str | None) -> ActSpec | None:
    """`a8` / `a4` (dynamic per token), `a8s` / `a4s` (static per tensor), or None / "none"
    (weight-only)."""
    if name is None or str(name).strip().lower() in ("", "none", "null"):
        return None
    m = re.fullmatch(r"a(\d+)(s?)", str(name).strip().lower())
    if not m:
        raise ValueError(f"unknown activation scheme {name!r}; expected a8, a4 (dynamic per token), a8s, a4s "
                         "(static per tensor) or null (weight-only)")
    return ActSpec(int(m.group(1)), static=m.group(2) == "s")


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


def quantize_static(x: torch.Tensor, scale: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """x (..., in) -> int8 codes (..., in) with one fixed scale (a 0-d or 1-element fp32 tensor):
    clamp(round(x / scale), -qmax - 1, qmax); inputs beyond the calibrated range clip."""
    return torch.clamp(torch.round(x.float() / scale.float().reshape(())), -spec.qmax - 1, spec.qmax).to(torch.int8)


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """x quantized with its fixed scale (quantize_static), dequantized, same dtype; straight-through."""
    q = quantize_static(x.detach(), scale, spec)
    return x + ((q.float() * scale.float().reshape(())).to(x.dtype) - x).detach()


class _Hook:
    def __init__(self, spec: ActSpec, scale: torch.Tensor | None = None) -> None:
        self.spec, self.scale = spec, scale

    def __call__(self, _module: nn.Module, args: tuple):
        x = args[0]
        if self.scale is None:
            return (fake_quant_tokens(x, self.spec), *args[1:])
        return (fake_quant_static(x, self.scale.to(x.device), self.spec), *args[1:])


@torch.no_grad()
def calibrate_static(model: nn.Module, names, batches, spec: ActSpec) -> dict[str, torch.Tensor]:
    """{name: fp32 scale, shape (1,)}: max |x| / qmax over every input each module in `names` receives
    while `model` runs on `batches` (token-id tensors), in one pass with float inputs. Hooks already
    on a module (an online rotation) run first, so the range is that of what the module computes on."""
    amax: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(_m, args):
            a = args[0].detach().abs().amax().float().cpu()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return hook

    from .logits import final_hidden

    # the backbone only (the full logits, B x T x vocab, are never needed); a quantized LM head's
    # input is the final hidden state, recorded here directly
    head = model.get_output_embeddings()
    head_names = [n for n in names if model.get_submodule(n) is head]
    handles = [model.get_submodule(n).register_forward_pre_hook(recorder(n)) for n in names if n not in head_names]
    device = next(model.parameters()).device
    try:
        for ids in batches:
            hidden = final_hidden(model, ids.to(device))
            for n in head_names:
                recorder(n)(head, (hidden,))
    finally:
        for h in handles:
            h.remove()
    if missing := sorted(set(names) - set(amax)):
        raise ValueError(f"{len(missing)} modules saw no calibration input (e.g. {missing[0]}): a static scale "
                         "needs inputs; use dynamic activations (a8, a4) for them")
    return {n: (amax[n] / spec.qmax).clamp_min(1e-12).reshape(1) for n in names}


def attach(model: nn.Module, names, spec: ActSpec, scales: dict[str, torch.Tensor] | None = None) -> list:
    """Quantize the input of every module in `names` (dotted paths in `model`); returns the handles
    (`handle.remove()` detaches). A static spec takes each module's calibrated scale from `scales`
    (calibrate_static), kept on the module as `input_scale`. A module is marked `act_spec` so a second
    attach is refused; every module is checked before any hook goes on."""
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        if getattr(module, "act_spec", None) is not None:
            raise ValueError(f"{name} already quantizes its inputs ({module.act_spec.name})")
    if spec.static and (missing := [n for n in modules if scales is None or n not in scales]):
        raise ValueError(f"static activations ({spec.name}) need a calibrated scale per module; none for "
                         f"{missing[0]} (quantlib.actquant.calibrate_static)")
    handles = []
    for name, module in modules.items():
        scale = scales[name].float() if spec.static else None
        module.act_spec, module.input_scale = spec, scale
        handles.append(_Handle(module, module.register_forward_pre_hook(_Hook(spec, scale))))
    return handles


class _Handle:
    def __init__(self, module: nn.Module, handle) -> None:
        self.module, self.handle = module, handle

    def remove(self) -> None:
        self.handle.remove()
        self.module.act_spec = self.module.input_scale = None


def input_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module path: its static input scale} of every module with static activations attached."""
    return {n: m.input_scale for n, m in model.named_modules() if getattr(m, "input_scale", None) is not None}


def scales_to_json(scales: dict[str, torch.Tensor]) -> dict[str, float]:
    """Static scales as quantization.json records them (a float32 value is exact as a JSON float)."""
    return {n: float(v) for n, v in sorted(scales.items())}


def scales_from_json(record: dict[str, float]) -> dict[str, torch.Tensor]:
    """The inverse of scales_to_json: {name: fp32 tensor of shape (1,)}."""
    return {n: torch.tensor([float(v)]) for n, v in record.items()}


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
