"""Plain-torch references of the kernels: the packed GPTQ matmul (QuantLinear's CPU path) and the W8A8
scaled int8 matmul; the kernels' oracles."""
from __future__ import annotations

import torch

from ..packing import unpack_codes

__all__ = ["dequantize_gptq", "gptq_matmul_reference", "int8_scaled_mm_reference"]


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """Dense (out, in) weight from PackFormat.GPTQ buffers, in `dtype` (default: the scales' dtype).
    group_size > 0 promises g_idx[k] == k // group_size (as for the kernels); 0 reads g_idx.

    w = scale * (q - z) is formed in fp32 and rounded once to `dtype`: |q - z| <= 255 times an
    fp16/bf16 scale is exact in fp32, so this equals computing it directly in fp16/bf16 and matches
    the Triton kernels' dequantized tiles bit for bit.
    """
    n, (groups, out) = g_idx.numel(), scales.shape
    q = unpack_codes(qweight.t(), bits, n).float()  # (out, in)
    z = unpack_codes(qzeros, bits, out).float().t()  # (out, G)
    s = scales.float().t()  # (out, G)
    if group_size > 0:  # consecutive groups: broadcast over (out, G, group) instead of gathering
        w = s[:, :, None] * (q.reshape(out, groups, group_size) - z[:, :, None])
        return w.reshape(out, n).to(dtype or scales.dtype)
    g = g_idx.long()
    return (s[:, g] * (q - z[:, g])).to(dtype or scales.dtype)


def gptq_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """(M, K) @ dequantized (N, K)^T -> (M, N) in x.dtype, with the weight rounded to x.dtype and the
    product accumulated in fp32 (as the kernels do)."""
    w = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, x.dtype)
    return (x.float() @ w.float().t()).to(x.dtype)


def int8_scaled_mm_reference(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(a (M, K) int8 @ b (N, K)^T int8) * scale_a[:, None] * scale_b[None, :] + bias -> (M, N).
    The integer products are summed in float64, exactly (every partial sum is an integer below
    2^53), so the accumulator equals the kernel's int32 one on any device; the epilogue is the
    kernel's, in fp32, in the same order."""
    acc = (a.double() @ b.double().t()).float()
    y = acc * scale_a[:, None] * scale_b[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)
