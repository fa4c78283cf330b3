"""flows.commands: the protocol's data draw and quantization of a loaded model from a typed method
config (method names are parsed in flows.methods; see test_methods.py)."""
from __future__ import annotations

import json

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


def test_protocol_data_mixes_calibration_texts_in_equal_shares(tmp_path, words):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"w{i}" for i in range(1000, 1400)))
    data = protocol_data(WordTokenizer(), f"{words}+{other}", words, n=5, seqlen=8, seed=1, window=16, n_windows=3)
    assert torch.equal(data.calib[:3], sample_calibration(torch.arange(200), 3, 8, seed=1))
    assert torch.equal(data.calib[3:], sample_calibration(torch.arange(1000, 1200), 2, 8, seed=1))
    assert torch.equal(data.windows, torch.arange(200, 248).reshape(3, 16))  # the text named for evaluation
    with pytest.raises(ValueError, match="name the evaluation text"):
        protocol_data(WordTokenizer(), f"{words}+{other}", None, n=4, seqlen=8)


def test_prepare_data_records_where_each_share_of_a_mixed_calibration_came_from(tmp_path, words):
    import json

    from tasks.inputs import prepare_data_task

    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"w{i}" for i in range(1000, 1400)))
    settings = {"calib_source": f"{words}+{other}", "calib_split": "first_half", "n_samples": 3, "seqlen": 8,
                "seed": 0, "eval_sources": [words], "eval_split": "second_half", "eval_window": 16, "eval_windows": 2}
    tok = tmp_path / "tok"
    _word_tokenizer_folder(tok)
    record = prepare_data_task.fn(str(tok), "sha", settings, {}, None, str(tmp_path / "cache"))
    calib = json.loads((tmp_path / record["path"] / "tokens.json").read_text())["calib"]
    assert [(p["source"], p["n"]) for p in calib["parts"]] == [(words, 2), (str(other), 1)]
    assert "starts" not in calib and all(len(p["starts"]) == p["n"] for p in calib["parts"])


