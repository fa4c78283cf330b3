"""Our codes as GGUF's legacy block types (llama.cpp's ggml-common.h), bit-exact up to the fp16
rounding of each block's scale d and min m.

A GGUF row of n weights is n/32 blocks; each block holds 32 consecutive weights j of one row:
  Q4_0  d f16 | qs u8[16]           w[j] = d * (nib[j] - 8)
  Q4_1  d f16 | m f16 | qs u8[16]   w[j] = d * nib[j] + m
  Q5_0  d f16 | qh u32 | qs u8[16]  w[j] = d * (nib[j] + 16*hi[j] - 16)
  Q5_1  d f16 | m f16 | qh u32 | qs u8[16]   w[j] = d * (nib[j] + 16*hi[j]) + m
  Q8_0  d f16 | qs i8[32]           w[j] = d * qs[j]
with qs[i] = nib[i] | nib[i+16] << 4 (i < 16) and bit j of qh = hi[j]. All little-endian.

Our weight is w = s * (q - z) per group. With groups of any multiple of 32 every block lies inside
one group, so: asymmetric codes of b <= 4 bits are Q4_1 with d = s, m = -s*z (b = 5: Q5_1);
symmetric codes (z = 2^(b-1)) are Q4_0 (b <= 4), Q5_0 (b = 5) or Q8_0 (b <= 8) with d = s and the
signed code q - z re-centred. Asymmetric codes above 5 bits have no exact legacy type.
"""
from __future__ import annotations

import torch

from .packing import trivial_g_idx
from .qweight import QuantizedWeight
from .spec import QuantSpec

__all__ = ["BLOCK", "BLOCK_BYTES", "gguf_type", "gguf_blocks", "gguf_weight"]

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
_OFFSET = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}  # added to the signed code q - z of a symmetric type


def gguf_type(spec: QuantSpec) -> str:
    """The legacy GGUF type that holds codes of `spec` exactly; ValueError names the fix if none."""
    if spec.group_size is not None and spec.group_size % BLOCK:
        raise ValueError(f"{spec.name}: GGUF blocks are {BLOCK} weights, so the group size must be a multiple of "
                         f"{BLOCK} (use g32, g64, g128 or per-channel)")
    if spec.sym:
        return "Q4_0" if spec.bits <= 4 else "Q5_0" if spec.bits == 5 else "Q8_0"
    if spec.bits <= 5:
        return "Q4_1" if spec.bits <= 4 else "Q5_1"
    raise ValueError(f"{spec.name}: asymmetric {spec.bits}-bit codes have no exact GGUF type; quantize "
                     "symmetrically (sym: true, exported as Q8_0) or with at most 5 bits")


def _block_params(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, nb, 32) int32, s (out, nb) fp32, z (out, nb) fp32): one scale and zero per block."""
    out, n = qw.shape
    if n % BLOCK:
        raise ValueError(f"a GGUF row is whole blocks of {BLOCK}; this layer has {n} inputs")
    if not trivial_g_idx(qw.g_idx, qw.scale.shape[1]):
        raise ValueError("GGUF stores contiguous groups only; act-order codes need static groups "
                         "(gptq.static_groups: true) to be exported")
    per = n // qw.scale.shape[1] // BLOCK  # blocks per group
    s = qw.scale.float().repeat_interleave(per, dim=1)
    z = qw.zero.float().repeat_interleave(per, dim=1)
    return qw.qweight.to(torch.int32).reshape(out, n // BLOCK, BLOCK), s, z


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """(out, nb) float -> (out, nb, 2) uint8, the little-endian fp16 of each value."""
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError("a block scale or min overflows fp16; GGUF cannot store this weight")
    return h.contiguous().view(torch.uint8).reshape(*h.shape, 2)  # little-endian hosts only, as GGUF


def _nibbles(v: torch.Tensor) -> torch.Tensor:
    """(out, nb, 32) values in [0, 31] -> (out, nb, 16) uint8, low nibbles of j and j+16."""
    lo = v & 0xF
    return (lo[..., :16] | (lo[..., 16:] << 4)).to(torch.uint8)


def _high_bits(v: torch.Tensor) -> torch.Tensor:
    """(out, nb, 32) values in [0, 31] -> (out, nb, 4) uint8, the u32 whose bit j is bit 4 of v[j]."""
    bits = (v >> 4) & 1
    word = (bits.to(torch.int64) << torch.arange(BLOCK, dtype=torch.int64)).sum(-1, keepdim=True)
    return ((word >> torch.tensor([0, 8, 16, 24])) & 0xFF).to(torch.uint8)


def gguf_blocks(qw: QuantizedWeight) -> tuple[str, torch.Tensor]:
    """(type name, (out, n/32 * BLOCK_BYTES[type]) uint8): the rows of `qw` as GGUF blocks."""
    kind = gguf_type(qw.spec)
    q, s, z = _block_params(qw)
    parts = [_half_bytes(s)]
    if kind in _OFFSET:  # symmetric: z = 2^(b-1) everywhere, signed code q - z
        v = q - z.to(torch.int32).unsqueeze(-1) + _OFFSET[kind]
    else:
        v = q
        parts.append(_half_bytes(-s * z))
    if kind == "Q8_0":
        parts.append(v.to(torch.int8).view(torch.uint8))
    else:
        if kind in ("Q5_0", "Q5_1"):
            parts.append(_high_bits(v))
        parts.append(_nibbles(v))
    rows = torch.cat(parts, dim=-1)  # (out, nb, BLOCK_BYTES)
    return kind, rows.reshape(rows.shape[0], -1)


def gguf_weight(qw: QuantizedWeight) -> torch.Tensor:
    """(out, in) fp32: what a GGUF reader dequantizes the blocks of `qw` to (d and m rounded to fp16)."""
    kind = gguf_type(qw.spec)
    q, s, z = _block_params(qw)
    d = s.half().float().unsqueeze(-1)
    if kind in _OFFSET:
        w = d * (q - z.unsqueeze(-1))
    else:
        w = d * q + (-s * z).half().float().unsqueeze(-1)
    return w.reshape(qw.shape)
