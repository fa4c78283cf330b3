"""flows.commands: the protocol's data draw and quantization of a loaded model from a typed method
config (method names are parsed in flows.methods; see test_methods.py)."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from flows.commands import protocol_data, quantize_loaded
from flows.methods import parse_method
from quantlib.data import sample_calibration
from quantlib.engine import EngineConfig
from quantlib.rtn import RTNConfig, rtn_quantize
from quantlib.spec import QuantSpec


class WordTokenizer:
    """`w17` -> 17: whole-text tokenization with visible ids."""

    def __call__(self, text: str, **kw) -> dict:
        assert kw.get("add_special_tokens") is False  # the protocol tokenizes without BOS
        return {"input_ids": [int(w[1:]) for w in text.split()]}


@pytest.fixture
def words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(" ".join(f"w{i}" for i in range(400)))
    return str(path)


def test_protocol_data_calibrates_on_the_first_half_and_evaluates_on_the_second(words):
    data = protocol_data(WordTokenizer(), words, None, n=4, seqlen=8, seed=0, window=16, n_windows=3)
    assert torch.equal(data.calib, sample_calibration(torch.arange(200), 4, 8, seed=0))
    assert torch.equal(data.windows, torch.arange(200, 248).reshape(3, 16))  # first windows, no overlap


def test_protocol_data_rejects_a_short_pool(words):
    with pytest.raises(ValueError, match="fewer than seqlen=300"):
        protocol_data(WordTokenizer(), words, None, n=1, seqlen=300)


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def test_quantize_loaded_takes_a_typed_config():
    model = _tiny_llama()
    linears = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    spec = QuantSpec(bits=4, group_size=32)
    results, stats, seconds = quantize_loaded(model, None, spec, parse_method("rtn").base, EngineConfig())
    assert set(results) == set(linears) and len(stats) == 2 and seconds >= 0
    for name, w in linears.items():
        expect = rtn_quantize(w, spec, RTNConfig()).dequantize()
        assert torch.equal(results[name].dequantize(), expect)
        assert torch.equal(model.get_submodule(name).weight.detach().float(), expect)


def test_quantize_loaded_refuses_a_method_name():
    with pytest.raises(ValueError, match="no quantization method registered for str"):
        quantize_loaded(_tiny_llama(), None, QuantSpec(bits=4, group_size=32), "rtn", EngineConfig())
