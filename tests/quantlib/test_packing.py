"""Packing: bit-exact round trips for every bits x layout x odd shape, and the layouts checked
against independent packers (a transcription of AutoGPTQ's packing loop; compressed-tensors' own
pack_to_int32 when installed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantlib.packing import (
    to_gptq_v1,
    SUPPORTED_BITS,
    PackFormat,
    pack_codes,
    pack_compressed_tensors,
    pack_gptq,
    pack_weight,
    packed_words,
    unpack_codes,
    unpack_weight,
)
from quantlib.qweight import QuantizedWeight, bits_per_weight
from quantlib.rtn import rtn_quantize
from quantlib.spec import QuantSpec

SHAPES = [(1, 1), (3, 7), (5, 31), (4, 32), (2, 33), (6, 96), (3, 100), (7, 257)]


def _codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


def _qweight(out, n, bits, group, sym=False, seed=0, g_idx=None):
    """A QuantizedWeight with fp16-representable scales (so a fp16 format keeps them exactly)."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group is None else n // group
    scale = (torch.rand(out, groups, generator=g) * 0.05 + 1e-3).half().float()
    if sym:
        zero = torch.full((out, groups), 2.0 ** (bits - 1))
    else:
        zero = torch.randint(0, 2**bits, (out, groups), generator=g).float()
    if g_idx is None:
        g_idx = (torch.arange(n) // (n // groups)).to(torch.int32)
    return QuantizedWeight(_codes((out, n), bits, seed), scale, zero, g_idx, QuantSpec(bits, group, sym))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_codes_round_trip(bits, shape):
    c = _codes(shape, bits, seed=shape[1])
    p = pack_codes(c, bits)
    assert p.dtype == torch.int32 and p.shape == (shape[0], packed_words(shape[1], bits))
    assert torch.equal(unpack_codes(p, bits, shape[1]), c)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_all_ones_fill_every_bit(bits):
    """32 codes of 2^b - 1 set all b words to -1: no bit lost or doubled at word boundaries."""
    c = torch.full((2, 64), 2**bits - 1, dtype=torch.uint8)
    assert torch.equal(pack_codes(c, bits), torch.full((2, 2 * bits), -1, dtype=torch.int32))


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="3-bit range"):
        pack_codes(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="words"):
        unpack_codes(torch.zeros(1, 2, dtype=torch.int32), 4, 32)


def _autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ / GPTQModel QuantLinear.pack loop over (in, out) codes, transcribed (in % 32 == 0)."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_gptq_layout_matches_autogptq_packer(bits):
    qw = _qweight(out=64, n=96, bits=bits, group=32, seed=bits)
    t = pack_gptq(qw)
    assert t["qweight"].shape == (96 * bits // 32, 64) and t["qzeros"].shape == (3, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (3, 64) and t["g_idx"].dtype == torch.int32
    assert np.array_equal(t["qweight"].numpy(), _autogptq_pack(qw.qweight.t().numpy(), bits))
    # qzeros use the same loop along the output dimension, storing the zero itself (gptq_v2)
    assert np.array_equal(t["qzeros"].numpy(), _autogptq_pack(qw.zero.long().numpy(), bits).T)
    # v1 (AutoGPTQ's own format): its pack subtracts one from the zeros before the same loop
    v1 = to_gptq_v1(qw)[0]
    assert np.array_equal(pack_gptq(v1, v1=True)["qzeros"].numpy(), _autogptq_pack(v1.zero.long().numpy() - 1, bits).T)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(5, 7), (3, 100), (64, 96)])
