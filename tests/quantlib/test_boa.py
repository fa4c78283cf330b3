import pytest
import torch
import transformers as T
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as partial_rotary

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

from tiny import FAMILIES, tiny_ids, tiny_model

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


@pytest.mark.parametrize("rotary", [8, 4])
def test_rope_weighted_sum_equals_explicit_rotations(rotary):
    """Full and partial rotary (the first `rotary` of d dims rotated, cos/sin padded with 1/0)."""
    t, d, groups = 12, 8, 2
    cos_r, sin_r = _rope(t, rotary)
    cos = torch.cat([cos_r, torch.ones(t, d - rotary, dtype=torch.float64)], -1)
    sin = torch.cat([sin_r, torch.zeros(t, d - rotary, dtype=torch.float64)], -1)
    j = rotate_half_matrix(d, torch.float64, rotary=rotary)
    p = torch.randn(d, dtype=torch.float64)
    rot = [torch.diag(cos[a]) + torch.diag(sin[a]) @ j for a in range(t)]
    # R_a is exactly HF's RoPE (Phi-3's, which rotates the first cos.shape[-1] dims)
    q_hf, _ = partial_rotary(p.expand(1, 1, t, d), p.expand(1, 1, t, d), cos_r[None], sin_r[None])
    torch.testing.assert_close(q_hf[0, 0], torch.stack([r @ p for r in rot]))
    k = torch.randn(groups, t, d, dtype=torch.float64)
    moments = k[..., :, None] * k[..., None, :]
    weight = torch.ones(t, t, dtype=torch.float64).tril() - torch.ones(t, t, dtype=torch.float64).tril(-4)  # window 4
    ref = sum(weight[a, b] * rot[a].t() @ moments[:, b] @ rot[a] for a in range(t) for b in range(t))
    torch.testing.assert_close(rope_weighted_sum(moments, weight, cos, sin, rotary), ref)


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128)


def _one_block(family: str, seed: int = 0):
    """One-block tiny model of `family`; "phi3_partial" is Phi-3 with half of each head rotated.
    Norm gains are randomized so a formula that ignores them cannot pass."""
    torch.manual_seed(seed)
    config = {
        "llama": lambda: T.LlamaConfig(**_SMALL),
        "qwen3": lambda: T.Qwen3Config(**_SMALL, head_dim=16),
        "gemma3_text": lambda: T.Gemma3TextConfig(**_SMALL, head_dim=16, sliding_window=8,
                                                  layer_types=["sliding_attention"]),
        "phi3_partial": lambda: T.Phi3Config(**_SMALL, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1,
                                             eos_token_id=2),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=128,
                                     bos_token_id=0, eos_token_id=0),
        # full-width q/k norms (one rms over all heads of a token) and a sparse MLP
        "olmoe": lambda: T.OlmoeConfig(**_SMALL, num_experts=4, num_experts_per_tok=2, eos_token_id=2,
                                       pad_token_id=1),
    }[family]()
    model = T.AutoModelForCausalLM.from_config(config).eval()
    attn = get_adapter(model).blocks[0].get_submodule(attention_layout(get_adapter(model)).module)
    with torch.no_grad():
        if family == "gpt2":  # learned positions would make x_t depend on t even for one repeated token
            model.transformer.wpe.weight.zero_()
        for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
            if norm is not None:
                norm.weight.copy_(0.5 + torch.rand_like(norm.weight))
    return model


_PROBED: list = []


def _probe(module, query, key, value, attention_mask, **kwargs):
    """An attention implementation that records the q and k the model attends with (after its
    q/k norms and RoPE, (b, heads, T, d_h)) and then runs SDPA."""
    _PROBED.append((query, key))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


T.AttentionInterface.register("boa_probe", _probe)


def _attended(model, block, x, call):
    """(q, k) of block's attention on x (1, T, d): the model's own post-norm, post-RoPE values."""
    model.set_attn_implementation("boa_probe")
    _PROBED.clear()
    with torch.no_grad():
        run_block(block, x, call)
    model.set_attn_implementation("sdpa")
    q, k = _PROBED[0]
    return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # a kv head serves r query heads