def _word_tokenizer_folder(folder) -> None:
    """A folder with a fast tokenizer whose ids are the `wN` words' N (vocab w0..w1999) and a config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(2000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    T.LlamaConfig(vocab_size=2000).save_pretrained(folder)  # a model folder's config, for load_tokenizer


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


def test_ptq_eval_scores_a_release_through_its_loader_in_the_dtype_asked(tmp_path, capsys):
    """`ptq eval --model <release folder> --dtype bfloat16`: the release's own loader (QuantLinear
    modules of a GPTQ v2 release), in bf16, gives the printed perplexity; a plain HF folder still
    loads as a model."""
    import re

    from flows.cli import main
    from quantlib.adapters import get_adapter
    from quantlib.data import eval_windows
    from quantlib.perplexity import perplexity
    from tasks.io import write_manifest
    from tasks.release import load_release, write_release_files
    from tasks.textdata import tokenize_text

    from tests.quantlib.tiny import tiny_model
    from tests.tasks.test_gguf_release import _char_tokenizer

    model, tok = tiny_model("llama"), _char_tokenizer(128)
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    adapter = get_adapter(model)
    qweights = {f"model.layers.{i}.{n}": rtn_quantize(adapter.get_weight(m).detach(), QuantSpec(4, 32))
                for i, b in enumerate(adapter.blocks) for n, m in adapter.linears(b).items()}
    write_release_files(tmp_path / "rel", tmp_path / "src", qweights, {"scheme": "w4g32", "method": "rtn"},
                        fmt="gptq_v2")
    write_manifest(tmp_path / "rel")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    printed = {}
    for dtype in ("bfloat16", "float32"):
        assert main(["eval", "--model", str(tmp_path / "rel"), "--data", str(text), "--split", "all",
                     "--window", "64", "--windows", "3", "--dtype", dtype]) == 0
        printed[dtype] = float(re.findall(r"\d+\.\d+", capsys.readouterr().out.splitlines()[-1])[-1])
    windows = eval_windows(tokenize_text(text.read_text(), tok), 64, 3)
    for dtype, value in printed.items():
        want = perplexity(load_release(tmp_path / "rel", dtype=getattr(torch, dtype)), windows, batch_size=4)
        assert value == pytest.approx(want, rel=1e-3), dtype
    from flows.cli_impl import _eval_model
    from quantlib.qlinear import QuantLinear

    loaded, _ = _eval_model(str(tmp_path / "rel"), torch.bfloat16)
    assert isinstance(loaded.get_submodule("model.layers.0.mlp.down_proj"), QuantLinear)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    write_manifest(tmp_path / "src")
    assert main(["eval", "--model", str(tmp_path / "src"), "--data", str(text), "--split", "all",
                 "--window", "64", "--windows", "3"]) == 0


def test_ptq_quantize_with_rotation_writes_what_ptq_eval_loads_back(tmp_path):
    """`ptq quantize --rotate full`: the output's dense weights are rotated and its quantization.json
    records the online rotation; `ptq eval`'s loader re-attaches it (and the activation quantizers),
    so the loaded 8-bit model matches the FP source, which the bare dense folder does not."""
    from flows.cli import main
    from flows.cli_impl import _eval_model
    from quantlib.actquant import attached, input_scales
    from quantlib.rotation import OnlineRotation

    from pipeline_projects import char_llama_source

    from tests.quantlib.tiny import tiny_ids

    model, text = char_llama_source(tmp_path)
    common = ["quantize", "--model", str(tmp_path / "src"), "--calib", str(text), "--n-samples", "4", "--seqlen", "32",
              "--method", "rtn", "--bits", "8", "--per-channel", "--rotate", "full"]
    assert main([*common, "--out", str(tmp_path / "w8")]) == 0
    assert main([*common, "--activations", "a8", "--out", str(tmp_path / "w8a8")]) == 0
    ids = tiny_ids(2, 16)
    ref = model(ids).logits
    loaded, _ = _eval_model(str(tmp_path / "w8"), torch.float32)
    downs = [b.mlp.down_proj for b in loaded.model.layers]
    assert all(any(isinstance(h, OnlineRotation) for h in d._forward_pre_hooks.values()) for d in downs)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref, atol=0.02 * float(ref.abs().max()))
        bare = T.AutoModelForCausalLM.from_pretrained(tmp_path / "w8")
        assert not torch.allclose(bare(ids).logits, ref, atol=0.02 * float(ref.abs().max()))
    a8, _ = _eval_model(str(tmp_path / "w8a8"), torch.float32)
    assert set(attached(a8).values()) == {"a8"} and len(attached(a8)) == 7 * len(downs)
    # static scales: calibrated on the calibration ids, recorded, and re-attached exactly by `ptq eval`
    assert main([*common, "--activations", "a8s", "--out", str(tmp_path / "w8a8s")]) == 0
    recorded = json.loads((tmp_path / "w8a8s" / "quantization.json").read_text())["input_scales"]
    a8s, _ = _eval_model(str(tmp_path / "w8a8s"), torch.float32)
    assert set(attached(a8s).values()) == {"a8s"} and len(recorded) == 7 * len(downs)
    assert {n: float(v) for n, v in input_scales(a8s).items()} == recorded and min(recorded.values()) > 0


def test_ptq_quantize_mixed_writes_each_linear_on_its_planned_grid(tmp_path):
    """`ptq quantize --mixed-from`: quantization.json records the plan, and every Linear's stored codes
    (quantized.safetensors, self-describing) carry the scheme the plan gave it, within the size."""
    from safetensors.torch import load_file

    from flows.cli import main
    from quantlib.qweight import QuantizedWeight, bits_per_weight

    from pipeline_projects import char_llama_source

    _, text = char_llama_source(tmp_path)
    assert main(["quantize", "--model", str(tmp_path / "src"), "--calib", str(text), "--n-samples", "4", "--seqlen", "32",
                 "--method", "gptq", "--bits", "3", "--group-size", "32", "--mixed-from", "w2g32,w4g32",
                 "--mixed-samples", "2", "--out", str(tmp_path / "mix")]) == 0
    plan = json.loads((tmp_path / "mix" / "quantization.json").read_text())["mixed"]
    assert len(plan) == 3 * 7 and set(plan.values()) == {"w2g32", "w4g32"}
    tensors = load_file(tmp_path / "mix" / "quantized.safetensors")
    stored = {p: QuantizedWeight.from_state_dict(tensors, p) for p in plan}
    assert {p: qw.spec.name for p, qw in stored.items()} == plan
    assert bits_per_weight(stored) <= 3 + 19 / 32


def test_ptq_quantize_recon_with_qat_writes_codes_the_gguf_bench_reads(tmp_path):
    """`ptq quantize --method recon-...+qat`: the run the GGUF bench's --codes is built for. It once
    crashed after 40 minutes of work, at the end, reading Linear errors off the windows' stats; now
    quantization.json keeps each window's losses, and the folder's codes are the dense weights it
    wrote."""
    from safetensors.torch import load_file

    from flows.bench_gguf import read_codes
    from flows.cli import main

    from pipeline_projects import char_llama_source

    _, text = char_llama_source(tmp_path)
    assert main(["quantize", "--model", str(tmp_path / "src"), "--calib", str(text), "--n-samples", "8", "--seqlen", "32",
                 "--method", "recon-k1-rtn-i2+qat2", "--bits", "2", "--group-size", "32", "--qat-patience", "0",
                 "--out", str(tmp_path / "q")]) == 0
    info = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert [w["blocks"] for w in info["windows"]] == [[0], [1], [2]] and "layer_errors" not in info
    assert all(w["loss_final"] <= w["loss_init"] for w in info["windows"])
    codes, given = read_codes(tmp_path / "q", str(tmp_path / "src"), ("w2g32",))
    assert given["method"] == "recon-k1-rtn-i2+qat2" and given["qat_config"]["steps"] == 2
    dense = T.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).state_dict()
    stored = load_file(tmp_path / "q" / "quantized.safetensors")
    for name, qw in codes.items():
        assert torch.equal(qw.dequantize(), dense[name + ".weight"]), name
    assert set(codes) == {n.rsplit(".", 1)[0] for n in stored if n.endswith(".qweight")}
