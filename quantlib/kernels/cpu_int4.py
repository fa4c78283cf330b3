"""torch's int4 CPU kernel (`aten._weight_int4pack_mm_for_cpu`, the layout torchao's CPU int4 uses)
for QuantLinear's CPU path: the codes repacked once, bf16/fp16 activations, no dense weight kept.

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

__all__ = ["GROUP_SIZES", "int4_cpu_supported", "pack_int4_cpu", "int4_matmul_cpu"]

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
