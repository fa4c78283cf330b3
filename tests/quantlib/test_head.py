"""The LM head as a quantization target: its inputs, its solve, untying it from the embeddings."""
import pytest
import torch
import transformers as T

from quantlib.adapters import get_adapter
from quantlib.boa import BoAConfig
from quantlib.engine import EngineConfig, quantize_model
from quantlib.gptq import GPTQConfig, accumulate_hessian
from quantlib.head import head_inputs, head_method, solve_head
from quantlib.logits import final_hidden
from quantlib.methods import hessian_error
from quantlib.recon import ReconConfig
from quantlib.rtn import RTNConfig
from quantlib.spec import QuantSpec

from tiny import FAMILIES, tiny_config, tiny_ids, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_head_inputs_from_the_last_block_are_what_the_head_reads(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    seen = []
    adapter.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    ids = tiny_ids(2, 12)
    with torch.no_grad():
        want = final_hidden(model, ids)
        got = head_inputs(adapter, seen[-1])
    torch.testing.assert_close(got, want)


def _tied_llama():
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_quantize_model_with_head_unties_it_and_keeps_the_embeddings():
    model = _tied_llama()
    embed = model.model.embed_tokens.weight.detach().clone()
    spec = QuantSpec(3, 32)
    results, _ = quantize_model(get_adapter(model), tiny_ids(8, 32), spec, GPTQConfig(), EngineConfig(batch_size=4),
                                head=True)
    assert "lm_head" in results and results["lm_head"].shape == (128, 64)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the input embeddings stay full precision
    assert torch.equal(model.lm_head.weight, results["lm_head"].dequantize())
    assert not torch.equal(model.lm_head.weight, embed)


def test_gptq_head_beats_rtn_head_on_its_hessian():
    model = tiny_model("qwen2")
    adapter = get_adapter(model)
    ids = tiny_ids(8, 32)
    seen = []
    adapter.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(ids)
    spec = QuantSpec(2, 32)
    gptq, err = solve_head(adapter, seen, spec, GPTQConfig())
    rtn, none = solve_head(adapter, seen, spec, RTNConfig())
    assert none is None
    h, _ = accumulate_hessian(None, 0, head_inputs(adapter, seen[0]).detach())
    w = model.lm_head.weight.detach()
    assert err == pytest.approx(hessian_error(w, gptq.dequantize(), h), rel=1e-4)
    assert err < 0.9 * hessian_error(w, rtn.dequantize(), h)
    assert torch.equal(model.lm_head.weight, w)  # solve_head changes nothing in the model


def test_head_method_follows_the_job():
    assert isinstance(head_method(ReconConfig(init="boa")), BoAConfig)
    assert head_method(ReconConfig(init="gptq", init_damp=0.1)) == GPTQConfig(damp=0.1)
    # an RTN-started recon job solves its head by GPTQ: the head is in no window to refine its codes
    assert head_method(ReconConfig(init="rtn", init_damp=0.05)) == GPTQConfig(damp=0.05)
    gptq = GPTQConfig(damp=0.05)
    assert head_method(gptq) is gptq
