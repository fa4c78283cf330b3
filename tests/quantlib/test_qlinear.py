"""QuantLinear (reference path) and the model surgery: packed modules reproduce the fake-quant
(dequantized, fp16-rounded scales) model; GPT-2 Conv1D is handled; the model is untouched in phase 1."""
from __future__ import annotations

import pytest
import torch
from tiny import tiny_ids, tiny_model

from quantlib.adapters import get_adapter
from quantlib.qlinear import QuantLinear, make_quantlinears, replace_modules, swap_to_quantlinear
from quantlib.qweight import QuantizedWeight
from quantlib.rtn import rtn_quantize
from quantlib.spec import QuantSpec


def _quantize(model, spec):
    adapter = get_adapter(model)
    qweights = {}
    for i, block in enumerate(adapter.blocks):
        for name, module in adapter.linears(block).items():
            qweights[f"{adapter.family.layers}.{i}.{name}"] = rtn_quantize(adapter.get_weight(module).detach(), spec)
    return adapter, qweights


def _fp16_scales(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.qweight, qw.scale.half().float(), qw.zero, qw.g_idx, qw.spec)


@pytest.mark.parametrize("bits,group", [(4, 32), (3, None), (2, 16), (8, 64)])
def test_quantlinear_equals_dense_linear_of_dequantized_weight(bits, group):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 64, generator=g)
    qw = _fp16_scales(rtn_quantize(w, QuantSpec(bits, group)))
    bias = torch.randn(48, generator=g)
    m = QuantLinear.from_quantized(qw, bias, backend="reference")
    assert torch.equal(m.dequantize(torch.float32), qw.dequantize())
    x = torch.randn(2, 5, 64, generator=g)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, qw.dequantize(), bias), rtol=0, atol=0)
    assert m.qweight.dtype == torch.int32 and m.scales.dtype == torch.float16
    assert set(m.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_swap_reproduces_fake_quant_logits(family):
    model = tiny_model(family)
    adapter, qweights = _quantize(model, QuantSpec(4, 32))
    ids = tiny_ids(2, 16)
    fake = tiny_model(family)
    fake_adapter = get_adapter(fake)
    for name, qw in qweights.items():  # the fake-quant model with the same fp16-rounded scales
        fake_adapter.set_weight(fake.get_submodule(name), _fp16_scales(qw).dequantize())
    modules = make_quantlinears(model, qweights)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # phase 1 leaves the model alone
    replace_modules(model, modules)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(qweights)
    with torch.no_grad():
        a, b = fake(ids).logits, model(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_swap_rejects_mismatched_weights():
    model = tiny_model("llama")
    _, qweights = _quantize(model, QuantSpec(4, 32))
    name = next(iter(qweights))
    qw = qweights[name]
    wrong = QuantizedWeight(qw.qweight[:, :32], qw.scale[:, :1], qw.zero[:, :1], qw.g_idx[:32], qw.spec)
    with pytest.raises(ValueError, match="does not match"):
        swap_to_quantlinear(model, {name: wrong})


def test_quantlinear_backend_is_validated():
    with pytest.raises(ValueError, match="backend"):
        QuantLinear(64, 32, 4, 2, 32, backend="cuda")


def test_dense_backend_dequantizes_once_per_dtype_and_matches_the_reference():
    qw = rtn_quantize(torch.randn(48, 64, generator=torch.Generator().manual_seed(0)), QuantSpec(4, 32))
    ref = QuantLinear.from_quantized(qw, backend="reference")
    dense = QuantLinear.from_quantized(qw, backend="dense")
    x = torch.randn(3, 64)
    assert torch.equal(dense(x), ref(x))
    kept = dense._dense
    assert kept is not None and dense(x) is not None and dense._dense is kept  # reused, not recomputed
    assert torch.equal(dense(x.double()), ref(x.double())) and dense._dense.dtype == torch.float64  # rebuilt
    assert "_dense" not in dict(dense.named_buffers()) and set(dense.state_dict()) == set(ref.state_dict())


CPU_CASES = [(4, 64, False, "int4"), (4, 32, True, "int4"), (3, 32, False, "int4"), (2, 128, False, "int4"),
             (4, 256, False, "int4"), (8, None, True, "int8"), (8, None, False, "int8")]


@pytest.mark.parametrize("bits,group,sym,kernel", CPU_CASES,
                         ids=[f"w{b}g{g or 'pc'}{'s' if s else ''}" for b, g, s, _ in CPU_CASES])
def test_cpu_kernels_match_the_dense_matmul(bits, group, sym, kernel):
    g = torch.Generator().manual_seed(bits * (group or 7))
    qw = _fp16_scales(rtn_quantize(torch.randn(96, 512, generator=g) * 0.05, QuantSpec(bits, group, sym)))
    bias = torch.randn(96, generator=g)
    m = QuantLinear.from_quantized(qw, bias, backend=kernel)
    x = torch.randn(3, 5, 512, generator=g)
    exact = torch.nn.functional.linear(x.double(), qw.dequantize().double(), bias.double())
    # fp32 activations: the same weights, accumulated in another order
    torch.testing.assert_close(m(x).double(), exact, rtol=1e-5, atol=1e-5)
    # bf16 activations (the fast path, what auto picks): no worse than a dense bf16 matmul of our weights
    xb = x.bfloat16()
    dense_bf16 = torch.nn.functional.linear(xb, qw.dequantize().bfloat16(), bias.bfloat16())
    err = lambda y: float((y.double() - exact).abs().max() / exact.abs().max())  # noqa: E731
    assert err(m(xb)) <= 2 * err(dense_bf16) + 1e-3 and m(xb).dtype == torch.bfloat16
    assert m._packed_cpu is not None and "_packed_cpu" not in dict(m.named_buffers())
    auto = QuantLinear.from_quantized(qw, bias)
    assert auto._use_cpu_kernel(xb) and not auto._use_cpu_kernel(x) and not auto._use_cpu_kernel(x.half())


def test_codes_no_cpu_kernel_takes_stay_on_the_reference_path():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 96, generator=g).bfloat16()
    for spec in (QuantSpec(8, 32), QuantSpec(4, 16), QuantSpec(4, None)):  # 8-bit groups, g16, per-channel 96
        other = QuantLinear.from_quantized(rtn_quantize(torch.randn(32, 96, generator=g), spec))
        assert not other._use_cpu_kernel(x)
        for kernel in ("int4", "int8"):
            with pytest.raises(ValueError, match=f"backend {kernel}: torch's CPU kernels take codes"):
                QuantLinear.from_quantized(rtn_quantize(torch.randn(32, 96, generator=g), spec), backend=kernel)
