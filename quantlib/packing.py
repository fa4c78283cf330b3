"""Bit-exact packing of unsigned b-bit codes (b in 2, 3, 4, 8) into int32 words, and the two
checkpoint layouts built on it (GPTQ, compressed-tensors `pack-quantized`).

The bit stream: along the packed dimension, code i occupies bits [i*b, (i+1)*b) of a little-endian
stream cut into 32-bit words, so 32 codes fill exactly b words. For b in (2, 4, 8) a word holds 32/b
whole codes (code i at bit (i % (32/b)) * b of word i // (32/b)); for b = 3 codes 10 and 21 of every
32 straddle a word boundary (GPTQ's and compressed-tensors' 3-bit layout). A dimension of n codes
takes ceil(n*b/32) words; the bits after the last code are zero.

GPTQ v2 and compressed-tensors store the same unsigned codes q in [0, 2^b - 1] and the same zero z
(no offset; GPTQ v1 stores z - 1), with
w = scale * (q - z): compressed-tensors' signed view is q - 2^(b-1) and z - 2^(b-1), and its
packer adds 2^(b-1) back before packing, so the packed bits are identical.
"""
from __future__ import annotations

from dataclasses import replace
from enum import Enum
from typing import Callable

import torch

from .qweight import QuantizedWeight
from .spec import QuantSpec

__all__ = [
    "SUPPORTED_BITS",
    "PackFormat",
    "packed_words",
    "pack_codes",
    "unpack_codes",
    "to_gptq_v1",
    "pack_gptq",
    "unpack_gptq",
    "pack_compressed_tensors",
    "unpack_compressed_tensors",
    "pack_weight",
    "unpack_weight",
    "trivial_g_idx",
]

SUPPORTED_BITS = (2, 3, 4, 8)
_MASK32 = (1 << 32) - 1


class PackFormat(str, Enum):
    """A packed checkpoint layout; each member's docstring spells out its tensors."""

    def __new__(cls, value: str, doc: str) -> "PackFormat":
        member = str.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member

    GPTQ = (
        "gptq",
        """GPTQ `checkpoint_format: gptq` (v1: vLLM, ExLlama, Marlin, AutoGPTQ and GPTQModel read it), per
        Linear NAME with (out, in) weight:
        NAME.qweight  int32 (ceil(in*b/32), out)  codes packed along the input dimension: column o
                      holds the bit stream of q[o, :] (code j of output o at stream bit j*b)
        NAME.qzeros   int32 (G, ceil(out*b/32))   zeros packed along the output dimension, stored
                      as z - 1 (readers add 1 back), so z = 0 cannot be stored: see `to_gptq_v1`
        NAME.scales   fp16 (G, out)
        NAME.g_idx    int32 (in,)                  group of input column j (j // group_size unless
                      act-order without static groups reordered them)
        w[o, j] = scales[g_idx[j], o] * (q[o, j] - z[g_idx[j], o]).""",
    )
    GPTQ_V2 = (
        "gptq_v2",
        """GPTQModel `checkpoint_format: gptq_v2`: the GPTQ tensors with qzeros holding z itself (no
        offset), so every zero in [0, 2^b - 1] is stored exactly.""",
    )
    COMPRESSED_TENSORS = (
        "compressed-tensors",
        """compressed-tensors `pack-quantized` as compressed-tensors 0.20 writes it (dense cross-word
        packing; for 2/4/8 bits identical to older releases' whole-codes-per-word packing, for 3 bits
        not), per Linear NAME with (out, in) weight:
        NAME.weight_packed      int32 (out, ceil(in*b/32))  codes packed along the input dimension
                                within each row (row o holds the bit stream of q[o, :])
        NAME.weight_scale       fp16 or bf16 (out, G)
        NAME.weight_zero_point  int32 (ceil(out*b/32), G)   zeros packed along the output dimension
                                (column g holds the bit stream of z[:, g]); only if asymmetric;
                                symmetric means z = 2^(b-1) and the tensor is absent
        NAME.weight_shape       int64 (2,) = [out, in]
        Groups are consecutive (no g_idx): w[o, j] = weight_scale[o, j // group_size] * (q - z).""",
    )


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"packing supports bits in {SUPPORTED_BITS}, got {bits}")


