"""torch's packed CPU kernels for QuantLinear's CPU path, the codes repacked once, no dense weight
kept; fast with bf16 activations only (their fp32 and fp16 paths are 5-40x slower than a dense matmul).

int4: `aten._weight_int4pack_mm_for_cpu` (the layout torchao's CPU int4 uses).
The kernel computes y = x W^T with W[n, k] = (q[n, k] - 8) * scale[g, n] + offset[g, n], g = k // group.
Ours is w = s (q - z), z an integer. Where every q - z lies in [-8, 7] (all 2- and 3-bit codes,
symmetric 4-bit ones) the codes are re-centred, q' = q - z + 8, with offset 0: exact, nothing to
cancel. Otherwise (asymmetric 4-bit) scale = s and offset = s (8 - z). Scale and offset are cast to
the activations' dtype, as the kernel requires: bf16 rounds them (a dense bf16 model rounds W), and
an offset of ~8 s that cancels against (q - 8) s would lose the low bits of small weights.
"""
from __future__ import annotations

import torch

from ..packing import unpack_codes

__all__ = ["GROUP_SIZES", "int4_cpu_supported", "pack_int4_cpu", "int4_matmul_cpu", "int8_cpu_supported",
           "pack_int8_cpu", "int8_matmul_cpu"]

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel accepts
INNER_K_TILES = 2


def int4_cpu_supported(bits: int, group_size: int, in_features: int) -> bool:
    """Whether codes of `bits` bits in consecutive groups of `group_size` (0: reordered) fit the kernel."""
    return (bits <= 4 and group_size in GROUP_SIZES and in_features % group_size == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def pack_int4_cpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                  in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes in the kernel's layout, qparams (G, out, 2) fp32 [scale, offset]) from
    PackFormat.GPTQ buffers: qweight int32 (words, out), qzeros int32 (G, words), scales (G, out)."""
    out = scales.shape[1]
    q = unpack_codes(qweight.t(), bits, in_features).to(torch.int32)  # (out, in), values < 2^bits <= 16
    z = unpack_codes(qzeros, bits, out).to(torch.int32)  # (G, out)
    s = scales.float()
    centred = q - z.t().repeat_interleave(in_features // z.shape[0], dim=1) + 8  # (out, in)
    if int(centred.min()) >= 0 and int(centred.max()) <= 15:
        q, offset = centred, torch.zeros_like(s)
    else:
        offset = s * (8 - z.float())
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INNER_K_TILES)
    return packed, torch.stack([s, offset], dim=-1).contiguous()


def int4_matmul_cpu(x: torch.Tensor, packed: torch.Tensor, group_size: int, qparams: torch.Tensor) -> torch.Tensor:
    """(M, K) x.dtype @ W^T -> (M, N) x.dtype, W the int4 weight of pack_int4_cpu."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, qparams.to(x.dtype))


# int8: `aten._weight_int8pack_mm` computes y = x (s * q8)^T for int8 q8 (N, K) and one scale per
# output row, so only per-channel 8-bit codes fit. Ours is w = s (q - z) = s (q - 128) + s (128 - z):
# q8 = q - 128, and a zero other than 128 (asymmetric) adds the rank-one term sum_k(x) * s (128 - z).


def int8_cpu_supported(bits: int, groups: int) -> bool:
    return bits == 8 and groups == 1 and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def pack_int8_cpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q8 int8 (out, in), scale fp32 (out,), correction fp32 (out,) or None when symmetric)."""
    out = scales.shape[1]
    q8 = (unpack_codes(qweight.t(), 8, in_features).to(torch.int16) - 128).to(torch.int8)
    z = unpack_codes(qzeros, 8, out).float()[0]  # (out,)
    s = scales.float()[0]
    return q8.contiguous(), s, None if bool((z == 128).all()) else s * (128 - z)


def int8_matmul_cpu(x: torch.Tensor, q8: torch.Tensor, scale: torch.Tensor,
                    correction: torch.Tensor | None) -> torch.Tensor:
    """(M, K) x.dtype @ W^T -> (M, N) x.dtype, W the 8-bit weight of pack_int8_cpu."""
    # unit scales in the kernel, ours applied in fp32: the kernel would round each row's scale to
    # x.dtype (bf16: up to 0.4%, the same sign over the whole row, which does not average out)
    y = torch.ops.aten._weight_int8pack_mm(x, q8, torch.ones_like(scale, dtype=x.dtype)).float() * scale
    if correction is not None:
        y = y + x.float().sum(-1, keepdim=True) * correction  # the rank-one term
    return y.to(x.dtype)
