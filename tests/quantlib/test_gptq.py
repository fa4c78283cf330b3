import pytest
import torch

from quantlib.boa import BoAConfig, kron_gptq
from quantlib.gptq import GPTQConfig, accumulate_hessian, damped_inverse_cholesky, gptq_quantize
from quantlib.methods import hessian_error
from quantlib.primitives import minmax_qparams, qparams_from_range, search_qparams
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


def _reference_gptq(w, h, spec, lam=0.01, act_order=True):
    """Textbook GPTQ in float64: one column at a time, each error applied at once to every later
    column (no lazy blocks), H damped by lam * mean(diag H). Lazy group qparams are the min-max of
    the group's updated columns when the sweep reaches its first one; act-order or per-channel:
    static min-max of the original weight. Returns codes (out, in), scale, zero (out, G)."""
    w, h = w.double().clone(), h.double().clone()
    out, n = w.shape
    gw = spec.group_width(n)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    wg = w.reshape(out, n // gw, gw)
    scale, zero = qparams_from_range(wg.amin(-1), wg.amax(-1), spec)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n)
    h = h + lam * h.diagonal().mean() * torch.eye(n, dtype=h.dtype)
    h, w = h[perm][:, perm], w[:, perm]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    for j in range(n):
        g = int(perm[j]) // gw
        if not (act_order or spec.group_size is None) and j % gw == 0:
            sg, zg = qparams_from_range(w[:, j : j + gw].amin(1), w[:, j : j + gw].amax(1), spec)
            scale[:, g], zero[:, g] = sg, zg
        s, z = scale[:, g], zero[:, g]
        q[:, j] = torch.clamp(torch.round(w[:, j] / s) + z, 0, spec.maxq)
        e = (w[:, j] - s * (q[:, j] - z)) / u[j, j]
        w[:, j:] -= torch.outer(e, u[j, j:])
    return q[:, torch.argsort(perm)], scale, zero


