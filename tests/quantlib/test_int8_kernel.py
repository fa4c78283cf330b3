"""The W8A8 int8 Triton kernel against its exact reference, and Int8Linear against the a8-hooked
QuantLinear it replaces in a served release.

Without CUDA the kernel runs in Triton's interpreter (the `kt` fixture sets TRITON_INTERPRET before
importing quantlib.kernels.int8_triton, as tests/quantlib/test_kernels.py does for the GPTQ kernel).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from interpreted import interpreted  # noqa: E402
from quantlib.actquant import ActSpec, attach, attached, quantize_tokens  # noqa: E402
from quantlib.int8linear import Int8Linear  # noqa: E402
from quantlib.kernels import check_int8_args, int8_scaled_mm, int8_scaled_mm_reference  # noqa: E402
from quantlib.qlinear import QuantLinear  # noqa: E402
from quantlib.rtn import rtn_quantize  # noqa: E402
from quantlib.spec import QuantSpec  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module", autouse=True)
def kt():
    """quantlib.kernels.int8_triton (and the gptq_triton helpers it calls), interpreted without a GPU."""
    yield from interpreted("quantlib.kernels.gptq_triton", "quantlib.kernels.int8_triton")


def _operands(m, k, n, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    sa, sb = torch.rand(m, generator=g) * 0.01 + 1e-4, torch.rand(n, generator=g) * 0.01 + 1e-4
    bb = torch.randn(n, generator=g) if bias else None
    return tuple(None if t is None else t.to(DEVICE) for t in (a, b, sa, sb, bb))


def _assert_same(y, ref):
    """Interpreted: bit for bit (int32 accumulation is exact, the fp32 epilogue is the reference's).
    Compiled, the GPU may fuse the epilogue's multiply-add: one rounding of the output dtype."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if CUDA:
        eps = torch.finfo(ref.dtype).eps
        torch.testing.assert_close(y.float(), ref.float(), rtol=eps, atol=eps * ref.float().abs().max().item())
    else:
        assert torch.equal(y, ref)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("m,k,n,bias,dtype", [(1, 64, 48, False, F32), (3, 200, 70, True, F16), (3, 200, 70, True, BF16),
                                              (37, 576, 96, True, F32), (37, 576, 96, True, BF16),
                                              (130, 96, 160, False, F16)])
def test_int8_kernel_matches_the_exact_reference(m, k, n, bias, dtype):
    """Odd M, N, K (masked tiles, K not a multiple of the tile), several M tiles, bias or none, every
    output dtype (the compile check is in test_kernels.py's sm_90 test)."""
    args = _operands(m, k, n, bias)
    _assert_same(int8_scaled_mm(*args, dtype), int8_scaled_mm_reference(*args, dtype))


def test_int8_kernel_accumulates_extreme_codes_without_overflow():
    """-128 x -128 over K = 4096 sums to 2^26 per output: an int16 or fp16 accumulator would not hold it."""
    k = 4096
    a = torch.full((2, k), -128, dtype=torch.int8, device=DEVICE)
    b = torch.full((3, k), -128, dtype=torch.int8, device=DEVICE)
    one = torch.ones(2, device=DEVICE), torch.ones(3, device=DEVICE)
    y = int8_scaled_mm(a, b, *one, None, torch.float32)
    assert torch.equal(y, torch.full((2, 3), float(k * 128 * 128), device=DEVICE))


def test_int8_args_are_checked():
    a, b, sa, sb, bias = _operands(4, 32, 8, True)
    with pytest.raises(TypeError, match="int8"):
        check_int8_args(a.float(), b, sa, sb, bias, torch.float16)
    with pytest.raises(ValueError, match="share K"):
        check_int8_args(a, b[:, :16], sa, sb, bias, torch.float16)
    with pytest.raises(TypeError, match="scale_b"):
        check_int8_args(a, b, sa, sb[:4], bias, torch.float16)
    with pytest.raises(TypeError, match="scale_a"):
        check_int8_args(a, b, sa.half(), sb, bias, torch.float16)
    with pytest.raises(TypeError, match="bias"):
        check_int8_args(a, b, sa, sb, bias[:3], torch.float16)
    with pytest.raises(TypeError, match="out_dtype"):
        check_int8_args(a, b, sa, sb, bias, torch.int32)
    big = torch.zeros(1, 2**17, dtype=torch.int8)
    with pytest.raises(ValueError, match="overflow"):
        check_int8_args(big, big, torch.ones(1), torch.ones(1), None, torch.float32)


def test_int8_custom_op_fake_impl_and_registration():
    args = _operands(3, 64, 48, True)
    torch.library.opcheck(torch.ops.quantlib.int8_scaled_mm, (*args, torch.float16),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        y = torch.ops.quantlib.int8_scaled_mm(*(mode.from_tensor(t) for t in args), torch.bfloat16)
    assert y.shape == (3, 48) and y.dtype == torch.bfloat16


def _w8(out=48, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.05
    return rtn_quantize(w, QuantSpec(8, None, sym=True)), torch.randn(out, generator=g)


def _hooked_quantlinear(qw, bias):
    """What a W8A8 release loaded as before: a QuantLinear whose input an a8 hook fake-quantizes."""
    holder = torch.nn.Module()
    holder.lin = QuantLinear.from_quantized(qw, bias, torch.float16, backend="reference")
    attach(holder, ["lin"], ActSpec(8))
    return holder.lin


def test_int8linear_computes_what_the_a8_hooked_quantlinear_computes():
    """Same codes, scales and per-token input quantization: equal up to fp32 summation order, on
    every backend; the integer paths (triton, reference) agree exactly."""
    qw, bias = _w8()
    hooked = _hooked_quantlinear(qw, bias)
    x = torch.randn(2, 7, 96) * torch.linspace(0.1, 4, 96)  # a wide spread of per-channel ranges
    with torch.no_grad():
        want = hooked(x)
        got = {b: Int8Linear.from_packed(hooked.state_dict(), hooked.bias, backend=b)(x)
               for b in ("dense", "reference", "triton")}
    for y in got.values():
        assert y.shape == want.shape and y.dtype == want.dtype
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(got["triton"], got["reference"])


def test_int8linear_feeds_the_kernel_the_per_token_codes():
    """The kernel sees quantize_tokens' codes and scales: replaying them by hand gives the output."""
    qw, bias = _w8(seed=1)
    lin = Int8Linear.from_quantized(qw, bias, backend="triton").to(DEVICE)
    x = torch.randn(5, 96, device=DEVICE) * 3
    q, s = quantize_tokens(x, ActSpec(8))
    acc = q.double() @ lin.weight.double().t()
    manual = (acc.float() * s * lin.weight_scale[None, :] + lin.bias[None, :])
    _assert_same(lin(x), manual)
    assert int(lin.weight.abs().max()) <= 127 and lin.weight.dtype == torch.int8


def test_int8linear_survives_a_model_cast_and_odd_widths():
    """model.half() casts the scale buffer too (the kernel still gets fp32 scales); a width that is
    not a multiple of 4 keeps its size through the packed layout (the padding is dropped)."""
    g = torch.Generator().manual_seed(2)
    qw = rtn_quantize(torch.randn(24, 30, generator=g), QuantSpec(8, None, sym=True))
    holder = torch.nn.Module()
    holder.lin = QuantLinear.from_quantized(qw, None, torch.float16, backend="reference")
    lin = Int8Linear.from_packed(holder.lin.state_dict(), None, backend="triton")
    assert (lin.in_features, tuple(lin.weight.shape)) == (30, (24, 30))
    x = torch.randn(3, 30)
    want = Int8Linear.from_packed(holder.lin.state_dict(), None, backend="reference")(x)
    assert torch.equal(lin(x), want)
    half = lin.half().to(DEVICE)
    assert half.weight_scale.dtype == torch.float16
    assert half(x.half().to(DEVICE)).dtype == torch.float16


def test_int8linear_reports_its_input_scheme_and_refuses_a_second_hook():
    qw, bias = _w8()
    holder = torch.nn.Module()
    holder.lin = Int8Linear.from_quantized(qw, bias)
    assert attached(holder) == {"lin": "a8"}
    with pytest.raises(ValueError, match="already quantizes"):
        attach(holder, ["lin"], ActSpec(8))


def test_int8linear_refuses_weights_it_cannot_hold():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    with pytest.raises(ValueError, match="symmetric"):
        Int8Linear.from_quantized(rtn_quantize(w, QuantSpec(8, None, sym=False)))
    with pytest.raises(ValueError, match="per-channel 8-bit"):
        Int8Linear.from_quantized(rtn_quantize(w, QuantSpec(8, 32, sym=True)))
    with pytest.raises(ValueError, match="per-channel 8-bit"):
        Int8Linear.from_quantized(rtn_quantize(w, QuantSpec(4, None, sym=True)))
    with pytest.raises(ValueError, match="backend"):
        Int8Linear(64, 16, backend="int4")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 512])
def test_int8_kernel_llama_shapes_on_gpu(m):
    """Autotuned configs on a real layer shape (4096 -> 11008)."""
    args = _operands(m, 4096, 11008, True)
    _assert_same(int8_scaled_mm(*args, torch.float16), int8_scaled_mm_reference(*args, torch.float16))


def test_static_int8linear_uses_its_one_scale_for_every_token():
    """a8s: the calibrated input scale quantizes every token (clipping beyond it); the kernel, the
    reference and the dense path agree with a QuantLinear behind a static a8s hook."""
    qw, bias = _w8(seed=3)
    scale = torch.tensor([0.02])
    holder = torch.nn.Module()
    holder.lin = QuantLinear.from_quantized(qw, bias, torch.float16, backend="reference")
    attach(holder, ["lin"], ActSpec(8, static=True), {"lin": scale})
    x = torch.randn(4, 96) * 2  # beyond 127 * 0.02 in places: clipped
    with torch.no_grad():
        want = holder.lin(x)
        got = {b: Int8Linear.from_packed(holder.lin.state_dict(), holder.lin.bias, b, input_scale=scale)(x)
               for b in ("dense", "reference", "triton")}
    for y in got.values():
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(got["triton"], got["reference"])
    lin = Int8Linear.from_quantized(qw, bias, input_scale=scale)
    assert lin.act_spec.name == "a8s" and torch.equal(lin.input_scale, scale)
    dynamic = Int8Linear.from_quantized(qw, bias, backend="reference")(x)
    assert not torch.allclose(dynamic, got["reference"])  # the per-token path gives other numbers
