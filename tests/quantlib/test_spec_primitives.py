import pytest
import torch

from quantlib.primitives import dequantize, expand, fake_quant, minmax_qparams, quantize, search_qparams
from quantlib.rtn import rtn_quantize
from quantlib.spec import QuantSpec, parse_scheme


@pytest.mark.parametrize("bad", [1, 9, 0, 3.0, True])
def test_bits_outside_2_to_8_rejected(bad):
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        QuantSpec(bits=bad)


@pytest.mark.parametrize("bad", [0, -64, 1.5])
def test_bad_group_size_rejected(bad):
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        QuantSpec(bits=4, group_size=bad)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features 100"):
        minmax_qparams(torch.randn(4, 100), QuantSpec(4, 64))


def test_parse_scheme():
    assert parse_scheme("w4pc") == QuantSpec(4, None, False)
    assert parse_scheme("w3g64") == QuantSpec(3, 64, False)
    assert parse_scheme("w4g128s") == QuantSpec(4, 128, True)
    assert QuantSpec(2, 64).name == "w2g64"
    with pytest.raises(ValueError, match="unknown scheme"):
        parse_scheme("int4")


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, 16), QuantSpec(2, 32), QuantSpec(8, 16, True), QuantSpec(4, None, True)])
def test_round_trip_within_half_step(spec):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    s, z = minmax_qparams(w, spec)
    se, ze = expand(s, 64), expand(z, 64)
    q = quantize(w, se, ze, spec.maxq)
    assert q.dtype == torch.uint8 and int(q.max()) <= spec.maxq
    err = (dequantize(q, se, ze) - w).abs()
    # asymmetric min-max covers the range; symmetric can clip the far side by at most one step
    bound = se / 2 + 1e-6 if not spec.sym else se + 1e-6
    assert bool((err <= bound).all())


def test_design_reference_rtn_formula():
    """docs/protocol.md: range [min(w,0), max(w,0)], scale = (max-min)/(2^b-1), zero = round(-min/scale)."""
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0]])  # all positive: min clamps to 0
    qw = rtn_quantize(w, QuantSpec(2))
    assert torch.allclose(qw.scale, torch.tensor([[1.0]])) and qw.zero.item() == 0
    assert qw.qweight.tolist() == [[0, 1, 2, 3]]  # round(0.5) = 0 (half to even)


def test_fake_quant_straight_through_gradient():
    spec = QuantSpec(3, 8)
    w = torch.randn(4, 16, requires_grad=True)
    s, z = minmax_qparams(w.detach(), spec)
    s = s.clone().requires_grad_(True)
    y = fake_quant(w, expand(s, 16), expand(z, 16), spec.maxq)
    y.sum().backward()
    assert torch.all(w.grad == 1)  # min-max range: nothing clipped, so the STE passes 1 everywhere
    assert s.grad is not None and s.grad.abs().sum() > 0
    torch.testing.assert_close(y.detach(), rtn_quantize(w.detach(), spec).dequantize())


def test_clip_search_never_worse_than_minmax():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    spec = QuantSpec(3, 32)
    errs = []
    for s, z in (minmax_qparams(w, spec), search_qparams(w, spec)):
        se, ze = expand(s, 128), expand(z, 128)
        errs.append(float((dequantize(quantize(w, se, ze, spec.maxq), se, ze) - w).pow(2).sum()))
    assert errs[1] < 0.95 * errs[0]


def test_fake_quant_clips_to_both_ends_of_a_grid_narrower_than_the_weights():
    # a learned (clipped) grid: weights beyond either end land on the end codes 0 and maxq
    from quantlib.primitives import fake_quant

    w = torch.tensor([[-3.0, -0.5, 0.0, 0.5, 3.0]])
    scale, zero = torch.tensor([[0.25]]), torch.tensor([[4.0]])  # 3 bits: codes 0..7 cover [-1.0, 0.75]
    assert torch.equal(fake_quant(w, scale, zero, 7), torch.tensor([[-1.0, -0.5, 0.0, 0.5, 0.75]]))


def test_one_weight_fake_quant_rounds_ties_as_quantize_does():
    """primitives.fake_quant, reconstruction's LearnableLinear (nearest rounding) and QAT's QATLinear
    (trainable weights) give dequantize(quantize(w)) to the bit, ties included: with w / s = k + 0.5
    and an odd zero, rounding w / s + z instead of w / s would move every tie by one code."""
    from quantlib.qat_modules import QATLinear
    from quantlib.qweight import QuantizedWeight
    from quantlib.recon import LearnableLinear, ReconConfig

    spec = QuantSpec(4, 8)
    s, z = torch.full((2, 2), 0.25), torch.full((2, 2), 3.0)  # exact in binary; an odd zero
    w = 0.25 * (torch.arange(-3, 13, dtype=torch.float32).repeat(2, 1) - 3 + 0.5)  # every w / s a tie
    se, ze = expand(s, 16), expand(z, 16)
    q = quantize(w, se, ze, spec.maxq)
    expect = dequantize(q, se, ze)
    assert not torch.equal(expect, dequantize(torch.clamp(torch.round(w / se + ze), 0, 15), se, ze))  # ties matter
    assert torch.equal(fake_quant(w, se, ze, spec.maxq), expect)
    qw = QuantizedWeight(q, s, z, torch.arange(16, dtype=torch.int32) // 8, spec)
    for grid in ("init", "learned"):
        cfg = ReconConfig(rounding="nearest", init="rtn", grid=grid, learn_clip=False)
        assert torch.equal(LearnableLinear(qw, w, None, cfg).weight_hat(), expect), grid
    for rounding in ("adaround", "lora"):  # their initial offsets harden to the same codes
        m = LearnableLinear(qw, w, None, ReconConfig(rounding=rounding, init="rtn", learn_clip=False))
        assert torch.equal(m.harden().qweight, q) and torch.equal(m.weight_hat(hard=True), expect), rounding
    qat = QATLinear(qw, None, "weights")
    with torch.no_grad():
        qat.latent.copy_(w / 0.25)  # latent weight s0 * latent == w
    assert torch.equal(qat.fake_quant()[0], expect)
