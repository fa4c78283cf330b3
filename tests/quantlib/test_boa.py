import pytest
import torch
import transformers as T
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from quantlib.adapters import UnsupportedModelError, get_adapter
from quantlib.boa import (
    BoAConfig,
    attention_layout,
    collect_attention_stats,
    kron_error,
    kron_gptq,
    rope_weighted_sum,
    rotate_half_matrix,
    solve_attention,
)
from quantlib.capture import capture_block_inputs, run_block
from quantlib.activations import ActivationStore
from quantlib.engine import EngineConfig, quantize_block, quantize_model
from quantlib.gptq import GPTQConfig, accumulate_hessian, gptq_quantize
from quantlib.methods import method_for
from quantlib.rtn import RTNConfig, rtn_quantize
from quantlib.spec import QuantSpec

from tiny import tiny_ids, tiny_model

QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def _spd(n, seed, rank=None, dtype=torch.float64):
    """Correlated positive definite matrix, as real Hessians are."""
    g = torch.Generator().manual_seed(seed)
    rank = rank or n
    x = torch.randn(4 * n, rank, generator=g, dtype=dtype) @ torch.randn(rank, n, generator=g, dtype=dtype)
    x = x + 0.3 * torch.randn(4 * n, n, generator=g, dtype=dtype)
    return x.t() @ x / x.shape[0]


def _rope(t, d, base=100.0):
    pos = torch.arange(t, dtype=torch.float64)[:, None]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv], dim=-1)
    return ang.cos(), ang.sin()


# ------------------------------------------------------------------------------ (a) the math


def _dense_gptq(w, h_row, h_col, scale, zero, maxq, damp, row_perm, col_perm):
    """Element-by-element GPTQ on the full (rows n)^2 Hessian H_row (x) H_col, elements taken
    column-major in the permuted order; the reference kron_gptq must reproduce exactly."""
    rows, n = w.shape
    g = n // scale.shape[1]
    s = scale.repeat_interleave(g, 1)[row_perm][:, col_perm]
    z = zero.repeat_interleave(g, 1)[row_perm][:, col_perm]
    hr, hc = h_row[row_perm][:, row_perm], h_col[col_perm][:, col_perm]
    hr = hr + damp * hr.diagonal().mean() * torch.eye(rows, dtype=hr.dtype)
    hc = hc + damp * hc.diagonal().mean() * torch.eye(n, dtype=hc.dtype)
    h = torch.kron(hc, hr)  # index j * rows + i: column-major
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    v, sv, zv = (m.t().reshape(-1).clone() for m in (w[row_perm][:, col_perm], s, z))
    q = torch.empty_like(v)
    for p in range(v.numel()):
        q[p] = torch.clamp(torch.round(v[p] / sv[p]) + zv[p], 0, maxq)
        err = (v[p] - sv[p] * (q[p] - zv[p])) / u[p, p]
        v[p:] -= err * u[p, p:]
    q = q.view(n, rows).t()
    return q[torch.argsort(row_perm)][:, torch.argsort(col_perm)]


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("act_order_rows", [False, True])
def test_kron_solver_equals_dense_gptq_on_full_hessian(group_size, act_order, act_order_rows):
    heads, rows, n = 3, 4, 16
    g = torch.Generator().manual_seed(1)
    w = torch.randn(heads, rows, n, generator=g, dtype=torch.float64)
    h_row = torch.stack([_spd(rows, 10 + h) for h in range(heads)])
    h_col = _spd(n, 2, rank=6)[None]
    spec = QuantSpec(3, group_size)
    cfg = BoAConfig(block_size=5, act_order=act_order, act_order_rows=act_order_rows, clip_search=True, clip_grid=20)
    codes, scale, zero = kron_gptq(w, h_row, h_col, spec, cfg)
    col_perm = torch.argsort(h_col[0].diagonal(), descending=True) if act_order else torch.arange(n)
    for h in range(heads):
        row_perm = torch.argsort(h_row[h].diagonal(), descending=True) if act_order_rows else torch.arange(rows)
        ref = _dense_gptq(w[h], h_row[h], h_col[0], scale[h], zero[h], spec.maxq, cfg.damp, row_perm, col_perm)
        assert torch.equal(codes[h], ref), h


