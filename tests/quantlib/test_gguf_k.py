"""quantlib.gguf_k: our codes fitted into llama.cpp's K-quant types. The bytes are read back by the
`gguf` package's own dequantizers (llama.cpp's layouts, not ours) to exactly the weight the fit
promises; that weight is our weight exactly where the scales allow it, and within a stated share of
the quantization noise otherwise."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from quantlib.gguf import gguf_blocks
from quantlib.gguf_k import K_TYPES, SUPER, gguf_export, k_blocks, k_fit, k_weight
from quantlib.qweight import QuantizedWeight
from quantlib.rtn import rtn_quantize
from quantlib.spec import QuantSpec

# (type, our scheme, bound on ||w_K - ours|| / ||w - ours||: the fit's error as a share of the
# quantization noise; measured 0.093, 0.038, 0.143, 0.299, 0.092 on this seed (0.134, 0.045, 0.206,
# 0.435, 0.100 without the refinement); bounds with margin)
MATCHED = [("Q2_K", QuantSpec(2, 64), 0.15), ("Q3_K", QuantSpec(3, 64, sym=True), 0.08),
           ("Q4_K", QuantSpec(4, 32), 0.25), ("Q5_K", QuantSpec(5, 32), 0.45), ("Q6_K", QuantSpec(6, 64, sym=True), 0.15)]
# codes the type cannot hold as they are (asymmetric 3-bit in the signed Q3_K, 3-bit in Q2_K) and
# codes it holds with room to spare (4-bit asymmetric in Q6_K, per-channel 2-bit in Q4_K)
OTHERS = [("Q3_K", QuantSpec(3, 64)), ("Q2_K", QuantSpec(3, 32)), ("Q6_K", QuantSpec(4, 128)), ("Q4_K", QuantSpec(2, None))]


def _w(seed: int, rows: int = 24, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)  # rows of different ranges


def _reader(rows: torch.Tensor, kind: str, shape) -> torch.Tensor:
    return torch.from_numpy(dequantize(rows.numpy(), GGMLQuantizationType[kind]).copy()).reshape(shape)


@pytest.mark.parametrize("kind,spec", [(k, s) for k, s, _ in MATCHED] + OTHERS,
                         ids=[f"{k}-{s.name}" for k, s in [(k, s) for k, s, _ in MATCHED] + OTHERS])
def test_k_blocks_dequantize_in_the_gguf_reader_to_the_fit(kind, spec):
    qw = rtn_quantize(_w(spec.bits), spec)
    fit = k_fit(qw, kind)
    rows = k_blocks(fit)
    assert rows.dtype == torch.uint8 and rows.shape == (24, 512 // SUPER * K_TYPES[kind].nbytes)
    assert torch.equal(_reader(rows, kind, qw.shape), k_weight(fit))
    t = K_TYPES[kind]
    assert int(fit.codes.min()) >= t.lo and int(fit.codes.max()) <= t.hi


@pytest.mark.parametrize("kind,spec,bound", MATCHED, ids=[k for k, _, _ in MATCHED])
def test_codes_the_type_holds_are_kept_within_a_share_of_the_quantization_noise(kind, spec, bound):
    w = _w(7)
    qw = rtn_quantize(w, spec)
    ours = qw.dequantize()
    noise = (w - ours).norm()
    fitted = (k_weight(k_fit(qw, kind)) - ours).norm() / noise
    plain = (k_weight(k_fit(qw, kind, refine=False)) - ours).norm() / noise
    assert fitted <= bound
    assert fitted < plain  # the nudged integers and least-squares d earn their keep
    # and against the FP weight the fitted release is our release plus that small share, not a new rounding
    assert (k_weight(k_fit(qw, kind)) - w).norm() <= noise * (1 + bound ** 2) ** 0.5 * 1.01


def _representable(kind: str) -> QuantizedWeight:
    """Codes whose scales are integer multiples of one fp16 d per super-block (zero 0, or symmetric
    for the signed types): the K type holds them exactly."""
    t = K_TYPES[kind]
    g = torch.Generator().manual_seed(3)
    bits = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}[kind]
    spec = QuantSpec(bits, t.sub * 2, sym=not t.affine)  # groups of two sub-blocks
    rows, cols = 8, 512
    groups = cols // spec.group_size
    top = t.top if t.affine else t.top + 1
    k = torch.randint(1, top + 1, (rows, groups), generator=g).float()
    k[:, :: SUPER // spec.group_size] = top  # every super-block has a sub-block at the largest integer
    scale = k * 2.0 ** -12
    zero = torch.zeros(rows, groups) if t.affine else torch.full((rows, groups), 2.0 ** (bits - 1))
    q = torch.randint(0, 2 ** bits, (rows, cols), generator=g).to(torch.uint8)
    g_idx = torch.arange(cols, dtype=torch.int32) // spec.group_size
    return QuantizedWeight(q, scale, zero, g_idx, spec)


@pytest.mark.parametrize("kind", list(K_TYPES))
def test_scales_on_the_types_grid_are_reproduced_exactly(kind):
    qw = _representable(kind)
    for refine in (False, True):
        fit = k_fit(qw, kind, refine=refine)
        assert torch.equal(k_weight(fit), qw.dequantize())
        assert torch.equal(_reader(k_blocks(fit), kind, qw.shape), qw.dequantize())


def test_one_code_moved_moves_one_weight_in_the_reader():
    qw = _representable("Q4_K")
    moved = qw.qweight.clone()
    moved[3, 300] = (int(moved[3, 300]) + 1) % 16
    other = QuantizedWeight(moved, qw.scale, qw.zero, qw.g_idx, qw.spec)
    a = _reader(k_blocks(k_fit(qw, "Q4_K")), "Q4_K", qw.shape)
    b = _reader(k_blocks(k_fit(other, "Q4_K")), "Q4_K", qw.shape)
    assert (a != b).nonzero().tolist() == [[3, 300]]


def test_rows_that_are_not_whole_super_blocks_keep_the_exact_legacy_type():
    qw = rtn_quantize(_w(1, cols=576), QuantSpec(4, 32))  # SmolLM2's hidden size: 2.25 super-blocks
    kind, rows, weight = gguf_export(qw, "Q4_K")
    assert kind == "Q4_1" and torch.equal(rows, gguf_blocks(qw)[1])
    assert torch.equal(_reader(rows, kind, qw.shape), weight)
    with pytest.raises(ValueError, match="whole super-blocks of 256"):
        k_fit(qw, "Q4_K")
    with pytest.raises(ValueError, match="choose one of exact, Q2_K"):
        gguf_export(qw, "Q4_K_M")
