"""quantlib.rotation: Hadamard transforms against their matrices, rotations that leave the FP model's
outputs unchanged, outlier channels spread out, and GPTQ that sees the online rotation's inputs."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from quantlib.actquant import ActSpec, fake_quant_tokens
from quantlib.activations import ActivationStore
from quantlib.adapters import UnsupportedModelError, get_adapter
from quantlib.capture import capture_block_inputs, run_block, swap_module
from quantlib.engine import EngineConfig, _Zero, quantize_block
from quantlib.gptq import GPTQConfig, accumulate_hessian
from quantlib.methods import quantize_weight
from quantlib.rotation import OnlineRotation, Rotation, attach_online, fwht, hadamard, orthogonal, rotate_model
from quantlib.spec import QuantSpec

from tiny import tiny_ids, tiny_model


def _odd_llama():
    """Sizes that are not powers of two: hidden 96 = 3 x 32, head_dim 24 = 3 x 8, intermediate 160 = 5 x 32."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def _randomize_norms(model, seed: int = 1):
    """Random-init norms are all ones, which would make folding them a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def test_fwht_is_the_walsh_hadamard_matrix_and_orthogonal():
    for p in (1, 2, 8, 64):
        h = hadamard(p)
        assert torch.allclose(h @ h.T, torch.eye(p, dtype=torch.float64), atol=1e-12)
        x = torch.randn(3, 5, p, dtype=torch.float64)
        assert torch.allclose(fwht(x), x @ h, atol=1e-12)
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(2, 12))
    with pytest.raises(ValueError, match="power of two"):
        hadamard(24)


@pytest.mark.parametrize("n", [64, 96, 160])
def test_a_rotation_applies_its_orthogonal_matrix_and_survives_json(n):
    rot = orthogonal(n, torch.Generator().manual_seed(n))
    q = rot.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    x = torch.randn(4, n)
    assert torch.allclose(rot.apply(x), (x.double() @ q).float(), atol=1e-5)
    assert Rotation.from_dict(rot.to_dict()) == rot
    bad = dict(rot.to_dict(), signs=[2] * n)
    with pytest.raises(ValueError, match="malformed rotation"):
        Rotation.from_dict(bad)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "odd"])
@pytest.mark.parametrize("mode", ["residual", "full"])
def test_rotation_leaves_the_fp_logits_unchanged(family, mode):
    model = _randomize_norms(_odd_llama() if family == "odd" else tiny_model(family))
    if family == "qwen2":  # q/k/v biases, which the rotation must leave in place
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.v_proj.bias.normal_()
    ids = tiny_ids(4, 24)
    ref = model(ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = rotate_model(get_adapter(model), mode, seed=3)
    out = model(ids).logits
    assert torch.allclose(out, ref, atol=2e-4 * float(ref.abs().max())), (out - ref).abs().max()
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.config.tie_word_embeddings
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") and "q_norm" not in name and "k_norm" not in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert bool(record["online"]) == (mode == "full") and record["seed"] == 3


def test_a_tied_model_saved_after_rotation_loads_back_to_the_same_logits(tmp_path):
    model = _randomize_norms(_odd_llama())
    ids = tiny_ids(2, 16)
    record = rotate_model(get_adapter(model), "full")
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not torch.allclose(back(ids).logits, ref, atol=1e-3)  # the online rotation is not in the weights
    assert attach_online(back, record) == 2
    assert torch.allclose(back(ids).logits, ref, atol=1e-5)


def test_rotation_spreads_an_outlier_channel_over_all_channels():
    """Post-norm activations with one huge channel: after rotation the per-token max/rms falls."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] += 1.0
        model.model.layers[0].input_layernorm.weight[5] = 8.0
    ids = tiny_ids(4, 24)

    def q_inputs(m):
        seen = []
        h = m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
        m(ids)
        h.remove()
        return seen[0]

    peak = lambda x: float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
    x0 = q_inputs(model)
    rotate_model(get_adapter(model), "residual")
    assert peak(q_inputs(model)) < peak(x0) / 2


def test_4_bit_tokens_keep_the_small_channels_once_rotated():
    """Per-token int4 of tokens with one outlier channel rounds every other channel to zero; rotated
    first (and rotated back), the small channels survive."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g)
    x[:, 7] = 60.0
    rot = orthogonal(96, torch.Generator().manual_seed(1))
    q = rot.matrix().float()
    plain = fake_quant_tokens(x, ActSpec(4))
    rotated = fake_quant_tokens(rot.apply(x), ActSpec(4)) @ q.T
    keep = torch.arange(96) != 7
    rel = lambda y: float((y - x)[:, keep].norm() / x[:, keep].norm())  # noqa: E731
    assert rel(plain) == pytest.approx(1.0)  # all of them lost
    assert rel(rotated) < 0.5


@pytest.mark.parametrize("family", ["gemma2", "opt", "mixtral"])
def test_unsupported_families_are_refused_before_any_weight_changes(family):
    model = tiny_model(family)
    adapter = get_adapter(model)  # unfuses a mixture's experts, renaming their parameters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="rotation supports llama"):
        rotate_model(adapter, "full")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown rotation mode 'hadamard'"):
        rotate_model(get_adapter(tiny_model("llama")), "hadamard")


def test_a_stand_in_sees_the_input_the_swapped_module_would():
    lin = torch.nn.Linear(8, 4)
    rot = orthogonal(8, torch.Generator().manual_seed(0))
    lin.register_forward_pre_hook(OnlineRotation(rot))
    root = torch.nn.Sequential(lin)
    stub = _Zero(4, probe=True)
    old = swap_module(root, "0", stub)
    x = torch.randn(3, 8)
    root(x)
    ref, _ = accumulate_hessian(None, 0, rot.apply(x))
    assert old is lin and torch.allclose(stub.h, ref)


def test_gptq_solves_down_proj_on_its_rotated_inputs():
    """The engine stubs down_proj while it collects down_proj's Hessian: the stand-in must see the
    online rotation, or GPTQ solves for the wrong inputs. Reference: GPTQ on the Hessian of the
    inputs down_proj really gets once the groups before it are quantized."""
    model = _randomize_norms(tiny_model("llama"))
    adapter = get_adapter(model)
    rotate_model(adapter, "full")
    ids = tiny_ids(8, 32)
    batches, calls = capture_block_inputs(adapter, ids, 4)
    spec, cfg = QuantSpec(bits=3, group_size=32), GPTQConfig()
    block = adapter.blocks[0]
    w_down = block.mlp.down_proj.weight.detach().float().clone()
    results, _, _ = quantize_block(adapter, 0, ActivationStore.from_batches(batches), calls[0], spec, cfg,
                                   EngineConfig(batch_size=4))
    # down_proj is solved last, so the block now holds the quantized q/k/v/o/gate/up it was solved after
    check = copy.deepcopy(block)
    check.mlp.down_proj.weight.data.copy_(w_down)
    h, n = None, 0

    def hook(_m, args):
        nonlocal h, n
        h, n = accumulate_hessian(h, n, args[0])

    check.mlp.down_proj.register_forward_pre_hook(hook)  # registered after the rotation: sees rotated inputs
    for x in batches:
        run_block(check, x, calls[0])
    ref = quantize_weight(w_down, h, spec, cfg)
    got = results[f"{adapter.family.layers}.0.mlp.down_proj"]
    assert torch.equal(got.qweight, ref.qweight)
