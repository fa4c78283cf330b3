"""Packed releases (GPTQ, compressed-tensors): written from a tiny model's quantized weights, read
back by our loader and by independent readers, which must recover the dense weights bit for bit.

Independent readers: compressed-tensors' own decompressor and transformers' compressed-tensors
loader (CPU) when compressed-tensors is installed; for GPTQ, GPTQModel's own loader when an
interpreter with gptqmodel is at hand (`make gptqmodel-env`, or $PTQ_GPTQMODEL_PYTHON: it pins its own
torch and transformers, so it lives in its own virtual environment), and always a transcription of its
torch `dequantize_weight` (gptq_v2, no zero offset) as a second check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quantlib"))
from tiny import tiny_ids, tiny_model  # noqa: E402

from quantlib.adapters import get_adapter  # noqa: E402
from quantlib.int8linear import Int8Linear  # noqa: E402
from quantlib.qlinear import QuantLinear  # noqa: E402
from quantlib.qweight import QuantizedWeight  # noqa: E402
from quantlib.rtn import rtn_quantize  # noqa: E402
from quantlib.spec import QuantSpec, SpecMap, spec_for  # noqa: E402
from tasks.release import load_release, write_release_files  # noqa: E402
from tasks.release_formats import load_packed_release, write_packed_release  # noqa: E402

FORMATS = ("gptq", "gptq_v2", "compressed-tensors")


# a mixed-precision plan as quantlib.mixed makes them: Linears sharing an input share a scheme
MIXED = SpecMap(QuantSpec(4, 32), tuple(sorted(
    [(f"model.layers.0.self_attn.{n}_proj", QuantSpec(2, 32)) for n in "qkv"] +
    [(f"model.layers.1.mlp.{n}_proj", QuantSpec(3, 64)) for n in ("gate", "up")] +
    [("model.layers.2.mlp.down_proj", QuantSpec(8, None, sym=True))])))


def _setup(tmp_path: Path, family: str, spec: QuantSpec | SpecMap):
    """(source dir, fp32 fake-quant model, qweights) for a tiny model saved to tmp_path/src."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    adapter = get_adapter(model)
    qweights = {}
    for i, block in enumerate(adapter.blocks):
        for name, module in adapter.linears(block).items():
            path = f"{adapter.family.layers}.{i}.{name}"
            qweights[path] = rtn_quantize(adapter.get_weight(module).detach(), spec_for(spec, path))
    for name, qw in qweights.items():  # the fake-quant model the evaluate stage scored before packing
        adapter.set_weight(model.get_submodule(name), qw.dequantize())
    return tmp_path / "src", model, qweights


def _write(tmp_path, family, spec, fmt):
    src, fake, qweights = _setup(tmp_path, family, spec)
    scheme = spec.name if isinstance(spec, QuantSpec) else "mixed"
    write_packed_release(tmp_path / "rel", src, qweights, {"scheme": scheme}, fmt)
    return tmp_path / "rel", fake, qweights


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family,spec", [("llama", QuantSpec(4, 32)), ("qwen2", QuantSpec(3, None)),
                                         ("gpt2", QuantSpec(4, 16, sym=True)), ("llama", QuantSpec(2, 64))])
