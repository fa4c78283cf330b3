import pytest
import torch

from quantlib.gptq import GPTQConfig, accumulate_hessian, damped_inverse_cholesky, gptq_quantize
from quantlib.methods import hessian_error
from quantlib.qweight import QuantizedWeight
from quantlib.rtn import rtn_quantize
from quantlib.spec import QuantSpec


def _layer(seed=0, out=48, n=128, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    # strongly correlated inputs (low rank + noise), as real activations are
    x = torch.randn(tokens, 32, generator=g) @ torch.randn(32, n, generator=g) + 0.1 * torch.randn(tokens, n, generator=g)
    w = torch.randn(out, n, generator=g)
    h, count = accumulate_hessian(None, 0, x[:1000])
    h, count = accumulate_hessian(h, count, x[1000:])
    return w, h, x


def test_hessian_running_mean_equals_batch():
    _, h, x = _layer()
    torch.testing.assert_close(h, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, 32), QuantSpec(2, 32), QuantSpec(3, 32, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_hessian_weighted_error(spec, act_order):
    w, h, _ = _layer()
    e_rtn = hessian_error(w, rtn_quantize(w, spec).dequantize(), h)
    e_gptq = hessian_error(w, gptq_quantize(w, h, spec, GPTQConfig(act_order=act_order)).dequantize(), h)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)


def test_gptq_does_not_modify_inputs_and_is_deterministic():
    w, h, _ = _layer()
    w0, h0 = w.clone(), h.clone()
    a = gptq_quantize(w, h, QuantSpec(3, 32))
    b = gptq_quantize(w, h, QuantSpec(3, 32))
    assert torch.equal(w, w0) and torch.equal(h, h0)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale)


def test_act_order_static_groups_keep_natural_g_idx_and_reload_identically(tmp_path):
    from safetensors.torch import load_file, save_file

    w, h, _ = _layer()
    spec = QuantSpec(3, 32)
    qw = gptq_quantize(w, h, spec, GPTQConfig(act_order=True))
    assert torch.equal(qw.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    # static groups: qparams are the min-max of the original (unpermuted) groups
    ref = rtn_quantize(w, spec)
    assert torch.equal(qw.scale, ref.scale) and torch.equal(qw.zero, ref.zero)
    save_file(qw.state_dict("layer"), tmp_path / "q.safetensors")
    back = QuantizedWeight.from_state_dict(load_file(tmp_path / "q.safetensors"), "layer")
    assert torch.equal(back.qweight, qw.qweight) and back.spec == spec
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_damping_escalates_on_singular_hessian():
    n = 32
    x = torch.randn(8, n)  # rank 8 < 32: H is singular
    h = 2 * x.t() @ x / 8
    with pytest.raises(RuntimeError, match="not positive definite"):
        damped_inverse_cholesky(torch.zeros(n, n) - torch.eye(n), 0.01)  # negative definite: hopeless
    u = damped_inverse_cholesky(h, 1e-9)
    assert torch.isfinite(u).all() and torch.allclose(u, torch.triu(u))


def test_dead_columns_are_zeroed():
    w, h, _ = _layer(out=8, n=64)
    h[5, :] = 0
    h[:, 5] = 0
    qw = gptq_quantize(w, h, QuantSpec(4, 32))
    assert qw.dequantize()[:, 5].abs().max() == 0


def test_gptq_config_validation():
    with pytest.raises(ValueError, match="damp must be in"):
        GPTQConfig(damp=0)
    with pytest.raises(ValueError, match="block_size must be positive"):
        GPTQConfig(block_size=0)
