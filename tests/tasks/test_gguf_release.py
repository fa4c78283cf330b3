"""GGUF releases (tasks.gguf_release): written from a tiny model's codes, read back by transformers'
GGUF loader (a reader that is not ours) to exactly the weights quantlib.gguf promises, with the
metadata, tokenizer and tied head a llama.cpp reader needs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quantlib"))
from tiny import tiny_config, tiny_ids, tiny_model  # noqa: E402

from quantlib.adapters import get_adapter  # noqa: E402
from quantlib.gguf import gguf_weight  # noqa: E402
from quantlib.rtn import rtn_quantize  # noqa: E402
from quantlib.spec import QuantSpec, SpecMap, spec_for  # noqa: E402
from tasks.gguf_release import GGUF_FILE, load_gguf_release, write_gguf_release  # noqa: E402
from tasks.release import load_release, write_release_files  # noqa: E402
from tasks.sources import load_tokenizer  # noqa: E402
from tests.flows.pipeline_projects import build_tiny_source  # noqa: E402


def _char_tokenizer(n: int):
    """A byte-level BPE tokenizer of n single-character tokens (a tiny model's whole vocabulary)."""
    from gguf.vocab import bytes_to_unicode
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(bytes_to_unicode().values())[:n]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=chars[0], eos_token=chars[1])


def _codes(model, spec: QuantSpec, head: bool = False) -> dict:
    adapter, qweights = get_adapter(model), {}
    for i, block in enumerate(adapter.blocks):
        for name, module in adapter.linears(block).items():
            path = f"{adapter.family.layers}.{i}.{name}"
            qweights[path] = rtn_quantize(adapter.get_weight(module).detach(), spec_for(spec, path))
    if head:
        qweights["lm_head"] = rtn_quantize(model.lm_head.weight.detach(), spec)
    return qweights


def _source(tmp_path: Path, family: str, tied: bool = False) -> tuple[Path, torch.nn.Module]:
    if family == "llama":  # the pipeline tests' model: a trained 1000-token BPE with merges
        src = build_tiny_source(tmp_path / "src")
        return src, AutoModelForCausalLM.from_pretrained(src).eval()
    config = tiny_config(family)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "src")
    _char_tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "src")
    return tmp_path / "src", model


def _release(tmp_path, family, spec, head=False):
    src, model = _source(tmp_path, family, tied=head)
    qweights = _codes(model, spec, head)
    scheme = spec.name if isinstance(spec, QuantSpec) else "mixed"
    write_release_files(tmp_path / "rel", src, qweights, {"scheme": scheme, "method": "rtn"}, fmt="gguf")
    for name, qw in qweights.items():  # the model the GGUF file must compute
        get_adapter(model).set_weight(model.get_submodule(name), gguf_weight(qw))
    return tmp_path / "rel", src, model, qweights


# mixed precision (quantlib.mixed): GGUF types are per tensor, Q4_1 / Q8_0 / Q4_0 side by side
MIXED = SpecMap(QuantSpec(4, 32), tuple(sorted(
    [(f"model.layers.0.self_attn.{n}_proj", QuantSpec(8, None, sym=True)) for n in "qkv"] +
    [("model.layers.1.mlp.down_proj", QuantSpec(4, 64, sym=True))])))


@pytest.mark.parametrize("family,spec", [("llama", QuantSpec(4, 32)), ("qwen3", QuantSpec(4, 64, sym=True)),
                                         ("qwen2", QuantSpec(8, None, sym=True)), ("llama", MIXED)])
def test_transformers_reads_back_exactly_our_weights(tmp_path, family, spec):
    rel, _, model, qweights = _release(tmp_path, family, spec)
    back = load_release(rel, verify=False)  # the evaluate stage's path: transformers' GGUF loader
    adapter = get_adapter(back)
    for name, qw in qweights.items():  # Q/K rows un-permuted by the reader: llama.cpp's layout was right
        assert torch.equal(adapter.get_weight(back.get_submodule(name)), gguf_weight(qw)), name
    ids = tiny_ids(2, 24, vocab=model.config.vocab_size)
    with torch.no_grad():
        a, b = model(ids).logits, back(ids).logits
    assert (a - b).abs().max() <= 2e-3 * a.abs().max()  # F16 embeddings and norms in F32: one fp16 rounding
    info = json.loads((rel / "quantization.json").read_text())
    assert info["format"] == "gguf" and set(info["gguf_types"]) == set(qweights)
    if spec is MIXED:
        assert {info["gguf_types"][p] for p in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                                "model.layers.1.mlp.up_proj")} == {"Q8_0", "Q4_0", "Q4_1"}


