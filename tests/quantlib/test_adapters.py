import pytest
import torch
import transformers as T
from transformers.pytorch_utils import Conv1D

from quantlib.adapters import UnsupportedModelError, get_adapter
from quantlib.capture import capture_block_inputs, run_block

from tiny import FAMILIES, MOE_FAMILIES, tiny_ids, tiny_model

DENSE = [f for f in FAMILIES if f not in MOE_FAMILIES]  # MoE adapters: tests/quantlib/test_moe.py


@pytest.mark.parametrize("family", DENSE)
def test_adapter_finds_parts_and_geometry(family):
    model = tiny_model(family)
    a = get_adapter(model)
    assert len(a.blocks) == model.config.num_hidden_layers
    assert a.embed.weight.shape[0] == 128
    g = a.geometry
    mha = family in ("opt", "gpt2")  # tiny.py gives the others 2 KV heads (GQA)
    assert g.hidden_size == 64 and g.num_heads == 4 and g.head_dim == 16
    assert g.num_kv_heads == (4 if mha else 2)
    assert g.rope == (not mha)
    # (out, in) of every Linear in tiny.py's configs: hidden 64, q 4 x 16, kv 2 x 16 (MHA: 4 x 16),
    # MLP 128 (GPT-2: n_inner unset, so 4 x 64)
    d, q, kv, ffn = 64, 64, 64 if mha else 32, 256 if family == "gpt2" else 128
    expected = {
        "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
        "self_attn.qkv_proj": (q + 2 * kv, d), "attn.c_attn": (q + 2 * kv, d),
        "self_attn.o_proj": (d, q), "self_attn.out_proj": (d, q), "attn.c_proj": (d, q),
        "mlp.gate_proj": (ffn, d), "mlp.up_proj": (ffn, d), "mlp.gate_up_proj": (2 * ffn, d),
        "fc1": (ffn, d), "mlp.c_fc": (ffn, d),
        "mlp.down_proj": (d, ffn), "fc2": (d, ffn), "mlp.c_proj": (d, ffn),
    }
    linears = a.linears(a.blocks[0])
    found = {n for n, m in a.blocks[0].named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    assert set(linears) == found  # every Linear of the block, nothing else
    for name, m in linears.items():
        assert tuple(a.get_weight(m).shape) == expected[name], name


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_block_calls_reproduce_the_model(family):
    """Running the blocks one by one on captured inputs/calls equals the model's own forward,
    including sliding-window and per-layer rotary differences, with batching broadcast."""
    model = tiny_model(family)
    a = get_adapter(model)
    ids = tiny_ids(5, 24)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
        xs, calls = capture_block_inputs(a, ids, batch_size=2)
        x = torch.cat(xs)
        torch.testing.assert_close(x, ref[0])
        for i, block in enumerate(a.blocks):
            x = torch.cat([run_block(block, xb, calls[i]) for xb in x.split(3)])
            if i < len(a.blocks) - 1:
                torch.testing.assert_close(x, ref[i + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.norm(x), ref[-1], atol=1e-5, rtol=1e-5)
    assert len(list(a.blocks)) == model.config.num_hidden_layers  # recorders removed


def test_gpt2_conv1d_weights_are_transposed_back():
    model = tiny_model("gpt2")
    a = get_adapter(model)
    c_fc = a.blocks[0].get_submodule("mlp.c_fc")
    assert a.get_weight(c_fc).shape == (256, 64)  # (out, in) although Conv1D stores (in, out)
    w = torch.randn(256, 64)
    a.set_weight(c_fc, w)
    x = torch.randn(3, 64)
    torch.testing.assert_close(c_fc(x), x @ w.t() + c_fc.bias)


def test_unsupported_architecture_names_supported_list():
    model = T.BertForMaskedLM(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match=r"unsupported architecture 'bert'.*llama"):
        get_adapter(model)
