"""quantlib.gguf: our codes as GGUF legacy blocks, read back by the `gguf` package's own dequantizer
(llama.cpp's reference layouts, not ours) to exactly the fp16-rounded-scale weight, for every type."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from quantlib.gguf import BLOCK_BYTES, gguf_blocks, gguf_type, gguf_weight
from quantlib.qweight import QuantizedWeight
from quantlib.rtn import rtn_quantize
from quantlib.spec import QuantSpec

CASES = [(QuantSpec(4, 32), "Q4_1"), (QuantSpec(3, 64), "Q4_1"), (QuantSpec(2, None), "Q4_1"),
         (QuantSpec(5, 128), "Q5_1"), (QuantSpec(4, 32, sym=True), "Q4_0"), (QuantSpec(3, 32, sym=True), "Q4_0"),
         (QuantSpec(5, 64, sym=True), "Q5_0"), (QuantSpec(8, None, sym=True), "Q8_0"), (QuantSpec(8, 64, sym=True), "Q8_0")]


def _weights(spec: QuantSpec) -> QuantizedWeight:
    g = torch.Generator().manual_seed(spec.bits * 1000 + (spec.group_size or 0))
    w = torch.randn(24, 256, generator=g) * torch.rand(24, 1, generator=g)  # rows of different ranges
    return rtn_quantize(w, spec)


@pytest.mark.parametrize("spec,kind", CASES, ids=[s.name for s, _ in CASES])
def test_blocks_dequantize_in_the_gguf_reader_to_our_weights(spec, kind):
    qw = _weights(spec)
    got_kind, blocks = gguf_blocks(qw)
    assert got_kind == kind and blocks.dtype == torch.uint8
    assert blocks.shape == (24, 256 // 32 * BLOCK_BYTES[kind])
    theirs = torch.from_numpy(dequantize(blocks.numpy(), GGMLQuantizationType[kind]).copy()).reshape(qw.shape)
    assert torch.equal(theirs, gguf_weight(qw))
    # ... which is our weight up to the fp16 rounding of the block scale d (and min m = -s*z)
    ours = qw.dequantize()
    s = qw.scale.repeat_interleave(256 // qw.scale.shape[1], dim=1)
    z = qw.zero.repeat_interleave(256 // qw.scale.shape[1], dim=1)
    ulp = lambda x: x.abs() * 2.0 ** -11  # noqa: E731  (half an fp16 ulp, relative)
    bound = ulp(s) * (qw.qweight.float() if not spec.sym else (qw.qweight.float() - z).abs())
    bound = bound + (0 if spec.sym else ulp(s * z))
    assert ((theirs - ours).abs() <= bound * 1.0001 + 1e-12).all()
    assert (theirs != ours).any()  # the rounding is real: the bound above is what is being tested


def test_a_code_change_changes_exactly_one_weight_in_the_reader():
    qw = _weights(QuantSpec(4, 32))
    moved = qw.qweight.clone()
    moved[5, 77] = (int(moved[5, 77]) + 1) % 16
    other = QuantizedWeight(moved, qw.scale, qw.zero, qw.g_idx, qw.spec)
    a, b = (torch.from_numpy(dequantize(gguf_blocks(x)[1].numpy(), GGMLQuantizationType.Q4_1).copy()).reshape(24, 256)
            for x in (qw, other))
    assert (a != b).nonzero().tolist() == [[5, 77]]


@pytest.mark.parametrize("spec,message", [
    (QuantSpec(4, 16), "multiple of 32"),
    (QuantSpec(8, 64), "asymmetric 8-bit codes have no exact GGUF type"),
    (QuantSpec(6, None), "asymmetric 6-bit"),
])
def test_schemes_without_an_exact_type_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        gguf_type(spec)


def test_act_order_and_partial_blocks_are_refused():
    qw = _weights(QuantSpec(4, 32))
    shuffled = QuantizedWeight(qw.qweight, qw.scale, qw.zero, qw.g_idx.flip(0), qw.spec)
    with pytest.raises(ValueError, match="contiguous groups"):
        gguf_blocks(shuffled)
    short = rtn_quantize(torch.randn(4, 48), QuantSpec(4, None))
    with pytest.raises(ValueError, match="whole blocks of 32"):
        gguf_blocks(short)
