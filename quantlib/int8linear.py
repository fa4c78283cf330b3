"""Int8Linear: the W8A8 Linear a served release runs, integer weights times integer activations.

y = (q_x @ q_w^T) * s_x * s_w + b, with q_x, s_x the per-token int8 quantization of the input
(quantlib.actquant.quantize_tokens, scheme a8; or with a static `input_scale` one calibrated scale
for every token, a8s) and q_w, s_w the weight's per-channel symmetric int8
codes and fp32 scales: what vLLM's int8 kernels and a compressed-tensors `int-quantized` W8A8 release
compute. The module quantizes its own inputs, so it carries `act_spec` (a8) like a Linear with an
attached activation hook (`quantlib.actquant.attached` reports it, `attach` refuses a second one).

Backends:
- "triton": quantlib.kernels' int8 kernel, int32 accumulation (CUDA, or CPU under TRITON_INTERPRET=1);
- "reference": the kernel's oracle, exact integer products summed in float64;
- "dense": q_x s_x through F.linear against the weight dequantized once and kept, in the input's
  dtype: the same arithmetic as a QuantLinear with an a8 hook, and the CPU path (torch 2.13's CPU int8
  matmul, `torch._int_mm`, has no fast kernel: it was slower than an fp32 matmul here), at dense memory;
- "auto": triton for CUDA inputs when Triton is installed, else the dense arithmetic with the weight
  dequantized on every call (int8 memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .actquant import ActSpec, quantize_static, quantize_tokens
from .kernels.ops import int8_scaled_mm, triton_available
from .kernels.reference import int8_scaled_mm_reference
from .packing import unpack_codes
from .qweight import QuantizedWeight

__all__ = ["Int8Linear", "INT8_BACKENDS", "symmetric_zeros"]

INT8_BACKENDS = ("auto", "triton", "reference", "dense")
A8, A8S = ActSpec(8), ActSpec(8, static=True)


def symmetric_zeros(zeros: torch.Tensor) -> bool:
    """Every 8-bit zero point 128 (symmetric codes): the int8 codes are q - 128."""
    return bool((zeros == 128).all())


class Int8Linear(nn.Module):
    """W8A8 Linear; buffers weight int8 (out, in), weight_scale fp32 (out,), bias (out,) or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, backend: str = "auto",
                 input_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        if backend not in INT8_BACKENDS:
            raise ValueError(f"backend must be one of {INT8_BACKENDS}, got {backend!r}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.act_spec = A8 if input_scale is None else A8S
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # static activations (a8s): one calibrated scale (1,) for every token; None: per token
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1).clone())
        self._dense: torch.Tensor | None = None  # backend "dense": W in the last forward's dtype and device

    @classmethod
    def from_codes(cls, codes: torch.Tensor, zeros: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None = None, backend: str = "auto",
                   input_scale: torch.Tensor | None = None) -> "Int8Linear":
        """codes (out, in) in [0, 255], zeros (out,) all 128, scale (out,): w = scale (codes - 128);
        input_scale: the static activation scale, None for per-token ones."""
        out, n = codes.shape
        if not symmetric_zeros(zeros):
            raise ValueError("Int8Linear takes symmetric codes (every zero point 128); asymmetric 8-bit weights "
                             "need the zero-point correction of QuantLinear")
        m = cls(n, out, bias is not None, backend, input_scale)
        m.weight.copy_((codes.to(torch.int16) - 128).to(torch.int8))
        m.weight_scale.copy_(scale.float().reshape(out))
        if bias is not None:
            m.bias.copy_(bias)
        return m

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto",
                       input_scale: torch.Tensor | None = None) -> "Int8Linear":
        if qw.spec.bits != 8 or qw.scale.shape[1] != 1:
            raise ValueError(f"Int8Linear takes per-channel 8-bit weights, got {qw.spec.bits} bits in "
                             f"{qw.scale.shape[1]} groups")
        return cls.from_codes(qw.qweight, qw.zero[:, 0], qw.scale[:, 0], bias, backend, input_scale)

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                    backend: str = "auto", input_scale: torch.Tensor | None = None) -> "Int8Linear":
        """From PackFormat.GPTQ buffers of 8-bit per-channel codes (qweight (in/4, out), qzeros (1, out/4),
        scales (1, out), g_idx (in,)), the layout QuantLinear holds."""
        n, out = tensors["g_idx"].numel(), tensors["qweight"].shape[1]
        codes = unpack_codes(tensors["qweight"].t().contiguous(), 8, n)  # (out, in), the packing's padding dropped
        zeros = unpack_codes(tensors["qzeros"], 8, out)[0]
        return cls.from_codes(codes, zeros, tensors["scales"][0], bias, backend, input_scale)

    def _kernel(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if x.is_cuda and triton_available() else "dense"

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        """W in x's dtype: dequantized on every call, or once and kept (backend "dense")."""
        if self.backend == "dense" and self._dense is not None and (self._dense.dtype, self._dense.device) == (
                x.dtype, x.device):
            return self._dense
        w = (self.weight.float() * self.weight_scale.float()[:, None]).to(x.dtype)
        if self.backend == "dense":
            self._dense = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        if self.input_scale is None:
            q, s = quantize_tokens(x2, A8)  # int8 (B*T, in), fp32 (B*T, 1)
        else:  # static: one scale for every token
            q, s = quantize_static(x2, self.input_scale, A8S), self.input_scale.float().expand(x2.shape[0], 1)
        kernel = self._kernel(x)
        if kernel == "dense":
            y = F.linear((q.float() * s).to(x.dtype), self._weight(x), None if self.bias is None else self.bias.to(x.dtype))
        else:
            mm = int8_scaled_mm if kernel == "triton" else int8_scaled_mm_reference
            # .float(): a model cast (model.half()) casts these buffers too; the kernel takes fp32 scales
            y = mm(q, self.weight, s[:, 0].contiguous(), self.weight_scale.float(), self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w8{self.act_spec.name}, "
                f"bias={self.bias is not None}, backend={self.backend}")
