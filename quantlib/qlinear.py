"""QuantLinear: a Linear holding PackFormat.GPTQ buffers, dequantizing on the fly, and the model
surgery that puts it in place of nn.Linear / GPT-2 Conv1D.

Two phases (as gpt-fast / torchao): `make_quantlinears` computes the packed modules from the
QuantizedWeights without touching the model; `replace_modules` does the surgery.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.cpu import (int4_cpu_supported, int4_matmul_cpu, int8_cpu_supported, int8_matmul_cpu, pack_int4_cpu,
                          pack_int8_cpu)
from .kernels.ops import gptq_matmul, triton_available
from .kernels.reference import dequantize_gptq
from .packing import pack_gptq, packed_words, trivial_g_idx
from .qweight import QuantizedWeight

__all__ = ["QuantLinear", "BACKENDS", "make_quantlinears", "replace_modules", "swap_to_quantlinear"]

BACKENDS = ("auto", "reference", "triton", "dense", "int4", "int8")


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored packed (PackFormat.GPTQ; state-dict keys qweight, qzeros, scales,
    g_idx, and bias when present).

    backend: "reference" dequantizes W to x.dtype with plain torch then runs F.linear; "triton" runs
    the fused kernels (CUDA, or CPU under TRITON_INTERPRET=1); "int4" and "int8" run torch's packed
    CPU kernels (kernels/cpu.py: int4 for codes of <= 4 bits in groups of 32/64/128/256, int8 for
    per-channel 8-bit codes; repacked once at the first forward; fast for bf16 activations only);
    "auto" picks triton for CUDA inputs and int4/int8 for bf16 CPU inputs where the codes fit, else
    reference; "dense" dequantizes W once,
    at the first forward in a dtype and device, and keeps it (not in the state dict): dense speed and
    dense memory, the fp32 CPU path.
    group_size > 0 records that g_idx[k] == k // group_size (the kernels then skip g_idx); 0 = not.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, groups: int, group_size: int,
                 bias: bool = False, scale_dtype: torch.dtype = torch.float16, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        i32 = dict(dtype=torch.int32)
        self.register_buffer("qweight", torch.zeros(packed_words(in_features, bits), out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(groups, packed_words(out_features, bits), **i32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scale_dtype))
        self.register_buffer("g_idx", torch.zeros(in_features, **i32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._dense: torch.Tensor | None = None  # backend "dense": W in the last forward's dtype and device
        self._packed_cpu: tuple | None = None  # backends int4/int8: the kernel's tensors, built once
        self._cpu_kernel = ("int4" if int4_cpu_supported(bits, group_size, in_features) else
                            "int8" if int8_cpu_supported(bits, groups) else None)
        if backend in ("int4", "int8") and self._cpu_kernel != backend:
            raise ValueError(f"backend {backend}: torch's CPU kernels take codes of <= 4 bits in consecutive groups "
                             f"of 32, 64, 128 or 256 dividing the inputs (int4) or per-channel 8-bit codes (int8); "
                             f"got {bits} bits, group {group_size or 'reordered'}, {groups} groups, {in_features} "
                             "inputs (use backend dense or reference)")

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], bits: int, bias: torch.Tensor | None = None,
                    backend: str = "auto") -> "QuantLinear":
        """A QuantLinear around PackFormat.GPTQ tensors (keys qweight, qzeros, scales, g_idx)."""
        scales, g_idx = tensors["scales"], tensors["g_idx"]
        groups, out = scales.shape
        n = g_idx.numel()
        group_size = n // groups if trivial_g_idx(g_idx, groups) else 0
        m = cls(n, out, bits, groups, group_size, bias is not None, scales.dtype, backend)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(m, name).copy_(tensors[name])
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       scale_dtype: torch.dtype = torch.float16, backend: str = "auto") -> "QuantLinear":
        return cls.from_packed(pack_gptq(qw, scale_dtype), qw.spec.bits, bias, backend)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (out, in) weight."""
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype, self.group_size)

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "auto":
            return x.is_cuda and triton_available()
        return self.backend == "triton"

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        """W for the torch path: dequantized now, or once and kept (backend "dense")."""
        if self.backend != "dense":
            return self.dequantize(x.dtype)
        if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
            self._dense = self.dequantize(x.dtype).to(x.device)
        return self._dense

    def _use_cpu_kernel(self, x: torch.Tensor) -> bool:
        if self.backend == "auto":
            return not x.is_cuda and x.dtype == torch.bfloat16 and self._cpu_kernel is not None
        return self.backend in ("int4", "int8")

    def _cpu_matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        if self._cpu_kernel == "int4":
            if self._packed_cpu is None:
                self._packed_cpu = pack_int4_cpu(self.qweight, self.qzeros, self.scales, self.bits, self.in_features)
            y = int4_matmul_cpu(x2, self._packed_cpu[0], self.group_size, self._packed_cpu[1])
        else:
            if self._packed_cpu is None:
                self._packed_cpu = pack_int8_cpu(self.qweight, self.qzeros, self.scales, self.in_features)
            y = int8_matmul_cpu(x2, *self._packed_cpu)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_cpu_kernel(x):
            return self._cpu_matmul(x)
        if not self._use_triton(x):
            return F.linear(x, self._weight(x), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        y = gptq_matmul(x2, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = "pc" if self.scales.shape[0] == 1 else f"g{self.in_features // self.scales.shape[0]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, w{self.bits}{g}, "
                f"bias={self.bias is not None}, backend={self.backend}")


def make_quantlinears(model: nn.Module, qweights: dict[str, QuantizedWeight],
                      scale_dtype: torch.dtype = torch.float16, backend: str = "auto") -> dict[str, QuantLinear]:
    """Phase 1: one QuantLinear per quantized module (biases copied from the model); the model is
    not modified. QuantizedWeights are (out, in) whatever the module's own layout (GPT-2 Conv1D)."""
    out = {}
    for name, qw in qweights.items():
        module = model.get_submodule(name)
        if tuple(module.weight.shape) not in (qw.shape, qw.shape[::-1]):
            raise ValueError(f"{name}: weight {tuple(module.weight.shape)} does not match quantized {qw.shape}")
        bias = getattr(module, "bias", None)
        out[name] = QuantLinear.from_quantized(qw, None if bias is None else bias.detach(), scale_dtype, backend)
    return out


def replace_modules(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """Phase 2: put each module at its dotted path (in place); returns the model."""
    for name, new in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        device = next(iter(old.parameters()), torch.empty(0)).device
        setattr(parent, child, new.to(device))
    return model


def swap_to_quantlinear(model: nn.Module, qweights: dict[str, QuantizedWeight],
                        scale_dtype: torch.dtype = torch.float16, backend: str = "auto") -> nn.Module:
    """Replace every quantized nn.Linear / Conv1D of `model` by a QuantLinear (in place)."""
    return replace_modules(model, make_quantlinears(model, qweights, scale_dtype, backend))