def test_packed_release_reproduces_fake_quant_logits(tmp_path, fmt, family, spec):
    rel, fake, qweights = _write(tmp_path, family, spec, fmt)
    model = load_packed_release(rel, verify=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(qweights)
    ids = tiny_ids(2, 24)
    a, b = _logits(fake, ids), _logits(model, ids)
    # fp16 scales and fp16 embeddings/norms: a few fp16 roundings, relative error ~1e-3
    assert (a - b).abs().max() <= 2e-3 * a.abs().max(), (a - b).abs().max()
    # and exactly the fake-quant model once its scales and other tensors are rounded to fp16
    exact = tiny_model(family)
    adapter = get_adapter(exact)
    with torch.no_grad():
        for p in exact.parameters():
            p.copy_(p.half().float())
        for name, qw in qweights.items():
            w = qw.scale.half().float()[:, qw.g_idx.long()] * (qw.qweight.float() - qw.zero[:, qw.g_idx.long()])
            adapter.set_weight(exact.get_submodule(name), w)
    torch.testing.assert_close(b, _logits(exact, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_precision_release_declares_each_scheme_and_reproduces_the_model(tmp_path, fmt):
    """A release of a mixed plan: the config gives every module its own scheme (GPTQ `dynamic`
    patterns, which also match the fused qkv_proj / gate_up_proj names vLLM looks up; one
    compressed-tensors config group per scheme), and our loader, reading only the config, rebuilds
    exactly the fake-quant model."""
    from tasks.release_formats import module_spec, release_format

    rel, fake, qweights = _write(tmp_path, "llama", MIXED, fmt)
    qconfig = json.loads((rel / "config.json").read_text())["quantization_config"]
    fmt_ = release_format({"format": fmt}, qconfig)
    for name, qw in qweights.items():
        assert module_spec(qconfig, fmt_, name) == (qw.spec.bits, qw.spec.group_size), name
    if fmt != "compressed-tensors":
        assert (qconfig["bits"], qconfig["group_size"]) == (4, 32)  # the base: most modules
        assert module_spec(qconfig, fmt_, "model.layers.0.self_attn.qkv_proj") == (2, 32)
        assert module_spec(qconfig, fmt_, "model.layers.1.mlp.gate_up_proj") == (3, 64)
        assert module_spec(qconfig, fmt_, "model.layers.1.self_attn.qkv_proj") == (4, 32)
    else:
        assert len(qconfig["config_groups"]) == 4
    model = load_packed_release(rel, verify=False)
    ids = tiny_ids(2, 24)
    a, b = _logits(fake, ids), _logits(model, ids)
    assert (a - b).abs().max() <= 2e-3 * a.abs().max(), (a - b).abs().max()


def test_gptq_dynamic_patterns_reach_a_top_level_head_and_nothing_else():
    """A module without a parent (lm_head) gets a pattern that matches it, not `^\\.lm_head$`; a
    block's pattern does not leak to another block's or another module's names."""
    from quantlib.packing import PackFormat
    from tasks.release_formats import _gptq_dynamic, module_spec

    base, head, mlp = QuantSpec(4, 32), QuantSpec(8, None, sym=True), QuantSpec(2, 32)
    groups = [(base, ["model.layers.0.self_attn.q_proj"]), (head, ["lm_head"]),
              (mlp, ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"])]
    config = {"bits": 4, "group_size": 32, "dynamic": _gptq_dynamic(groups)}
    spec = lambda name: module_spec(config, PackFormat.GPTQ_V2, name)  # noqa: E731
    assert spec("lm_head") == (8, None) and spec("model.lm_head") == (4, 32)
    assert spec("model.layers.1.mlp.gate_up_proj") == (2, 32) == spec("model.layers.1.mlp.up_proj")
    assert spec("model.layers.11.mlp.up_proj") == (4, 32) == spec("model.layers.1.mlp.down_proj")


@pytest.mark.parametrize("fmt", FORMATS)
def test_release_files_and_dtypes(tmp_path, fmt):
    rel, _, qweights = _write(tmp_path, "qwen2", QuantSpec(4, 32), fmt)
    tensors = load_file(str(rel / "model.safetensors"))
    name = next(iter(qweights))
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in qweights for k in tensors)
    floats = {k: v.dtype for k, v in tensors.items() if v.is_floating_point()}
    assert set(floats.values()) == {torch.float16}  # scales, embeddings, norms, biases
    info = json.loads((rel / "quantization.json").read_text())
    assert info["format"] == fmt and info["modules"] == sorted(qweights)
    config = json.loads((rel / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16"
    if fmt.startswith("gptq"):
        assert {f"{name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")} <= set(tensors)
        assert (rel / "quantize_config.json").is_file()
    else:
        assert {f"{name}.{k}" for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")} <= set(tensors)
        assert tensors[f"{name}.weight_shape"].dtype == torch.int64


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bfloat16_source_gives_a_bfloat16_release_that_loads(tmp_path, fmt):
    """fp16 would overflow where bf16 models keep large values: a bf16 source keeps bf16 for its
    unquantized tensors (GPTQ scales stay fp16, what its kernels read) and the release loads back."""
    model = tiny_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    adapter = get_adapter(model)
    qweights = {f"{adapter.family.layers}.{i}.{n}": rtn_quantize(adapter.get_weight(m).detach().float(), QuantSpec(4, 32))
                for i, block in enumerate(adapter.blocks) for n, m in adapter.linears(block).items()}
    write_packed_release(tmp_path / "rel", tmp_path / "src", qweights, {"scheme": "w4g32"}, fmt)
    tensors = load_file(str(tmp_path / "rel" / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight)  # unchanged bits
    scale = next(v for k, v in tensors.items() if k.endswith(("scales", "weight_scale")))
    assert scale.dtype == (torch.float16 if fmt.startswith("gptq") else torch.bfloat16)
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_packed_release(tmp_path / "rel", verify=False, dtype=torch.bfloat16)
    assert torch.isfinite(_logits(loaded, tiny_ids(2, 16)).float()).all()


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("spec,group", [(QuantSpec(4, 32), 32), (QuantSpec(3, None, sym=True), -1)])
def test_gptq_config(tmp_path, spec, group, fmt):
    rel, _, _ = _write(tmp_path, "llama", spec, fmt)
    q = json.loads((rel / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == q["format"] == fmt
    assert (q["bits"], q["group_size"], q["sym"], q["desc_act"]) == (spec.bits, group, spec.sym, False)
    assert json.loads((rel / "quantize_config.json").read_text()) == q
    from transformers import GPTQConfig

    parsed = GPTQConfig.from_dict(q)  # what transformers' GPTQ loader would read
    assert (parsed.format, parsed.bits, parsed.group_size, parsed.sym, parsed.desc_act) == \
        (fmt, spec.bits, group, spec.sym, False)


def _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, bits, v1=False):
    """GPTQModel PackableQuantLinear.dequantize_weight (torch path), transcribed; gptq_v2 zeros (v1:
    its loader's v1 -> v2 conversion adds 1 to every unpacked zero first)."""
    maxq = 2**bits - 1
    if bits in (2, 4, 8):
        wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
        zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, 32 // bits), wf.unsqueeze(0))
        zeros = torch.bitwise_and(zeros, maxq).reshape(scales.shape)
        weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1))
        weight = torch.bitwise_and(weight, maxq).reshape(-1, scales.shape[1])
    else:
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
        zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
        zeros = zeros >> wf.unsqueeze(0)
        zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
        zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
        zeros = zeros & 0x7
        zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2).reshape(scales.shape)
        weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
        weight = (weight >> wf.unsqueeze(-1)) & 0x7
        weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
        weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
        weight = weight & 0x7
        weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1).reshape(-1, scales.shape[1])
    g = g_idx.long()
    zeros = zeros + 1 if v1 else zeros
    return (scales[g] * (weight - zeros[g])).t()  # fp16 (out, in)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_release_read_by_gptqmodel_dequantizer(tmp_path, bits, fmt):
    rel, _, qweights = _write(tmp_path, "llama", QuantSpec(bits, 32), fmt)
    assert json.loads((rel / "quantization.json").read_text()).get("gptq_v1_clipped_codes", 0) == 0
    tensors = load_file(str(rel / "model.safetensors"))
    for name, qw in qweights.items():
        t = [tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")]
        w = _gptqmodel_dequantize(*t, bits, v1=fmt == "gptq")
        assert w.dtype == torch.float16
        assert torch.equal(w, _fp16_dense(qw)), name


def _gptqmodel_python() -> str | None:
    """An interpreter that imports gptqmodel: $PTQ_GPTQMODEL_PYTHON, the checkout's .venv-gptqmodel
    (`make gptqmodel-env`), or this one."""
    env = os.environ.get("PTQ_GPTQMODEL_PYTHON")
    local = Path(__file__).resolve().parents[2] / ".venv-gptqmodel" / "bin" / "python"
    for python in filter(None, [env, str(local) if local.is_file() else None, sys.executable]):
        if subprocess.run([python, "-c", "import gptqmodel"], capture_output=True).returncode == 0:
            return python
    return None


def _tokenizer(vocab: int):
    """A word-level fast tokenizer (GPTQModel's loader insists on one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1")


SPECS_FOR_GPTQMODEL = (QuantSpec(2, 32), QuantSpec(3, 32), QuantSpec(4, None), QuantSpec(8, 64, sym=True),
                       QuantSpec(4, 32, sym=True))


def test_gptq_releases_loaded_by_gptqmodel_itself(tmp_path):
    python = _gptqmodel_python()
    if python is None:
        pytest.skip("gptqmodel is not installed (make gptqmodel-env, or set PTQ_GPTQMODEL_PYTHON)")
    from safetensors.torch import save_file

    ids = tiny_ids(2, 16, vocab=128)
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    runs, args = [], []
    # v2 for every scheme, v1 for the symmetric ones: GPTQModel 7.6 refuses asymmetric v1 checkpoints
    # (zero points of 0 are lost in v1), which is why pack.format auto writes those as gptq_v2; and a
    # release with a quantized head untied from the embeddings (lm_head: true)
    cases = [(spec, "gptq_v2") for spec in SPECS_FOR_GPTQMODEL] + \
        [(spec, "gptq") for spec in SPECS_FOR_GPTQMODEL if spec.sym]
    releases = [(spec, *_write(tmp_path / f"s{i}", "llama", spec, fmt)) for i, (spec, fmt) in enumerate(cases)]
    releases.append((QuantSpec(4, 32), *_tied_head_release(tmp_path / "head", QuantSpec(4, 32), "gptq_v2")))
    releases.append((MIXED, *_write(tmp_path / "mixed", "llama", MIXED, "gptq_v2")))  # per-module `dynamic`
    for i, (spec, rel, fake, qweights) in enumerate(releases):  # one reader process for all: start-up ~10 s
        _tokenizer(fake.config.vocab_size).save_pretrained(rel)
        runs.append((spec, fake, qweights, tmp_path / f"read{i}.safetensors"))
        args += [str(rel), str(runs[-1][3])]
    done = subprocess.run([python, str(Path(__file__).with_name("gptqmodel_reader.py")),
                           str(tmp_path / "ids.safetensors"), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for spec, fake, qweights, out in runs:
        read = load_file(str(out))
        assert {k.removeprefix("weight/") for k in read if k.startswith("weight/")} == set(qweights), spec
        for name, qw in qweights.items():  # GPTQModel's dense weight is ours, to the bit
            assert torch.equal(read[f"weight/{name}"], _fp16_dense(qw)), (spec, name)
        # its fp16 forward pass scores what our fp32 fake-quant model does
        torch.testing.assert_close(read["logits"], _logits(fake, ids), rtol=0, atol=5e-3)


def _fp16_dense(qw):
    """Our dense weight with fp16 scales, rounded once to fp16 (what an fp16 reader computes)."""
    g = qw.g_idx.long()
    return (qw.scale.half().float()[:, g] * (qw.qweight.float() - qw.zero[:, g])).half()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, None), QuantSpec(4, 16, sym=True), QuantSpec(8, 64)])
def test_compressed_tensors_release_read_by_compressed_tensors(tmp_path, spec):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    rel, _, qweights = _write(tmp_path, "llama", spec, "compressed-tensors")
    raw = json.loads((rel / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(raw).config_groups["group_0"]  # our config parses
    assert scheme.weights.num_bits == spec.bits and scheme.weights.symmetric == spec.sym
    tensors = load_file(str(rel / "model.safetensors"))
    for name, qw in qweights.items():
        local = {k: tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                     "weight_shape") if f"{name}.{k}" in tensors}
        w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert w.dtype == torch.float16 and torch.equal(w, _fp16_dense(qw)), name


def test_mixed_compressed_tensors_release_read_by_compressed_tensors(tmp_path):
    """compressed-tensors' own config parser and decompressor, group by group, and (all groups
    symmetric) the plain transformers call: every weight of a mixed release is ours, bit for bit."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    rel, fake, qweights = _write(tmp_path, "llama", MIXED, "compressed-tensors")
    raw = json.loads((rel / "config.json").read_text())["quantization_config"]
    groups = QuantizationConfig.model_validate(raw).config_groups
    tensors = load_file(str(rel / "model.safetensors"))
    seen = set()
    for scheme in groups.values():
        for name in scheme.targets:
            local = {k: tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                         "weight_shape") if f"{name}.{k}" in tensors}
            w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(w, _fp16_dense(qweights[name])), name
            seen.add(name)
    assert seen == set(qweights)
    # transformers' dequantize mode would decode every Linear with one group's scheme: never declared here
    assert "dequantize" not in raw
    # an all-symmetric mixed release loads with the plain call (compressed mode), every weight ours
    sym = SpecMap(QuantSpec(4, 32, sym=True), tuple(sorted(
        (f"model.layers.0.self_attn.{n}_proj", QuantSpec(8, None, sym=True)) for n in "qkv")))
    rel, fake, qweights = _write(tmp_path / "sym", "llama", sym, "compressed-tensors")
    model = AutoModelForCausalLM.from_pretrained(rel)
    ids = tiny_ids(2, 16)
    a, b = _logits(fake, ids), _logits(model, ids).float()
    for name, qw in qweights.items():
        assert torch.equal(model.get_submodule(name).weight.detach().half(), _fp16_dense(qw)), name
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_compressed_tensors_release_loads_in_transformers(tmp_path):
    """transformers' compressed-tensors loader (dequantize=True, CPU) gets every weight bit for bit."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    rel, fake, qweights = _write(tmp_path, "llama", QuantSpec(4, 32), "compressed-tensors")
    model = AutoModelForCausalLM.from_pretrained(rel, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                 dtype=torch.float32)
    for name, qw in qweights.items():
        assert torch.equal(model.get_submodule(name).weight.detach(), _fp16_dense(qw).float()), name
    ours = load_packed_release(rel, verify=False)  # fp32 activations: W = s * (q - z) not rounded to fp16
    ids = tiny_ids(2, 16)
    a = _logits(model, ids)
    assert (_logits(ours, ids) - a).abs().max() <= 2e-3 * a.abs().max()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, None), QuantSpec(4, 32, sym=True)])
def test_compressed_tensors_release_loads_with_the_plain_call(tmp_path, spec):
    """`AutoModelForCausalLM.from_pretrained(release)`, nothing else: the first thing a user types.
    Asymmetric releases carry `dequantize` (compressed-tensors' meta load path does not pack the zero
    point it packs on write); every weight comes back as our dequantized fp16 weight."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    rel, fake, qweights = _write(tmp_path, "llama", spec, "compressed-tensors")
    model = AutoModelForCausalLM.from_pretrained(rel)
    ids = tiny_ids(2, 16)
    logits = _logits(model, ids).float()  # the compressed (symmetric) mode decompresses here
    for name, qw in qweights.items():
        assert torch.equal(model.get_submodule(name).weight.detach().half(), _fp16_dense(qw)), name
    a = _logits(fake, ids)
    assert (logits - a).abs().max() <= 2e-2 * a.abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_release_dispatches_on_format(tmp_path, fmt):
    src, fake, qweights = _setup(tmp_path, "llama", QuantSpec(4, 32))
    write_release_files(tmp_path / "rel", src, qweights, {"scheme": "w4g32"}, fmt=fmt)
    model = load_release(tmp_path / "rel", verify=False)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    ids = tiny_ids(1, 8)
    a = _logits(fake, ids)
    assert (_logits(model, ids) - a).abs().max() <= 2e-3 * a.abs().max()


def test_compressed_tensors_refuses_act_order_g_idx(tmp_path):
    src, _, qweights = _setup(tmp_path, "llama", QuantSpec(4, 32))
    name = next(iter(qweights))
    qw = qweights[name]
    perm = torch.randperm(qw.g_idx.numel(), generator=torch.Generator().manual_seed(0))
    qweights[name] = type(qw)(qw.qweight, qw.scale, qw.zero, qw.g_idx[perm].contiguous(), qw.spec)
    with pytest.raises(ValueError, match="consecutive groups"):
        write_packed_release(tmp_path / "ct", src, qweights, {}, "compressed-tensors")
    write_packed_release(tmp_path / "gptq", src, qweights, {}, "gptq")  # GPTQ keeps g_idx, desc_act true
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["desc_act"] is True


def test_gptq_v1_release_of_a_zero_point_zero_group_loads_as_converted(tmp_path):
    """A group whose zero is 0 (v1 cannot store it) is shifted; the count of codes that moved is in
    quantization.json and our loader reads back exactly the converted weights; gptq_v2 stays exact."""
    from quantlib.packing import to_gptq_v1

    src, _, qweights = _setup(tmp_path, "llama", QuantSpec(4, 32))
    name = next(iter(qweights))
    qw = qweights[name]
    zero, codes = qw.zero.clone(), qw.qweight.clone()
    zero[:2, 0] = 0
    codes[0, :3] = 15
    qweights[name] = QuantizedWeight(codes, qw.scale, zero, qw.g_idx, qw.spec)
    want_v1, clipped = to_gptq_v1(qweights[name])
    assert clipped >= 3
    for fmt, want, n in (("gptq", want_v1, clipped), ("gptq_v2", qweights[name], None)):
        write_packed_release(tmp_path / fmt, src, qweights, {}, fmt)
        assert json.loads((tmp_path / fmt / "quantization.json").read_text()).get("gptq_v1_clipped_codes") == n
        layer = load_packed_release(tmp_path / fmt, verify=False).get_submodule(name)
        g = want.g_idx.long()  # the scales were stored in fp16
        dense = want.scale.half().float()[:, g] * (want.qweight.float() - want.zero[:, g])
        assert torch.equal(layer.dequantize(torch.float32), dense), fmt


def test_releases_from_before_v1_still_load_as_v2(tmp_path):
    """Releases written before the v1 default say format "gptq" in quantization.json and gptq_v2 in
    config.json: the config decides, so their zeros are not shifted by one."""
    src, fake, qweights = _setup(tmp_path, "llama", QuantSpec(4, 32))
    write_packed_release(tmp_path / "rel", src, qweights, {}, "gptq_v2")
    info = json.loads((tmp_path / "rel" / "quantization.json").read_text())
    (tmp_path / "rel" / "quantization.json").write_text(json.dumps(info | {"format": "gptq"}))
    ids = tiny_ids(1, 8)
    a = _logits(fake, ids)
    assert (_logits(load_packed_release(tmp_path / "rel", verify=False), ids) - a).abs().max() <= 2e-3 * a.abs().max()


def _tied_head_release(tmp_path: Path, spec: QuantSpec, fmt: str):
    """A tiny Llama whose head is tied to its embeddings, every block Linear and the head RTN-quantized
    and released in `fmt`: (release dir, fake-quant model with the head untied, qweights)."""
    from quantlib.head import untie_head
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "src")
    assert "lm_head.weight" not in load_file(str(tmp_path / "src" / "model.safetensors"))
    adapter = get_adapter(model)
    qweights = {f"{adapter.family.layers}.{i}.{n}": rtn_quantize(adapter.get_weight(m).detach(), spec)
                for i, block in enumerate(adapter.blocks) for n, m in adapter.linears(block).items()}
    qweights["lm_head"] = rtn_quantize(model.lm_head.weight.detach(), spec)
    for name, qw in qweights.items():
        if name == "lm_head":
            untie_head(model, qw.dequantize())
        else:
            adapter.set_weight(model.get_submodule(name), qw.dequantize())
    write_release_files(tmp_path / "rel", tmp_path / "src", qweights, {"scheme": spec.name}, fmt=fmt)
    return tmp_path / "rel", model, qweights


@pytest.mark.parametrize("fmt", ["ptq-codes-v1", *FORMATS])
def test_a_quantized_tied_head_is_released_untied(tmp_path, fmt):
    """quantize.targets lm_head on a model whose head is tied to the embeddings (SmolLM2's case): the
    source files hold no lm_head.weight; the release stores the head's codes and the FP embeddings,
    unties them in config.json, and loads back to the fake-quant model's logits."""
    rel, model, _ = _tied_head_release(tmp_path, QuantSpec(4, 32), fmt)
    embed = load_file(str(tmp_path / "src" / "model.safetensors"))["model.embed_tokens.weight"]
    written = json.loads((rel / "config.json").read_text())
    assert written["tie_word_embeddings"] is False
    if fmt.startswith("gptq"):
        assert written["quantization_config"]["lm_head"] is True
    if fmt == "compressed-tensors":
        assert "lm_head" not in written["quantization_config"]["ignore"]
    loaded = load_release(rel, verify=False)
    assert isinstance(loaded.lm_head, QuantLinear) == (fmt != "ptq-codes-v1")
    torch.testing.assert_close(loaded.model.embed_tokens.weight, embed, rtol=0, atol=1e-3)  # FP (fp16 when packed)
    ids = tiny_ids(2, 8)
    a = _logits(model, ids)
    assert (_logits(loaded, ids) - a).abs().max() <= 2e-3 * a.abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_release_loads_with_the_dense_backend(tmp_path, fmt):
    """backend="dense" (the CPU decode path) reaches every QuantLinear and gives the reference's logits."""
    rel, _, qweights = _write(tmp_path, "llama", QuantSpec(4, 32), fmt)
    ref, dense = (load_packed_release(rel, verify=False, backend=b) for b in ("reference", "dense"))
    layers = [m for m in dense.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len(qweights) and {m.backend for m in layers} == {"dense"}
    ids = tiny_ids(2, 8)
    assert torch.equal(_logits(dense, ids), _logits(ref, ids))


def test_static_w8a8_release_carries_its_input_scales(tmp_path):
    """a8s: the config declares static per-tensor int8 inputs, every quantized module has its
    `input_scale` (in the scales' dtype), our loader serves them through Int8Linear with exactly the
    stored scale, transformers + compressed-tensors read the same scheme and scales, and a release
    without its scales is refused at write time."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from quantlib.actquant import ActSpec, fake_quant_static

    spec = QuantSpec(8, None, sym=True)
    src, _, qweights = _setup(tmp_path, "llama", spec)
    scales = {n: torch.tensor([0.01 + 0.001 * i]) for i, n in enumerate(sorted(qweights))}
    info = {"scheme": spec.name, "activations": "a8s"}
    with pytest.raises(ValueError, match="calibrated input scale"):
        write_packed_release(tmp_path / "bad", src, qweights, info, "compressed-tensors")
    write_packed_release(tmp_path / "rel", src, qweights, info, "compressed-tensors", input_scales=scales)
    group = json.loads((tmp_path / "rel" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False,
                                          "strategy": "tensor", "group_size": None}
    stored = load_file(str(tmp_path / "rel" / "model.safetensors"))
    name = sorted(qweights)[1]
    assert stored[f"{name}.input_scale"].dtype == torch.float16
    ours = load_packed_release(tmp_path / "rel", verify=False)
    module = ours.get_submodule(name)
    s16 = scales[name].half().float()
    assert isinstance(module, Int8Linear) and torch.equal(module.input_scale, s16)
    x = torch.randn(2, 5, module.in_features)
    qw = qweights[name]
    w = (qw.qweight.float() - qw.zero) * qw.scale.half().float()
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(fake_quant_static(x, s16, ActSpec(8, static=True)), w),
                                   rtol=1e-5, atol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "rel")
    inputs = hf.get_submodule(name).quantization_scheme.input_activations
    assert (inputs.num_bits, inputs.dynamic, inputs.strategy) == (8, False, "tensor")
    assert torch.equal(hf.get_submodule(name).input_scale.detach().float().reshape(1), s16)


def test_w8a8_release_declares_and_applies_dynamic_per_token_inputs(tmp_path):
    """quantize.activations a8 on a compressed-tensors release: the config declares symmetric int8
    dynamic per-token inputs (what vLLM's W8A8 int8 path and compressed-tensors read), our loader
    quantizes exactly the inputs of the quantized modules, transformers + compressed-tensors parse the
    same scheme, and a GPTQ release refuses it (it cannot record it)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from quantlib.actquant import ActSpec, attached, fake_quant_tokens

    spec = QuantSpec(8, None, sym=True)
    src, fake, qweights = _setup(tmp_path, "llama", spec)
    write_packed_release(tmp_path / "rel", src, qweights, {"scheme": spec.name, "activations": "a8"},
                         "compressed-tensors")
    group = json.loads((tmp_path / "rel" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                          "strategy": "token", "group_size": None}
    ours = load_release(tmp_path / "rel", verify=False)
    assert attached(ours) == dict.fromkeys(qweights, "a8")
    name = sorted(qweights)[0]
    module = ours.get_submodule(name)
    assert isinstance(module, Int8Linear)  # served integer x integer, quantizing its own inputs
    x = torch.randn(2, 5, module.in_features) * torch.linspace(0.1, 4, module.in_features)
    qw = qweights[name]
    w = (qw.qweight.float() - qw.zero) * qw.scale.half().float()  # the release's fp16 scales
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(fake_quant_tokens(x, ActSpec(8)), w), rtol=1e-5, atol=1e-5)
    # asked for torch's weight-only CPU kernel, the loader keeps a QuantLinear behind an a8 hook
    kept = load_packed_release(tmp_path / "rel", verify=False, backend="int8").get_submodule(name)
    assert isinstance(kept, QuantLinear) and kept.act_spec == ActSpec(8)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "rel")
    inputs = hf.get_submodule(name).quantization_scheme.input_activations
    assert (inputs.num_bits, inputs.dynamic, inputs.strategy, inputs.symmetric) == (8, True, "token", True)
    with pytest.raises(ValueError, match="compressed-tensors"):
        write_release_files(tmp_path / "gptq", src, qweights, {"scheme": spec.name, "activations": "a8"}, fmt="gptq")