def test_kron_solver_without_row_hessian_is_per_head_gptq():
    heads, rows, n = 2, 5, 16
    w = torch.randn(heads, rows, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h_col = torch.stack([_spd(n, 20 + h, rank=5) for h in range(heads)])  # per-head H_col, as for W_V
    cfg = BoAConfig(block_size=7, act_order=True, clip_search=False)
    codes, scale, zero = kron_gptq(w, None, h_col, QuantSpec(3, 8), cfg)
    eye = torch.eye(rows, dtype=torch.float64)
    for h in range(heads):
        perm = torch.argsort(h_col[h].diagonal(), descending=True)
        ref = _dense_gptq(w[h], eye, h_col[h], scale[h], zero[h], 7, cfg.damp, torch.arange(rows), perm)
        assert torch.equal(codes[h], ref)


def test_rope_weighted_sum_equals_explicit_rotations():
    t, d, groups = 12, 8, 2
    cos, sin = _rope(t, d)
    j = rotate_half_matrix(d, torch.float64)
    p = torch.randn(d, dtype=torch.float64)
    rot = [torch.diag(cos[a]) + torch.diag(sin[a]) @ j for a in range(t)]
    # R_a is exactly HF's RoPE
    q_hf, _ = apply_rotary_pos_emb(p.expand(1, 1, t, d), p.expand(1, 1, t, d), cos[None], sin[None])
    torch.testing.assert_close(q_hf[0, 0], torch.stack([r @ p for r in rot]))
    k = torch.randn(groups, t, d, dtype=torch.float64)
    moments = k[..., :, None] * k[..., None, :]
    weight = torch.ones(t, t, dtype=torch.float64).tril() - torch.ones(t, t, dtype=torch.float64).tril(-4)  # window 4
    ref = sum(weight[a, b] * rot[a].t() @ moments[:, b] @ rot[a] for a in range(t) for b in range(t))
    torch.testing.assert_close(rope_weighted_sum(moments, weight, cos, sin), ref)


def _repeated_token_block(family="llama"):
    """Block 0 fed one sequence of a single repeated token: x_t is the same at every position, so
    the Kronecker relaxation sum_t B_t (x) x_t x_t^T = (sum_t B_t) (x) x x^T is exact."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    batches, calls = capture_block_inputs(adapter, torch.full((1, 24), 7), 1)
    block = adapter.blocks[0]
    stats = collect_attention_stats(block, attention_layout(adapter), adapter.geometry, batches, calls[0], "cpu")
    xs = []
    hook = block.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: xs.append(a[0][0]))
    with torch.no_grad():
        run_block(block, batches[0], calls[0])
    hook.remove()
    return adapter, block, calls[0], stats, xs[0]


def test_query_and_key_row_hessians_are_exact_logit_error_in_weight_coordinates():
    """H_row predicts the logit error of a weight perturbation D computed with the model's own RoPE:
    sum_{t<=s} dz^2 / #pairs = (D x)^T H_row (D x) when x_t does not depend on t."""
    adapter, block, call, stats, x = _repeated_token_block()
    geo = adapter.geometry
    hs = stats.hessians()
    cos, sin = call.kwargs["position_embeddings"]
    attn, t, hd, r = block.self_attn, x.shape[0], geo.head_dim, geo.num_heads // geo.num_kv_heads
    mask = torch.ones(t, t).tril().bool()
    with torch.no_grad():
        q = attn.q_proj(x).view(1, t, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, t, -1, hd).transpose(1, 2)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    g = torch.Generator().manual_seed(0)
    for head in (0, geo.num_heads - 1):
        dq = (torch.randn(hd, x.shape[1], generator=g) @ x[0]).expand(1, 1, t, hd)  # D x, same at every t
        dq_rot, _ = apply_rotary_pos_emb(dq, dq, cos, sin)
        dz = dq_rot[0, 0] @ k_rot[0, head // r].t()
        predicted = dq[0, 0, 0] @ hs.row_q[head] @ dq[0, 0, 0]
        torch.testing.assert_close((dz[mask] ** 2).mean(), predicted, rtol=1e-4, atol=1e-7)
    for kv in range(geo.num_kv_heads):
        dk = (torch.randn(hd, x.shape[1], generator=g) @ x[0]).expand(1, 1, t, hd)
        _, dk_rot = apply_rotary_pos_emb(dk, dk, cos, sin)
        dz = torch.stack([q_rot[0, h] @ dk_rot[0, 0].t() for h in range(kv * r, (kv + 1) * r)])
        predicted = dk[0, 0, 0] @ hs.row_k[kv] @ dk[0, 0, 0]
        torch.testing.assert_close((dz[:, mask] ** 2).sum(0).mean(), predicted, rtol=1e-4, atol=1e-7)


def test_value_hessian_is_exact_attention_output_error():
    """A perturbation D of W_V moves the attention output (o_proj's input) by A_h X D^T per head:
    sum ||change||^2 = N/2 sum_g tr(D_g H_v[g] D_g^T), checked against the model's SDPA attention."""
    model = tiny_model("qwen2")
    adapter = get_adapter(model)
    batches, calls = capture_block_inputs(adapter, tiny_ids(4, 32), 2)
    block, geo = adapter.blocks[0], adapter.geometry
    hs = collect_attention_stats(block, attention_layout(adapter), geo, batches, calls[0], "cpu").hessians()
    outs = []
    hook = block.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: outs.append(a[0]))

    def attention_inputs():
        outs.clear()
        with torch.no_grad():
            for b in batches:
                run_block(block, b, calls[0])
        return torch.cat(outs)

    base = attention_inputs()
    d = 1e-2 * torch.randn_like(block.self_attn.v_proj.weight)
    with torch.no_grad():
        block.self_attn.v_proj.weight += d
    moved = attention_inputs()
    hook.remove()
    n = base.shape[0] * base.shape[1]
    dg = d.view(geo.num_kv_heads, geo.head_dim, -1)
    predicted = n / 2 * sum(torch.trace(dg[g] @ hs.col_v[g] @ dg[g].t()) for g in range(geo.num_kv_heads))
    torch.testing.assert_close((moved - base).pow(2).sum(), predicted, rtol=1e-3, atol=0)


def test_kron_solver_beats_rtn_on_kronecker_weighted_error():
    heads, rows, n = 4, 16, 64
    w = torch.randn(heads, rows, n, generator=torch.Generator().manual_seed(5))
    h_row = torch.stack([_spd(rows, 30 + h, rank=4, dtype=torch.float32) for h in range(heads)])
    h_col = _spd(n, 4, rank=16, dtype=torch.float32)[None]
    for spec in (QuantSpec(2, 32), QuantSpec(3, 32), QuantSpec(4)):
        codes, scale, zero = kron_gptq(w, h_row, h_col, spec)
        g = n // scale.shape[-1]
        w_hat = scale.repeat_interleave(g, -1) * (codes - zero.repeat_interleave(g, -1))
        w_rtn = rtn_quantize(w.reshape(-1, n), spec).dequantize().view(heads, rows, n)
        assert kron_error(w, w_hat, h_row, h_col) < 0.5 * kron_error(w, w_rtn, h_row, h_col), spec


def test_kron_solver_does_not_modify_inputs_and_zeroes_dead_columns():
    w = torch.randn(2, 4, 16)
    h_row = torch.stack([_spd(4, 1, dtype=torch.float32)] * 2)
    h_col = _spd(16, 2, dtype=torch.float32)[None]
    h_col[0, 3, :] = 0
    h_col[0, :, 3] = 0
    args = (w.clone(), h_row.clone(), h_col.clone())
    codes, scale, zero = kron_gptq(w, h_row, h_col, QuantSpec(4, 8))
    assert all(torch.equal(a, b) for a, b in zip(args, (w, h_row, h_col)))
    w_hat = scale.repeat_interleave(8, -1) * (codes - zero.repeat_interleave(8, -1))
    assert w_hat[..., 3].abs().max() == 0


# ---------------------------------------------------------- (b) attention-output error vs GPTQ


def _peaked_llama(seed):
    """One-block tiny llama with W_Q, W_K scaled up so attention is peaked, not uniform."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(8)
        model.model.layers[0].self_attn.k_proj.weight.mul_(8)
    return model


def _attention_output(block, batches, call):
    """(softmax(Q K^T) V) W_O^T for every batch, and the attention inputs X."""
    outs, xs = [], []
    h1 = block.self_attn.register_forward_hook(lambda _m, _a, out: outs.append(out[0]))
    h2 = block.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: xs.append(a[0]))
    with torch.no_grad():
        for b in batches:
            run_block(block, b, call)
    h1.remove()
    h2.remove()
    return torch.cat(outs), torch.cat(xs)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("clip_search", [False, True])
def test_boa_beats_gptq_on_attention_output_error(seed, clip_search):
    adapter = get_adapter(_peaked_llama(seed))
    batches, calls = capture_block_inputs(adapter, tiny_ids(16, 64, seed=seed), 8)
    block = adapter.blocks[0]
    ref, x = _attention_output(block, batches, calls[0])
    h, _ = accumulate_hessian(None, 0, x)
    fp = {n: block.get_submodule(n).weight.detach().clone() for n in QKV}

    def error_with(weights):
        with torch.no_grad():
            for n in QKV:
                block.get_submodule(n).weight.copy_(weights[n])
            out = _attention_output(block, batches, calls[0])[0]
            for n in QKV:
                block.get_submodule(n).weight.copy_(fp[n])
        return float((out - ref).pow(2).sum() / ref.pow(2).sum())

    for bits in (2, 3):
        spec = QuantSpec(bits, 32)
        boa = solve_attention(adapter, block, QKV, batches, calls[0], spec, BoAConfig(clip_search=clip_search), "cpu")
        e_boa = error_with({n: boa[n][0].dequantize() for n in QKV})
        gptq = GPTQConfig(clip_search=clip_search)
        e_gptq = error_with({n: gptq_quantize(fp[n], h, spec, gptq).dequantize() for n in QKV})
        assert e_boa < e_gptq, (bits, e_boa, e_gptq)


# ------------------------------------------------------------------ (c) engine, per family


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma2", "opt"])
def test_boa_engine_runs_and_beats_rtn_on_model_output(family):
    ids = tiny_ids(8, 32)
    with torch.no_grad():
        ref = tiny_model(family)(ids).logits
    err = {}
    for name, method in (("rtn", RTNConfig()), ("boa", BoAConfig())):
        model = tiny_model(family)
        res, stats = quantize_model(get_adapter(model), ids, QuantSpec(3, 32), method, EngineConfig(batch_size=4))
        with torch.no_grad():
            err[name] = float((model(ids).logits - ref).pow(2).mean())
    adapter = get_adapter(model)
    assert len(res) == len(adapter.blocks) * len(adapter.linear_names())
    for key, qw in res.items():  # the model holds exactly the quantized weights
        torch.testing.assert_close(adapter.get_weight(model.get_submodule(key)), qw.dequantize())
        assert torch.equal(qw.g_idx, torch.arange(qw.shape[1], dtype=torch.int32) // 32)
    q_name = adapter.family.groups[0][0]
    assert all(0 < s.layer_errors[q_name] < 1 for s in stats)
    assert err["boa"] < 0.6 * err["rtn"], err


def test_boa_is_registered_and_keeps_gptq_for_the_rest():
    cfg = BoAConfig(act_order=False, block_size=64)
    assert method_for(cfg).name == "boa" and method_for(cfg).solve_group is not None
    assert cfg.gptq() == GPTQConfig(block_size=64, act_order=False, clip_search=False)


def test_engine_collects_o_proj_hessian_after_boa_quantized_qkv():
    """True-sequential order: o_proj is solved by GPTQ on inputs from BoA's quantized q/k/v."""
    spec, cfg = QuantSpec(3, 32), BoAConfig()
    adapter = get_adapter(tiny_model("llama"))
    batches, calls = capture_block_inputs(adapter, tiny_ids(8, 32), 4)
    res, _, _ = quantize_block(adapter, 0, ActivationStore.from_batches(batches, None), calls[0], spec, cfg,
                               EngineConfig(batch_size=4))
    block = get_adapter(tiny_model("llama")).blocks[0]
    acc = [None, 0]

    def probe(_m, a):
        acc[:] = accumulate_hessian(acc[0], acc[1], a[0])

    with torch.no_grad():
        for n in QKV:
            block.get_submodule(n).weight.copy_(res[f"model.layers.0.{n}"].dequantize())
        hook = block.self_attn.o_proj.register_forward_pre_hook(probe)
        for b in batches:
            run_block(block, b, calls[0])
        hook.remove()
    expected = gptq_quantize(block.self_attn.o_proj.weight, acc[0], spec, cfg.gptq())
    assert torch.equal(res["model.layers.0.self_attn.o_proj"].qweight, expected.qweight)


# ------------------------------------------------------------------- (d) unsupported layouts


@pytest.mark.parametrize("family,reason", [("phi3", "fused"), ("gpt2", "fused"), ("qwen3", "q_norm")])
def test_unsupported_attention_fails_clearly(family, reason):
    model = tiny_model(family)
    with pytest.raises(UnsupportedModelError, match=reason):
        quantize_model(get_adapter(model), tiny_ids(4, 16), QuantSpec(3, 32), BoAConfig(), EngineConfig(batch_size=4))


def test_attention_the_reconstruction_does_not_match_fails_clearly():
    """Stands in for an attention variant BoA does not model (ALiBi, partial rotary, ...)."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    block = adapter.blocks[0]
    block.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: (a[0] * 1.5,))
    with pytest.raises(UnsupportedModelError, match="differs from the model's attention"):
        quantize_model(adapter, tiny_ids(4, 16), QuantSpec(3, 32), BoAConfig(), EngineConfig(batch_size=4))


def test_boa_config_validation():
    with pytest.raises(ValueError, match="damp must be in"):
        BoAConfig(damp=0)
    with pytest.raises(ValueError, match="block_size must be positive"):
        BoAConfig(block_size=0)
    with pytest.raises(ValueError, match="clip_max_shrink"):
        BoAConfig(clip_max_shrink=1.0)
    with pytest.raises(ValueError, match="clip_grid"):
        BoAConfig(clip_grid=0)
