import pytest
import torch
import transformers as T

from quantlib.adapters import UnsupportedModelError, get_adapter
from quantlib.capture import capture_block_inputs, run_block

from tiny import FAMILIES, tiny_ids, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_parts_and_geometry(family):
    model = tiny_model(family)
    a = get_adapter(model)
    assert len(a.blocks) == model.config.num_hidden_layers
    assert a.embed.weight.shape[0] == 128
    g = a.geometry
    assert g.hidden_size == 64 and g.num_heads == 4
    assert g.num_kv_heads in (2, 4)
    assert g.rope == (family not in ("opt", "gpt2"))
    for name, m in a.linears(a.blocks[0]).items():
        w = a.get_weight(m)
        assert w.ndim == 2 and w.shape[1] in (64, 128) or name.endswith(("down_proj", "fc2", "mlp.c_proj")), name


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