def packed_words(n: int, bits: int) -> int:
    """int32 words holding n codes of `bits` bits."""
    return -(-n * bits // 32)


def _stream_positions(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(word, bit offset) of each of the 32 codes of one b-word block; both (32,) int64."""
    start = torch.arange(32, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, n) unsigned codes -> (R, ceil(n*bits/32)) int32, packed along the last dimension."""
    _check_bits(bits)
    rows, n = codes.shape
    v = codes.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"codes out of the {bits}-bit range")
    blocks = -(-n // 32)
    v = torch.nn.functional.pad(v, (0, blocks * 32 - n)).view(rows, blocks, 32)  # (R, B, 32)
    word, off = (t.to(codes.device) for t in _stream_positions(bits))
    out = torch.zeros(rows, blocks, bits, dtype=torch.int64, device=codes.device)
    # bit ranges are disjoint, so adding is OR-ing; bits shifted past 31 are masked off below
    out.scatter_add_(2, word.expand(rows, blocks, 32), v << off)
    spill = off + bits > 32  # codes that straddle into the next word (only for bits = 3)
    if bool(spill.any()):
        out.scatter_add_(2, (word[spill] + 1).expand(rows, blocks, -1), v[..., spill] >> (32 - off[spill]))
    out = (out & _MASK32).view(rows, blocks * bits)[:, : packed_words(n, bits)]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # reinterpret as int32


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(R, ceil(n*bits/32)) int32 -> (R, n) uint8 codes; inverse of `pack_codes`.

    int32 arithmetic throughout (this is the CPU inference path): `>>` is arithmetic, so the codes
    are masked after shifting; a straddling 3-bit code takes its low bits from one word and its
    high bits from the next."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed codes must be int32, got {packed.dtype}")
    rows, words = packed.shape
    if words != packed_words(n, bits):
        raise ValueError(f"{n} codes of {bits} bits take {packed_words(n, bits)} words, got {words}")
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # whole codes per word
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        v = (packed.unsqueeze(-1) >> shifts) & mask  # (R, W, 32 / bits)
        return v.reshape(rows, -1)[:, :n].to(torch.uint8)
    blocks = -(-n // 32)
    w = torch.nn.functional.pad(packed, (0, blocks * bits - words)).reshape(rows, blocks, bits)
    word, off = (t.to(packed.device) for t in _stream_positions(bits))
    spill = off + bits > 32
    lo_mask = torch.where(spill, (1 << (32 - off)) - 1, mask).to(torch.int32)
    hi_shift = torch.where(spill, 32 - off, 0).to(torch.int32)
    hi_mask = torch.where(spill, mask, 0).to(torch.int32)
    lo = (w[..., word] >> off.to(torch.int32)) & lo_mask  # (R, B, 32)
    hi = (w[..., (word + 1).clamp(max=bits - 1)] << hi_shift) & hi_mask
    return (lo | hi).reshape(rows, blocks * 32)[:, :n].to(torch.uint8)


def trivial_g_idx(g_idx: torch.Tensor, groups: int) -> bool:
    """True if g_idx[j] == j // (in / groups), i.e. groups are consecutive column ranges."""
    n = g_idx.numel()
    return bool(torch.equal(g_idx.long(), torch.arange(n, device=g_idx.device) // (n // groups)))


def _spec_of(bits: int, groups: int, n: int, sym: bool) -> QuantSpec:
    return QuantSpec(bits=bits, group_size=None if groups == 1 else n // groups, sym=sym)


def to_gptq_v1(qw: QuantizedWeight) -> tuple[QuantizedWeight, int]:
    """The weight with every zero >= 1, as GPTQ v1 (qzeros = z - 1) can store it, and the number of
    codes that had to change value.

    A group with z = 0 (all its weights >= about -scale/2) is shifted to q + 1, z = 1, the same
    dequantized values, except that a code 2^b - 1 would need 2^b: it stays at 2^b - 1, one step
    lower, and is counted. GPTQ v2 stores z = 0 as is."""
    maxq = 2 ** qw.spec.bits - 1
    zero = qw.zero.round()
    shift = (zero == 0)[:, qw.g_idx.long()]  # (out, in): the columns of groups with z = 0
    clipped = int((shift & (qw.qweight == maxq)).sum())
    qweight = torch.where(shift, (qw.qweight + 1).clamp(max=maxq), qw.qweight).to(qw.qweight.dtype)
    return replace(qw, qweight=qweight, zero=zero.clamp(min=1)), clipped


def pack_gptq(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float16, v1: bool = False) -> dict[str, torch.Tensor]:
    """PackFormat.GPTQ_V2 tensors of one weight (keys without the module prefix); with v1, the
    PackFormat.GPTQ ones, which needs every zero >= 1 (`to_gptq_v1`)."""
    bits = qw.spec.bits
    zero = qw.zero.round().to(torch.int64)
    if v1:
        if bool((zero < 1).any()):
            raise ValueError("GPTQ v1 stores zero - 1 and cannot hold a zero of 0: convert with to_gptq_v1 "
                             "first, or write the gptq_v2 format")
        zero = zero - 1
    return {
        "qweight": pack_codes(qw.qweight, bits).t().contiguous(),  # (in words, out)
        "qzeros": pack_codes(zero.t(), bits),  # (G, out words)
        "scales": qw.scale.t().to(scale_dtype).contiguous(),  # (G, out)
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, sym: bool = False, v1: bool = False) -> QuantizedWeight:
    """QuantizedWeight (fp32 scale/zero) from PackFormat.GPTQ_V2 tensors (with v1: PackFormat.GPTQ);
    `bits` comes from the config."""
    scales, g_idx = tensors["scales"], tensors["g_idx"]
    groups, out = scales.shape
    n = g_idx.numel()
    zero = unpack_codes(tensors["qzeros"], bits, out).t().float().contiguous()
    return QuantizedWeight(
        qweight=unpack_codes(tensors["qweight"].t(), bits, n),
        scale=scales.t().float().contiguous(),
        zero=zero + 1 if v1 else zero,
        g_idx=g_idx.to(torch.int32),
        spec=_spec_of(bits, groups, n, sym),
    )


def pack_compressed_tensors(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """PackFormat.COMPRESSED_TENSORS tensors of one weight (keys without the module prefix)."""
    out, n = qw.shape
    groups = qw.scale.shape[1]
    if not trivial_g_idx(qw.g_idx, groups):
        raise ValueError("compressed-tensors pack-quantized needs consecutive groups (trivial g_idx); "
                         "quantize with static groups or write the GPTQ format")
    bits = qw.spec.bits
    t = {
        "weight_packed": pack_codes(qw.qweight, bits),  # (out, in words)
        "weight_scale": qw.scale.to(scale_dtype).contiguous(),  # (out, G)
        "weight_shape": torch.tensor([out, n], dtype=torch.int64),
    }
    if qw.spec.sym:
        if not bool((qw.zero == 2 ** (bits - 1)).all()):
            raise ValueError(f"symmetric weights must have zero {2 ** (bits - 1)} everywhere")
    else:
        t["weight_zero_point"] = pack_codes(qw.zero.round().to(torch.int64).t(), bits).t().contiguous()
    return t


def unpack_compressed_tensors(tensors: dict[str, torch.Tensor], bits: int) -> QuantizedWeight:
    """QuantizedWeight (fp32 scale/zero) from PackFormat.COMPRESSED_TENSORS tensors."""
    out, n = (int(v) for v in tensors["weight_shape"])
    scale = tensors["weight_scale"].float().contiguous()
    groups = scale.shape[1]
    sym = "weight_zero_point" not in tensors
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = unpack_codes(tensors["weight_zero_point"].t(), bits, out).t().float().contiguous()
    return QuantizedWeight(
        qweight=unpack_codes(tensors["weight_packed"], bits, n),
        scale=scale,
        zero=zero,
        g_idx=(torch.arange(n) // (n // groups)).to(torch.int32),
        spec=_spec_of(bits, groups, n, sym),
    )


_PACKERS: dict[PackFormat, Callable[..., dict[str, torch.Tensor]]] = {
    PackFormat.GPTQ: lambda qw, scale_dtype: pack_gptq(qw, scale_dtype, v1=True),
    PackFormat.GPTQ_V2: pack_gptq,
    PackFormat.COMPRESSED_TENSORS: pack_compressed_tensors,
}
_UNPACKERS: dict[PackFormat, Callable[..., QuantizedWeight]] = {
    PackFormat.GPTQ: lambda t, bits, sym: unpack_gptq(t, bits, sym, v1=True),
    PackFormat.GPTQ_V2: lambda t, bits, sym: unpack_gptq(t, bits, sym),
    PackFormat.COMPRESSED_TENSORS: lambda t, bits, sym: unpack_compressed_tensors(t, bits),
}


def pack_weight(qw: QuantizedWeight, fmt: PackFormat | str, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Tensors of one weight in format `fmt` (keys without the module prefix)."""
    return _PACKERS[PackFormat(fmt)](qw, scale_dtype)


def unpack_weight(tensors: dict[str, torch.Tensor], fmt: PackFormat | str, bits: int, sym: bool = False) -> QuantizedWeight:
    """Inverse of `pack_weight`; scales come back as fp32 copies of the stored fp16/bf16 values."""
    return _UNPACKERS[PackFormat(fmt)](tensors, bits, sym)