def _perturbed_rows(adapter, block, name, rows, delta):
    """Add delta (len(rows), d) to rows of Linear `name`, in (out, in) layout whatever the module stores."""
    m = block.get_submodule(name)
    w = adapter.get_weight(m).clone()
    w[rows] += delta
    adapter.set_weight(m, w)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3_partial", "gpt2", "olmoe"])
def test_query_and_key_hessians_are_first_order_logit_error(family):
    """Block 0 on one repeated token (x_t the same at every t, so the Kronecker relaxation is exact):
    for a perturbation D of one head's rows, the mean over allowed pairs of the measured logit change
    dz^2 equals 1/2 tr(H_row D H_col D^T), with the model's own norms, (partial) RoPE, mask and fused
    layout. D x is taken orthogonal to the head's projection p: the radial direction is the one a
    q/k norm ignores and the derivation drops."""
    model = _one_block(family).double()
    adapter = get_adapter(model)
    layout, geo = attention_layout(adapter), adapter.geometry
    batches, calls = capture_block_inputs(adapter, torch.full((1, 24), 7), 1)
    block, x, call = adapter.blocks[0], batches[0], calls[0]
    stats = collect_attention_stats(block, layout, geo, batches, call, "cpu")
    hs, allowed = stats.hessians(), stats.allowed
    hd, heads, r = geo.head_dim, geo.num_heads, geo.num_heads // geo.num_kv_heads
    xin = []
    hook = block.get_submodule(layout.module).register_forward_pre_hook(
        lambda _m, a, kw: xin.append((a[0] if a else kw["hidden_states"])[0, 0]), with_kwargs=True)
    q0, k0 = _attended(model, block, x, call)
    hook.remove()
    proj = {n: adapter.get_weight(block.get_submodule(n)).detach().clone() for n in layout.names}
    g = torch.Generator().manual_seed(0)
    eps = 1e-3

    def check(name, first_row, head_rows, h_row, h_col, heads_moved):
        xt = xin[0]
        p = proj[name][first_row : first_row + hd] @ xt  # the head's projection of x (bias shifts p, not D x)
        bias = getattr(block.get_submodule(name), "bias", None)
        p = p + (0 if bias is None else bias.detach()[first_row : first_row + hd])
        d = torch.randn(hd, xt.shape[0], generator=g, dtype=torch.float64)
        dx = d @ xt
        d = d - torch.outer(p * (p @ dx) / (p @ p), xt / (xt @ xt))  # D x orthogonal to p
        d = d * (p.norm() / (d @ xt).norm())  # |D x| = |p|: eps is the relative step
        z = []
        for sign in (1, -1):  # central difference: the norms compute in float32
            _perturbed_rows(adapter, block, name, slice(first_row, first_row + hd), sign * eps * d)
            q1, k1 = _attended(model, block, x, call)
            adapter.set_weight(block.get_submodule(name), proj[name])
            z.append(q1 @ k1.transpose(-1, -2))
        dz = (z[0] - z[1])[0, heads_moved] / (2 * eps)  # (h, T, T)
        measured = (dz[:, allowed] ** 2).sum(0).mean()
        predicted = 0.5 * torch.trace(h_row.double() @ d @ h_col.double() @ d.t())
        torch.testing.assert_close(measured, predicted, rtol=2e-3, atol=1e-9)

    q_off, k_off = 0, (heads * hd if layout.fused else 0)
    for h in (0, heads - 1):
        col = hs.col_q[h if hs.col_q.shape[0] > 1 else 0]
        check(layout.q, q_off + h * hd, hd, hs.row_q[h], col, [h])
    for kv in range(geo.num_kv_heads):
        col = hs.col_k[kv if hs.col_k.shape[0] > 1 else 0]
        check(layout.k, k_off + kv * hd, hd, hs.row_k[kv], col, list(range(kv * r, (kv + 1) * r)))


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