def test_the_gguf_metadata_alone_rebuilds_the_architecture(tmp_path):
    # no config passed: heads, kv heads, sizes, rope theta and eps come from what we wrote into the file
    rel, _, model, _ = _release(tmp_path, "llama", QuantSpec(3, 32))
    pure = AutoModelForCausalLM.from_pretrained(rel, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    c, g = model.config, pure.config
    assert (g.num_attention_heads, g.num_key_value_heads, g.hidden_size, g.intermediate_size, g.num_hidden_layers) == \
        (c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size, c.num_hidden_layers)
    ids = tiny_ids(2, 24, vocab=c.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(pure(ids).logits, load_gguf_release(rel)(ids).logits)


def test_the_gguf_tokenizer_encodes_like_the_source(tmp_path):
    rel, src, _, _ = _release(tmp_path, "llama", QuantSpec(4, 32))
    text = "The Tower of London, 1066: its keep was built by William the Conqueror."
    ours = AutoTokenizer.from_pretrained(src)
    assert not (rel / "tokenizer.json").exists()  # the tokenizer is in the GGUF file, nowhere else
    for theirs in (AutoTokenizer.from_pretrained(rel, gguf_file=GGUF_FILE), load_tokenizer(rel, verify=False)):
        assert theirs(text)["input_ids"] == ours(text)["input_ids"]
        assert theirs.eos_token_id == ours.eos_token_id


def test_a_quantized_tied_head_is_written_untied(tmp_path):
    rel, src, _, qweights = _release(tmp_path, "qwen3", QuantSpec(4, 32), head=True)
    source = AutoModelForCausalLM.from_pretrained(src)
    assert source.config.tie_word_embeddings
    back = load_release(rel, verify=False)
    assert not back.config.tie_word_embeddings
    assert torch.equal(back.lm_head.weight, gguf_weight(qweights["lm_head"]))
    assert torch.equal(back.model.embed_tokens.weight, source.model.embed_tokens.weight.half().float())
    # and transformers' own reading of the file alone agrees: an output tensor, so no tying
    pure = AutoModelForCausalLM.from_pretrained(rel, gguf_file=GGUF_FILE, config=back.config)
    assert torch.equal(pure.lm_head.weight, back.lm_head.weight)


@pytest.mark.parametrize("family,message", [("gemma3_text", "supports the"), ("mistral", "no sliding window")])
def test_families_llama_cpp_would_compute_otherwise_are_refused(tmp_path, family, message):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        write_gguf_release(tmp_path / "rel", tmp_path / "src", {}, {}, torch.float16)
    assert not (tmp_path / "rel").exists()


def test_a_bf16_source_keeps_its_matrices_in_bf16(tmp_path):
    import gguf

    model = tiny_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    _char_tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "src")
    qweights = _codes(model.float(), QuantSpec(4, 32))
    write_release_files(tmp_path / "rel", tmp_path / "src", qweights, {"scheme": "w4g32", "method": "rtn"}, fmt="gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "rel" / GGUF_FILE)).tensors}
    assert types["token_embd.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"
    back = load_release(tmp_path / "rel", verify=False)
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    assert torch.equal(back.model.embed_tokens.weight, source.model.embed_tokens.weight)  # bf16 -> fp32, exact


@pytest.mark.parametrize("kind,spec", [("Q4_K", QuantSpec(4, 32)), ("Q3_K", QuantSpec(3, 64))])  # held; fitted
def test_a_k_quant_release_reads_back_as_the_fit_and_records_its_error(tmp_path, kind, spec):
    from quantlib.gguf_k import k_fit, k_weight

    config = tiny_config("qwen2")  # 256-wide inputs (mlp 512): every Linear is whole super-blocks
    config.hidden_size, config.intermediate_size = 256, 512
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "src")
    _char_tokenizer(config.vocab_size).save_pretrained(tmp_path / "src")
    qweights = _codes(model, spec)
    write_release_files(tmp_path / "rel", tmp_path / "src", qweights, {"scheme": spec.name, "method": "rtn"},
                        fmt="gguf", gguf_type=kind)
    back = load_release(tmp_path / "rel", verify=False)
    adapter = get_adapter(back)
    info = json.loads((tmp_path / "rel" / "quantization.json").read_text())
    assert info["gguf_type"] == kind and set(info["gguf_types"].values()) == {kind}
    for name, qw in qweights.items():
        fitted = k_weight(k_fit(qw, kind))
        assert torch.equal(adapter.get_weight(back.get_submodule(name)), fitted), name
        ours = qw.dequantize()
        assert info["gguf_error"][name] == pytest.approx(((fitted - ours).norm() / ours.norm()).item(), rel=1e-3)
        assert 0 < info["gguf_error"][name] < 0.2  # Q3_K of asymmetric codes is the loosest fit
    exact = tmp_path / "exact"
    write_release_files(exact, tmp_path / "src", qweights, {"scheme": spec.name, "method": "rtn"}, fmt="gguf")
    assert (tmp_path / "rel" / GGUF_FILE).stat().st_size < (exact / GGUF_FILE).stat().st_size


_GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_SPLIT = {"type": "Split", "behavior": "Isolated", "invert": False,
          "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                               r"|\s*[\r\n]+|\s+(?!\S)|\s+"}}


@pytest.mark.parametrize("pre,name", [
    (_GPT2, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [_SPLIT, dict(_GPT2, use_regex=False)]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [
        dict(_SPLIT, pattern={"Regex": _SPLIT["pattern"]["Regex"].replace(r"\p{N}{1,3}", r"\p{N}")}),
        dict(_GPT2, use_regex=False)]}, "qwen2"),
    ({"type": "Whitespace"}, "default"),
], ids=["gpt-2", "smollm", "llama-bpe", "qwen2", "unknown"])
def test_the_pre_tokenizer_llama_cpp_is_told_is_the_one_the_tokenizer_has(tmp_path, pre, name):
    from tasks.gguf_release import _pre_tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre}))
    assert _pre_tokenizer(tmp_path) == name


def test_the_release_file_names_its_pre_tokenizer(tmp_path):
    import gguf

    rel, src, _, _ = _release(tmp_path, "llama", QuantSpec(4, 32))
    pre = json.loads((src / "tokenizer.json").read_text())["pre_tokenizer"]
    field = gguf.GGUFReader(str(rel / GGUF_FILE)).fields["tokenizer.ggml.pre"]
    assert pre["type"] == "ByteLevel" and field.contents() == "gpt-2"