def test_compressed_tensors_layout_matches_library(bits, shape):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    out, n = shape
    qw = _qweight(out, n, bits, None, seed=bits)
    t = pack_compressed_tensors(qw)
    signed = (qw.qweight.long() - 2 ** (bits - 1)).to(torch.int8)  # the library's signed codes
    assert torch.equal(t["weight_packed"], helpers.pack_to_int32(signed, bits))
    zp = (qw.zero.long() - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(t["weight_zero_point"], helpers.pack_to_int32(zp, bits, packed_dim=0))
    assert t["weight_shape"].tolist() == [out, n] and t["weight_shape"].dtype == torch.int64


@pytest.mark.parametrize("fmt", list(PackFormat))
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("out,n,group,sym", [(8, 64, 32, False), (5, 100, None, False), (7, 96, 32, True),
                                             (33, 60, 20, False)])
def test_weight_round_trip_is_exact(fmt, bits, out, n, group, sym):
    qw = _qweight(out, n, bits, group, sym, seed=out + n)
    if fmt is PackFormat.GPTQ:  # v1 holds zeros >= 1 only
        qw = to_gptq_v1(qw)[0]
    back = unpack_weight(pack_weight(qw, fmt), fmt, bits, sym)
    assert torch.equal(back.qweight, qw.qweight)
    assert torch.equal(back.scale, qw.scale) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.g_idx, qw.g_idx) and back.spec == qw.spec
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_gptq_keeps_arbitrary_g_idx_and_compressed_tensors_refuses_it():
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    qw = _qweight(8, 64, 4, 16, g_idx=(perm // 16).to(torch.int32))
    back = unpack_weight(pack_weight(qw, PackFormat.GPTQ_V2), PackFormat.GPTQ_V2, 4)
    assert torch.equal(back.g_idx, qw.g_idx) and torch.equal(back.dequantize(), qw.dequantize())
    with pytest.raises(ValueError, match="consecutive groups"):
        pack_weight(qw, PackFormat.COMPRESSED_TENSORS)


def test_symmetric_compressed_tensors_drops_zero_point():
    qw = _qweight(8, 64, 4, 32, sym=True)
    assert "weight_zero_point" not in pack_weight(qw, PackFormat.COMPRESSED_TENSORS)


def test_scales_round_to_the_storage_dtype():
    qw = _qweight(8, 64, 4, 32)
    qw = QuantizedWeight(qw.qweight, qw.scale * (1 + 1e-6), qw.zero, qw.g_idx, qw.spec)  # not fp16-exact
    for dtype in (torch.float16, torch.bfloat16):
        t = pack_weight(qw, PackFormat.COMPRESSED_TENSORS, scale_dtype=dtype)
        assert t["weight_scale"].dtype == dtype
        assert torch.equal(unpack_weight(t, PackFormat.COMPRESSED_TENSORS, 4).scale, qw.scale.to(dtype).float())


def test_formats_are_str_enums_documenting_their_layout():
    assert PackFormat("gptq") is PackFormat.GPTQ and PackFormat.COMPRESSED_TENSORS == "compressed-tensors"
    assert "qzeros" in PackFormat.GPTQ.__doc__ and "z - 1" in PackFormat.GPTQ.__doc__
    assert PackFormat("gptq_v2") is PackFormat.GPTQ_V2 and "no" in PackFormat.GPTQ_V2.__doc__
    assert "weight_packed" in PackFormat.COMPRESSED_TENSORS.__doc__


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_gptq_v1_stores_zero_minus_one_in_the_v2_bits(bits):
    """v1 and v2 differ only in qzeros, and v1's are v2's of z - 1 (what every v1 reader adds 1 to)."""
    qw, _ = to_gptq_v1(_qweight(16, 64, bits, 32, seed=bits))
    v1, v2 = pack_weight(qw, PackFormat.GPTQ), pack_weight(qw, PackFormat.GPTQ_V2)
    assert all(torch.equal(v1[k], v2[k]) for k in ("qweight", "scales", "g_idx"))
    shifted = QuantizedWeight(qw.qweight, qw.scale, qw.zero - 1, qw.g_idx, qw.spec)
    assert torch.equal(v1["qzeros"], pack_weight(shifted, PackFormat.GPTQ_V2)["qzeros"])
    back = unpack_weight(v1, PackFormat.GPTQ, bits)
    assert torch.equal(back.zero, qw.zero) and torch.equal(back.qweight, qw.qweight)


def test_gptq_v1_shifts_zero_point_zero_groups_and_counts_the_clipped_codes():
    qw = _qweight(4, 64, 4, 32, seed=3)
    codes, zero = qw.qweight.clone(), qw.zero.clone()
    zero[0, 0] = zero[1, 1] = 0  # two groups whose range starts at 0
    codes[0, :32] = codes[0, :32].clamp(max=14)  # row 0, group 0: representable exactly
    codes[1, 32:35] = 15  # row 1, group 1: three codes at the top of the grid
    qw = QuantizedWeight(codes, qw.scale, zero, qw.g_idx, qw.spec)
    v1, clipped = to_gptq_v1(qw)
    assert clipped == int((codes[1, 32:] == 15).sum()) >= 3
    assert bool((v1.zero >= 1).all())
    dense, dense_v1 = qw.dequantize(), v1.dequantize()
    moved = torch.zeros_like(codes, dtype=torch.bool)
    moved[1, 32:] = codes[1, 32:] == 15
    assert torch.equal(dense_v1[~moved], dense[~moved])  # everything else exactly as before
    torch.testing.assert_close(dense[moved] - dense_v1[moved], qw.scale[1, 1].expand(clipped))  # one step lower
    with pytest.raises(ValueError, match="to_gptq_v1"):
        pack_weight(qw, PackFormat.GPTQ)
    again, n = to_gptq_v1(v1)  # idempotent
    assert n == 0 and torch.equal(again.qweight, v1.qweight) and torch.equal(again.zero, v1.zero)


@pytest.mark.parametrize("bits, group, sym", [(2, 32, False), (3, 32, False), (4, 64, True), (8, None, False)])
def test_bits_per_weight_counts_what_a_compressed_tensors_release_stores(bits, group, sym):
    g = torch.Generator().manual_seed(bits)
    results = {f"l{i}": rtn_quantize(torch.randn(out, n, generator=g), QuantSpec(bits, group, sym))
               for i, (out, n) in enumerate([(64, 128), (32, 256)])}
    stored = sum(t.numel() * t.element_size() for qw in results.values()
                 for k, t in pack_compressed_tensors(qw).items() if k != "weight_shape")
    assert bits_per_weight(results) == pytest.approx(8 * stored / (64 * 128 + 32 * 256), rel=1e-12)
    if (bits, group, sym) == (3, 32, False):
        assert bits_per_weight(results) == pytest.approx(3 + 19 / 32)