def _peaked(family, seed):
    """One-block tiny model with attention peaked, not uniform: W_Q, W_K scaled up by 8, or with
    q/k norms (which cancel that) their gains doubled."""
    model = _one_block(family, seed)
    adapter = get_adapter(model)
    layout, geo = attention_layout(adapter), adapter.geometry
    block = adapter.blocks[0]
    attn = block.get_submodule(layout.module)
    with torch.no_grad():
        if getattr(attn, "q_norm", None) is not None:
            for norm in (attn.q_norm, attn.k_norm):
                norm.weight.copy_(2 * (layout.norm_offset + norm.weight) - layout.norm_offset)
        else:  # the rows of W_Q and W_K: all of q/k_proj, or the first (heads + kv) d_h of a fused projection
            qk_rows = (geo.num_heads + geo.num_kv_heads) * geo.head_dim if layout.fused else None
            for name in {layout.q, layout.k}:
                w = adapter.get_weight(block.get_submodule(name)).clone()
                w[:qk_rows] *= 8
                adapter.set_weight(block.get_submodule(name), w)
    return model


def _attention_output(block, layout, batches, call):
    """The attention module's output (after W_O) for every batch, and its inputs X."""
    outs, xs = [], []
    attn = block.get_submodule(layout.module)
    h1 = attn.register_forward_hook(lambda _m, _a, out: outs.append(out[0]))
    h2 = attn.register_forward_pre_hook(lambda _m, a, kw: xs.append(a[0] if a else kw["hidden_states"]),
                                        with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            run_block(block, b, call)
    h1.remove()
    h2.remove()
    return torch.cat(outs), torch.cat(xs)


@pytest.mark.parametrize("family,seed,clip_search", [
    ("llama", 0, False), ("llama", 1, False), ("llama", 0, True), ("llama", 1, True),
    ("qwen3", 0, False), ("gemma3_text", 0, False), ("phi3_partial", 0, False), ("gpt2", 0, False),
    ("olmoe", 0, False),
])
def test_boa_beats_gptq_on_attention_output_error(family, seed, clip_search):
    """q/k norms (Qwen3, Gemma3; OLMoE full-width), partial rotary and a fused q/k/v (Phi-3), a fused transposed q/k/v
    without RoPE (GPT-2): BoA's joint solve beats per-Linear GPTQ on the attention's output."""
    adapter = get_adapter(_peaked(family, seed))
    layout = attention_layout(adapter)
    batches, calls = capture_block_inputs(adapter, tiny_ids(16, 64, seed=seed), 8)
    block = adapter.blocks[0]
    ref, x = _attention_output(block, layout, batches, calls[0])
    h, _ = accumulate_hessian(None, 0, x)
    fp = {n: adapter.get_weight(block.get_submodule(n)).detach().clone() for n in layout.names}

    def error_with(weights):
        for n in layout.names:
            adapter.set_weight(block.get_submodule(n), weights[n])
        out = _attention_output(block, layout, batches, calls[0])[0]
        for n in layout.names:
            adapter.set_weight(block.get_submodule(n), fp[n])
        return float((out - ref).pow(2).sum() / ref.pow(2).sum())

    for bits in (2, 3):
        spec = QuantSpec(bits, 32)
        cfg = BoAConfig(clip_search=clip_search)
        boa = solve_attention(adapter, block, list(layout.names), batches, calls[0], lambda n: spec, cfg, "cpu")
        assert set(boa) == set(layout.names)
        e_boa = error_with({n: boa[n][0].dequantize() for n in layout.names})
        gptq = GPTQConfig(clip_search=clip_search)
        e_gptq = error_with({n: gptq_quantize(fp[n], h, spec, gptq).dequantize() for n in layout.names})
        assert e_boa < e_gptq, (bits, e_boa, e_gptq)


# ------------------------------------------------------------------ (c) engine, per family


@pytest.mark.parametrize("family", FAMILIES)
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
    assert len(res) == sum(len(adapter.linear_names(b)) for b in adapter.blocks)
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
