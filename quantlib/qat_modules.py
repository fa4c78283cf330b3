"""Global QAT's model surgery: every quantized Linear swapped for a `QATLinear`, a fake-quantized
stand-in whose quantization parameters (or latent weights) train, and back (`attach_qat` /
`detach_qat`), plus the activation checkpointing of whole decoder blocks during training.
quantlib.qat drives the training between them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import ModelAdapter
from .capture import swap_module
from .primitives import contiguous_groups, dequantize, expand, round_ste, ste_codes
from .qweight import QuantizedWeight

__all__ = ["TRAINABLES", "QATLinear", "QATModules", "attach_qat", "detach_qat"]

TRAINABLES = ("scales", "scales+zeros", "weights")


class QATLinear(nn.Module):
    """Fake-quantized stand-in for one quantized Linear (or GPT-2 Conv1D), in (out, in) orientation.

    Buffers: codes (out, in) uint8, scale0 / zero0 (out, G) fp32, g_idx (in,), bias (out,) or None.
    Parameters by mode: log_scale (out, G) always; zero (out, G) for "scales+zeros"; latent (out, in)
    for "weights" (in units of the initial step: the latent fp weight is s0 * latent). With nothing
    trained, forward equals the dequantized Linear bit for bit and
    `harden()` returns the input codes, scales and zeros unchanged.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, trainable: str) -> None:
        super().__init__()
        if trainable not in TRAINABLES:
            raise ValueError(f"trainable must be one of {TRAINABLES}, got {trainable!r}")
        self.spec, self.trainable = qw.spec, trainable
        # detached copies: results made with autograd on (e.g. RTN on a model whose weights require
        # grad) carry a graph back to the original weights
        self.register_buffer("codes", qw.qweight.detach().clone())
        self.register_buffer("scale0", qw.scale.detach().float().clone())
        self.register_buffer("zero0", qw.zero.detach().float().clone())
        self.register_buffer("g_idx", qw.g_idx.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))  # exp(0) == 1 exactly: s == s0 at init
        self.zero = nn.Parameter(self.zero0.clone()) if trainable == "scales+zeros" else None
        # "weights": the latent fp weight is s0 * latent, i.e. the parameter is kept in units of the
        # group's initial step so that one weight_lr fits every layer; init q0 - z0 (exact integers),
        # so s0 * latent is the dequantized weight bit for bit
        n = self.codes.shape[1]
        self.latent = None
        if trainable == "weights":
            self.latent = nn.Parameter(self.codes.float() - expand(self.zero0, n, self.g_idx))
        # "scales" over contiguous groups (column j in group j // gs, as every solver here writes them):
        # w_hat = s (q - z) with q - z fixed, so forward and backward run on (out, G, gs) views of q - z
        # kept in the matmul's dtype, without the gather/scatter of expand or the per-step casts
        # (docs/benchmarks/profile.md, bf16 QAT on 2 threads: with quantlib.logits' single head cast,
        # 30.1 s -> 25.1 s per 4 steps)
        g = self.scale0.shape[1]
        self.contiguous = trainable == "scales" and contiguous_groups(self.g_idx, g)
        self._qz: torch.Tensor | None = None  # q - z as (out, G, gs), built on first use in the forward's dtype

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), each (out, G); zero is integral (STE through the rounding)."""
        scale = self.scale0 * torch.exp(self.log_scale)
        if self.zero is None:
            return scale, self.zero0
        return scale, torch.clamp(round_ste(self.zero), 0, self.spec.maxq)

    def fake_quant(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_hat (out, in), codes (out, in) float, scale, zero): w_hat = s (q - z), computed exactly as
        QuantizedWeight.dequantize does so the hardened result reproduces it."""
        scale, zero = self.qparams()
        n = self.codes.shape[1]
        s, z = expand(scale, n, self.g_idx), expand(zero, n, self.g_idx)
        q = self.codes.to(s.dtype) if self.latent is None else ste_codes(self.latent_weight() / s, z, self.spec.maxq)
        return dequantize(q, s, z), q, scale, zero

    def latent_weight(self) -> torch.Tensor:
        """(out, in) latent fp weight of the "weights" mode: s0 * latent."""
        return expand(self.scale0, self.codes.shape[1], self.g_idx) * self.latent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._grouped_weight(x) if self.contiguous else self.fake_quant()[0].to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _grouped_weight(self, x: torch.Tensor) -> torch.Tensor:
        """(out, in) s (q - z) in the dtype the matmul runs in (autocast's, else x's). In fp32 it equals
        fake_quant()'s w_hat bit for bit (q - z is exact; one rounding of the product either way); under
        bf16 autocast it is bf16(s) (q - z) rounded once, and the scale's gradient comes back in bf16 precision."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if self._qz is None or self._qz.dtype != dtype or self._qz.device != self.codes.device:
            out, g = self.scale0.shape
            qz = self.codes.float().view(out, g, -1) - self.zero0.unsqueeze(-1)  # exact small integers
            self._qz = qz.to(dtype)
        scale = self.qparams()[0]
        return (self._qz * scale.to(dtype).unsqueeze(-1)).flatten(1)

    @torch.no_grad()
    def harden(self) -> QuantizedWeight:
        _, q, scale, zero = self.fake_quant()
        latent = None if self.latent is None else self.latent_weight().float().cpu().clone()
        return QuantizedWeight(q.to(torch.uint8).cpu(), scale.detach().float().cpu().clone(),
                               zero.detach().float().cpu().clone(), self.g_idx.cpu().clone(), self.spec, latent=latent)

    def param_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """{optimizer group: {parameter name: parameter}}."""
        groups = {"scales": {"log_scale": self.log_scale}, "zeros": {}, "weights": {}}
        if self.zero is not None:
            groups["zeros"]["zero"] = self.zero
        if self.latent is not None:
            groups["weights"]["latent"] = self.latent
        return groups


# --------------------------------------------------------------------------- model surgery


@dataclass
class QATModules:
    """The QATLinears now in the model and the modules they replaced, both by full module path."""

    qat: dict[str, QATLinear]
    original: dict[str, nn.Module]


def attach_qat(adapter: ModelAdapter, results: dict[str, QuantizedWeight], trainable: str) -> QATModules:
    """Replace every Linear named in `results` by a QATLinear on the same device (sorted by name, so
    parameter order, and hence optimizer state, is the same for the same inputs)."""
    model = adapter.model
    mods = QATModules({}, {})
    for name in sorted(results):
        original = model.get_submodule(name)
        device = adapter.get_weight(original).device
        qat = QATLinear(results[name], getattr(original, "bias", None), trainable).to(device)
        swap_module(model, name, qat)
        mods.qat[name], mods.original[name] = qat, original
    return mods


def detach_qat(adapter: ModelAdapter, mods: QATModules) -> dict[str, QuantizedWeight]:
    """Harden every QATLinear and put its original module back holding the dequantized result."""
    results = {}
    for name, qat in mods.qat.items():
        qw = qat.harden()
        original = mods.original[name]
        adapter.set_weight(original, qw.dequantize())
        adapter.model.set_submodule(name, original)
        results[name] = qw
    return results


class _Checkpointed(nn.Module):
    """One decoder block run under activation checkpointing (its activations are recomputed in the
    backward pass); attribute reads fall through so the model still sees e.g. `attention_type`."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def _set_checkpointing(adapter: ModelAdapter, on: bool) -> None:
    blocks = adapter.blocks
    for i, b in enumerate(blocks):
        if on and not isinstance(b, _Checkpointed):
            blocks[i] = _Checkpointed(b)
        elif not on and isinstance(b, _Checkpointed):
            blocks[i] = b.block