def _assert_matches(qw, ref):
    codes, scale, zero = ref
    # float32 against the float64 oracle: a weight within float32 rounding of a rounding boundary can
    # land on the neighbouring code, and which ones do depends on the CPU's BLAS kernels (one code in
    # 6144 on some CPUs); a wrong update would move many codes, and by more than one
    diff = (qw.qweight.long() - codes.long()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, diff.numel() // 2000), int((diff > 0).sum())
    # lazy group scales are min-max of columns after ~100 fp32 updates (the reference: fp64)
    torch.testing.assert_close(qw.scale.double(), scale, rtol=5e-5, atol=0)
    assert torch.equal(qw.zero.double(), zero)


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


def _indefinite(n=32, neg=-1.0, seed=0, dtype=torch.float64):
    """Q diag(2, ..., 2, neg) Q^T, scaled by 5 so mean(diag H) != 1: damping lam * mean(diag H)
    makes it positive definite only once lam * mean(diag H) > -neg."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=dtype))
    eig = torch.full((n,), 2.0, dtype=dtype)
    eig[-1] = neg
    return 5 * (q * eig) @ q.t()


def test_damping_escalates_to_the_first_sufficient_lambda():
    h = _indefinite()  # mean diag 5 * 61/32 ~ 9.5; needs lam * 9.5 > 5: 0.01 and 0.1 fail, 1 works
    mean_diag = h.diagonal().mean()
    u = damped_inverse_cholesky(h, 0.01)
    assert torch.allclose(u, torch.triu(u))
    for lam, match in [(0.1, False), (1.0, True), (10.0, False)]:
        damped = torch.linalg.inv(h + lam * mean_diag * torch.eye(32, dtype=h.dtype))
        assert torch.allclose(u.t() @ u, damped, rtol=1e-6, atol=1e-9) == match, lam
    with pytest.raises(RuntimeError, match="not positive definite"):
        damped_inverse_cholesky(h, 0.01, tries=2)  # 0.01, 0.1: not enough
    with pytest.raises(RuntimeError, match="not positive definite"):
        damped_inverse_cholesky(torch.zeros(32, 32) - torch.eye(32), 0.01)  # negative definite: hopeless


def test_gptq_on_indefinite_hessian_uses_the_escalated_damping():
    # one negative direction: only the escalated lambda (1.0) factorizes, and the codes follow it
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    h = _indefinite(dtype=torch.float32)
    qw = gptq_quantize(w, h, QuantSpec(3, 8), GPTQConfig(act_order=False))
    ref = _reference_gptq(w, h, QuantSpec(3, 8), lam=1.0, act_order=False)
    _assert_matches(qw, ref)


@pytest.mark.parametrize("spec", [QuantSpec(2), QuantSpec(3, 16), QuantSpec(4, 32), QuantSpec(2, 32, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_unblocked_reference_and_kron_solver_without_row_hessian(spec, act_order):
    w, h, _ = _layer(seed=2, out=16, n=64)
    cfg = GPTQConfig(block_size=24, act_order=act_order)  # groups of 16 and 32 straddle blocks
    qw = gptq_quantize(w, h, spec, cfg)
    _assert_matches(qw, _reference_gptq(w, h, spec, cfg.damp, act_order))
    boa = BoAConfig(block_size=24, act_order=act_order, clip_search=False)
    codes, scale, zero = kron_gptq(w[None], None, h[None], spec, boa)  # H = I (x) H_col
    assert torch.equal(qw.qweight, codes[0].to(torch.uint8))
    assert torch.equal(qw.scale, scale[0]) and torch.equal(qw.zero, zero[0])


@pytest.mark.parametrize("spec", [QuantSpec(2, 96), QuantSpec(2, 64), QuantSpec(3, 32), QuantSpec(2)])
@pytest.mark.parametrize("act_order", [False, True])
def test_codes_do_not_depend_on_block_size(spec, act_order):
    # g = 96 straddles blocks of 64 and 128; g = 64 straddles blocks of 96
    w, h, _ = _layer(seed=3, out=32, n=192)
    # 33 and 97: a g32 / g96 group starts at a block's last column
    sizes = (32, 33, 64, 96, 97, 128, 1000)
    runs = [gptq_quantize(w, h, spec, GPTQConfig(block_size=b, act_order=act_order)) for b in sizes]
    for b, qw in zip(sizes[1:], runs[1:]):
        assert torch.equal(qw.qweight, runs[0].qweight) and torch.equal(qw.zero, runs[0].zero), b
        # block size reorders float32 sums (lazy matmul vs per-column updates): scales agree to rounding
        torch.testing.assert_close(qw.scale, runs[0].scale, rtol=1e-5, atol=0, msg=str(b))
    _assert_matches(runs[0], _reference_gptq(w, h, spec, 0.01, act_order))


def test_dead_columns_are_zeroed():
    w, h, _ = _layer(out=8, n=64)
    h[5, :] = 0
    h[:, 5] = 0
    qw = gptq_quantize(w, h, QuantSpec(4, 32))
    assert qw.dequantize()[:, 5].abs().max() == 0
    # and the rest is GPTQ with the dead column's diagonal set to 1 (it enters mean(diag H), the damping)
    _assert_matches(qw, _reference_gptq(w, h, QuantSpec(4, 32)))


def test_gptq_config_validation():
    for damp in (0, 1.0, 1.5):
        with pytest.raises(ValueError, match="damp must be in"):
            GPTQConfig(damp=damp)
    with pytest.raises(ValueError, match="block_size must be positive"):
        GPTQConfig(block_size=0)
    GPTQConfig(block_size=1, damp=0.999)  # the edges that are allowed


def test_hessian_of_batched_inputs_equals_that_of_the_flattened_rows():
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))  # (batch, tokens, in): tokens != in
    h3, n3 = accumulate_hessian(None, 0, x)
    h2, n2 = accumulate_hessian(None, 0, x.reshape(15, 7))
    assert n3 == n2 == 15 and h3.shape == (7, 7) and h3.dtype == torch.float32
    torch.testing.assert_close(h3, h2, rtol=0, atol=0)
    torch.testing.assert_close(h3, 2 / 15 * x.reshape(15, 7).t() @ x.reshape(15, 7))


def test_the_damping_limit_is_passed_through_and_named_when_it_runs_out():
    h = _indefinite(dtype=torch.float32)  # needs the third lambda (0.01, 0.1, 1.0)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match=r"even with damping 0\.1 x mean"):  # the last one tried
        gptq_quantize(w, h, QuantSpec(3, 8), GPTQConfig(act_order=False, max_damp_tries=2))
    gptq_quantize(w, h, QuantSpec(3, 8), GPTQConfig(act_order=False, max_damp_tries=3))


def test_codes_are_uint8_with_int32_g_idx_and_the_latent_is_the_weight_each_code_rounds():
    w, h, _ = _layer(seed=4, out=16, n=64)
    for act_order in (False, True):
        qw = gptq_quantize(w, h, QuantSpec(3, 16), GPTQConfig(act_order=act_order))
        assert qw.qweight.dtype == torch.uint8 and qw.g_idx.dtype == torch.int32
        s, z = qw.scale[:, qw.g_idx.long()], qw.zero[:, qw.g_idx.long()]
        # the latent is the error-compensated column just before rounding: it rounds to the codes and
        # is not the original weight
        assert torch.equal(torch.clamp(torch.round(qw.latent / s) + z, 0, 7).to(torch.uint8), qw.qweight)
        assert not torch.allclose(qw.latent, w, atol=1e-3)


def test_clip_search_takes_hessian_weighted_static_qparams():
    # act-order groups are static: their qparams are the diag(H)-weighted clipping search on the
    # original weight, which differs here from min-max and from the unweighted search
    w, h, _ = _layer(seed=5, out=16, n=64)
    spec = QuantSpec(3, 32)
    qw = gptq_quantize(w, h, spec, GPTQConfig(act_order=True, clip_search=True))
    scale, zero = search_qparams(w, spec, weight=torch.diag(h))
    assert torch.equal(qw.scale, scale) and torch.equal(qw.zero, zero)
    assert not torch.equal(scale, search_qparams(w, spec)[0]) and not torch.equal(scale, minmax_qparams(w, spec)[0])


def test_clip_search_on_lazy_groups_changes_the_codes_and_not_with_the_block_size():
    w, h, _ = _layer(seed=6, out=16, n=96)
    spec = QuantSpec(2, 32)
    runs = [gptq_quantize(w, h, spec, GPTQConfig(act_order=False, clip_search=True, block_size=b)) for b in (16, 33, 96)]
    assert all(torch.equal(r.qweight, runs[0].qweight) for r in runs[1:])
    plain = gptq_quantize(w, h, spec, GPTQConfig(act_order=False))
    assert not torch.equal(runs[0].scale, plain.scale) and not torch.equal(runs[0].qweight, plain.qweight)


def test_inverse_cholesky_bits_do_not_depend_on_the_thread_count():
    # MKL's blocked Cholesky splits its work by thread from n ~ 256 on: a Dask/Ray worker (1 thread)
    # would otherwise get other codes than the driver (all cores) for the same Hessian
    _, h, _ = _layer(n=384, tokens=1536)
    before = torch.get_num_threads()
    try:
        factors = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            factors.append(damped_inverse_cholesky(h, 0.01))
            assert torch.get_num_threads() == threads  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*factors)
