"""quantlib.actquant: per-token activation fake-quant against its formula, hooks that every module
kind honours, and SmoothQuant that leaves the FP model's outputs unchanged."""
from __future__ import annotations

import copy

import pytest
import torch

from quantlib.actquant import (ActSpec, attach, attached, calibrate_static, fake_quant_static, fake_quant_tokens, input_scales,
                               parse_activations, smooth_block, smooth_scales)
from quantlib.adapters import get_adapter
from quantlib.activations import ActivationStore
from quantlib.capture import capture_block_inputs, run_block
from quantlib.engine import EngineConfig, quantize_block, quantize_model
from quantlib.gptq import GPTQConfig, accumulate_hessian
from quantlib.methods import quantize_weight
from quantlib.spec import QuantSpec

from tiny import tiny_ids, tiny_model


def test_fake_quant_matches_the_per_token_formula():
    """vLLM's dynamic int8 (scaled_int8_quant): s = max|x| / 127 per token, q = clamp(round(x / s))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-2, 2, 64)  # channels of very different ranges
    for bits, qmax in ((8, 127), (4, 7)):
        y = fake_quant_tokens(x, ActSpec(bits))
        s = x.abs().amax(-1, keepdim=True) / qmax
        assert torch.equal(y, torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s)
        codes = y / s
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= qmax + 1e-4
    err8 = (fake_quant_tokens(x, ActSpec(8)) - x).abs().amax(-1)
    assert torch.all(err8 <= x.abs().amax(-1) / 127 / 2 + 1e-6)  # half a step per token
    assert torch.equal(fake_quant_tokens(torch.zeros(2, 8), ActSpec(8)), torch.zeros(2, 8))


def test_gradient_passes_straight_through():
    x = torch.randn(4, 16, requires_grad=True)
    (fake_quant_tokens(x, ActSpec(4)) * torch.arange(16.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(16.0).expand(4, 16))


def test_parse_activations():
    assert parse_activations("a8") == ActSpec(8) and parse_activations(None) is None
    assert parse_activations("null") is None
    for bad in ("a3", "a16", "w8a8", "8"):
        with pytest.raises(ValueError):
            parse_activations(bad)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and GPT-2's Conv1D
def test_attached_hooks_quantize_exactly_the_named_inputs(family):
    model, ids = tiny_model(family), tiny_ids(2, 16)
    adapter = get_adapter(model)
    names = [f"{adapter.family.layers}.0.{n}" for n in adapter.linear_names(adapter.blocks[0])]
    seen = {}
    target = model.get_submodule(names[0])
    target.register_forward_pre_hook(lambda _m, args: seen.__setitem__("raw", args[0]))
    handles = attach(model, names, ActSpec(8))
    target.register_forward_hook(lambda _m, args, _o: seen.__setitem__("in", args[0]))
    with torch.no_grad():
        quantized = model(ids).logits
    assert torch.equal(seen["in"], fake_quant_tokens(seen["raw"], ActSpec(8)))
    assert set(attached(model)) == set(names)
    with pytest.raises(ValueError, match="already quantizes"):
        attach(model, names[:1], ActSpec(4))
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, quantized) and attached(model) == {}


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt", "mixtral"])  # RMSNorm, offset gains, LayerNorm bias
def test_smoothing_keeps_the_fp_model_and_moves_outliers(family):
    model, ids = tiny_model(family), tiny_ids(4, 32)
    adapter = get_adapter(model)
    with torch.no_grad():  # an outlier input channel for the attention: one norm gain 30x (Gemma: offset + w)
        w, off = adapter.blocks[0].get_submodule(adapter.family.norms[0][0]).weight, adapter.family.norm_offset
        w[5] = (off + w[5]) * 30 - off
        ref = model(ids).logits
    batches, calls = capture_block_inputs(adapter, ids, 4)
    q0 = adapter.blocks[0].get_submodule(adapter.groups(adapter.blocks[0])[0][0])
    before = adapter.get_weight(q0).detach().clone()
    smooth_block(adapter, adapter.blocks[0], batches, calls[0], 0.5, "cpu")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
    ratio = adapter.get_weight(q0).abs().amax(0) / before.abs().amax(0)
    assert ratio[5] > 2 * ratio.median()  # the outlier channel's weight column grew the most


def test_smooth_scales_formula():
    x, w = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    assert torch.allclose(smooth_scales(x, w, 0.5), torch.tensor([2.0, 0.5, 1.0]))
    assert torch.allclose(smooth_scales(x, w, 1.0)[:2], x[:2])
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(x, w, 1.5)


def test_smoothing_before_gptq_lowers_w8a8_error_with_an_outlier_channel():
    """W8 per-channel + A8 per token with one 30x input channel: SmoothQuant (alpha 0.5) before GPTQ
    brings the quantized model closer to the FP one than GPTQ alone."""
    ids = tiny_ids(8, 32)
    err = {}
    for smooth in (None, 0.5):
        model = tiny_model("llama")
        adapter = get_adapter(model)
        with torch.no_grad():
            for block in adapter.blocks:
                block.input_layernorm.weight[5] *= 30
                block.post_attention_layernorm.weight[9] *= 30
            ref = model(ids).logits
        results, _ = quantize_model(adapter, ids, QuantSpec(8, None, sym=True), GPTQConfig(),
                                    EngineConfig(batch_size=4, smooth=smooth))
        attach(model, sorted(results), ActSpec(8))
        with torch.no_grad():
            err[smooth] = float((model(ids).logits - ref).pow(2).mean())
    assert err[0.5] < 0.8 * err[None], err


def test_engine_smooth_is_validated():
    with pytest.raises(ValueError, match="alpha"):
        EngineConfig(smooth=2.0)
    copy.deepcopy(EngineConfig(smooth=0.5))
    with pytest.raises(ValueError, match="activation scheme"):
        EngineConfig(act_inputs="a3x")


def test_gptq_solves_on_the_quantized_inputs_the_release_feeds_it():
    """act_inputs a4: down_proj's Hessian comes from its a4-quantized inputs, downstream of the block's
    quantized q..up with a4 inputs of their own. Reference: GPTQ on exactly that Hessian gives the
    same codes; float inputs give other codes. The block's outputs (the next block's calibration) are
    those of the a4 block, and no hook stays behind."""
    ids = tiny_ids(8, 32)
    spec, cfg = QuantSpec(bits=3, group_size=32), GPTQConfig()
    got = {}
    for act in (None, "a4"):
        model = tiny_model("llama")
        adapter = get_adapter(model)
        batches, calls = capture_block_inputs(adapter, ids, 4)
        block = adapter.blocks[0]
        w_down = block.mlp.down_proj.weight.detach().float().clone()
        results, outputs, _ = quantize_block(adapter, 0, ActivationStore.from_batches(batches), calls[0], spec, cfg,
                                             EngineConfig(batch_size=4, act_inputs=act))
        got[act] = results[f"{adapter.family.layers}.0.mlp.down_proj"].qweight
    assert attached(model) == {}
    check = copy.deepcopy(block)  # the solved block; down_proj back to FP, every Linear's input a4
    attach(check, adapter.linear_names(check), ActSpec(4))
    with torch.no_grad():
        solved = [run_block(check, x, calls[0]) for x in batches]
    check.mlp.down_proj.weight.data.copy_(w_down)
    h, n = None, 0

    def hook(_m, args):
        nonlocal h, n
        h, n = accumulate_hessian(h, n, args[0])

    check.mlp.down_proj.register_forward_pre_hook(hook)  # after the a4 hook: sees the quantized input
    for x in batches:
        run_block(check, x, calls[0])
    assert torch.equal(got["a4"], quantize_weight(w_down, h, spec, cfg).qweight)
    assert not torch.equal(got["a4"], got[None])
    assert all(torch.equal(a, b) for a, b in zip(outputs, solved))


def test_qat_trains_through_the_quantized_activations():
    """QAT swaps every quantized Linear for a QATLinear: the swap keeps the activation quantizer, so
    the training forward (and its gradients) see the int4 inputs a release computes with."""
    from quantlib.qat import QATLinear, attach_qat, detach_qat

    model, ids = tiny_model("llama"), tiny_ids(2, 16)
    adapter = get_adapter(model)
    results, _ = quantize_model(adapter, ids, QuantSpec(bits=4, group_size=32), GPTQConfig())
    handles = attach(model, sorted(results), ActSpec(4))
    with torch.no_grad():
        release = model(ids).logits
    mods = attach_qat(adapter, results, "scales")
    assert all(isinstance(model.get_submodule(n), QATLinear) for n in results)
    assert set(attached(model)) == set(results)
    loss = model(ids).logits.float().pow(2).mean()
    loss.backward()
    qat_logits = model(ids).logits.detach()
    assert torch.allclose(qat_logits, release, atol=1e-4)  # the QAT forward is the release's forward
    assert all(q.log_scale.grad is not None and q.log_scale.grad.abs().sum() > 0 for q in mods.qat.values())
    detach_qat(adapter, mods)
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, release, atol=1e-4)  # without the quantizers again


def test_static_scales_are_the_calibration_range_and_clip_beyond_it():
    """calibrate_static: max |x| / qmax over every input the module got; the static fake-quant
    uses that one scale for every token and clips what lies beyond the calibrated range."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    names = [f"{adapter.family.layers}.0.{n}" for n in adapter.linear_names(adapter.blocks[0])]
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
             for n in names]
    ids = tiny_ids(6, 16)
    spec = parse_activations("a8s")
    assert spec == ActSpec(8, static=True) and spec.name == "a8s"
    scales = calibrate_static(model, names, ids.split(2), spec)
    for h in hooks:
        h.remove()
    for n in names:
        assert scales[n].shape == (1,)
        assert torch.equal(scales[n], (torch.cat([x.abs().amax().reshape(1) for x in seen[n]]).amax() / 127).reshape(1))
    s = torch.tensor([0.5])
    x = torch.tensor([[0.26, -0.74, 100.0, -100.0]])
    assert torch.equal(fake_quant_static(x, s, spec), torch.tensor([[0.5, -0.5, 63.5, -64.0]]))
    with pytest.raises(ValueError, match="calibrated scale"):
        attach(model, names, spec)
    handles = attach(model, names, spec, scales)
    assert input_scales(model) == scales and set(attached(model).values()) == {"a8s"}
    for h in handles:
        h.remove()
    assert input_scales(model) == {} and attached(model) == {}
    with pytest.raises(ValueError, match="dynamic scheme"):
        EngineConfig(act_inputs="a8s")


def test_static_calibration_of_a_quantized_head_reads_the_final_hidden_state():
    """The LM head's scale comes from its input (the final hidden state), without the full logits."""
    model = tiny_model("llama")
    seen = []
    model.lm_head.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    ids = tiny_ids(4, 16)
    with torch.no_grad():
        model(ids)
    scales = calibrate_static(model, ["lm_head", "model.layers.0.mlp.down_proj"], [ids], ActSpec(8, static=True))
    assert torch.equal(scales["lm_head"], (seen[0].abs().amax() / 127).reshape(1))
    assert scales["model.layers.0.mlp.down_proj"] > 0
