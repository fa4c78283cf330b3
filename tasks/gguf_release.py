"""GGUF releases for llama.cpp: one `model.gguf` holding our codes exactly (quantlib.gguf) and the
tokenizer, beside the config and quantization.json the other stages read.

Layout of a GGUF release folder:
  model.gguf          llama.cpp's format: architecture metadata, the tokenizer (tokens, merges,
                      special ids, chat template), every quantized Linear as Q4_0/Q4_1/Q5_0/Q5_1/
                      Q8_0 blocks (quantlib.gguf), other matrices in F16 (BF16 for a bf16 source),
                      norms and biases in F32. llama-architecture Q/K rows are permuted as llama.cpp's
                      converter does (its rotary pairs adjacent dimensions); readers undo it.
  config.json         the source config (untied when a tied head is quantized): the architecture as
                      quantized, which our loader passes to transformers (its GGUF metadata mapping
                      drops keys such as Qwen3's head_dim). No tokenizer files: the tokenizer is in
                      model.gguf, and transformers' GGUF tokenizer loader would mix files beside it in.
  quantization.json   format "gguf", scheme, method, modules, the GGUF type of each and its relative
                      weight error ||w_gguf - w_ours|| / ||w_ours|| (0 for exact types, up to fp16)
The evaluate stage reads model.gguf back through transformers' GGUF loader, a reader that is not ours.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from quantlib.gguf_k import gguf_export
from quantlib.qweight import QuantizedWeight

from .io import atomic_write_json
from .release import _model_tensors, drop_quantized, tied_head, untied_config
from .sources import MODEL_CONSTRUCTION
from .specs import GGUF_ARCHITECTURES, gguf_refusal

__all__ = ["GGUF_FORMAT", "GGUF_FILE", "relative_error", "write_gguf_file", "write_gguf_release", "load_gguf_release"]

GGUF_FORMAT = "gguf"
GGUF_FILE = "model.gguf"


def _arch(model_dir: Path) -> tuple[dict, str, bool]:
    """(config.json, llama.cpp architecture, Q/K permuted); ValueError when GGUF cannot hold the model."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    if (why := gguf_refusal(raw)) is not None:
        raise ValueError(why)
    return raw, *GGUF_ARCHITECTURES[raw["model_type"]]


def _rope_theta(config: PretrainedConfig) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _metadata(w: gguf.GGUFWriter, c: PretrainedConfig, name: str) -> None:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(c))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab(model_dir: Path) -> gguf.Vocab:
    for kind in (gguf.BpeVocab, gguf.LlamaHfVocab):
        try:
            return kind(model_dir)
        except (FileNotFoundError, TypeError, ValueError, KeyError):
            continue
    raise ValueError(f"{model_dir}: no byte-level BPE or SentencePiece-style tokenizer.json to write into GGUF")


def _added_types(model_dir: Path) -> dict[int, gguf.TokenType]:
    """Token id -> CONTROL (special) or USER_DEFINED for tokenizer.json's added tokens, including those
    that are also in the base vocabulary (a reader treats CONTROL tokens as specials, e.g. EOS)."""
    path = model_dir / "tokenizer.json"
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", []) if path.is_file() else []
    return {t["id"]: gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED for t in added}


def _pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer (how text is cut before BPE merges), read
    from its structure; "default" where none is recognised. A wrong name tokenizes differently in
    llama.cpp (its "default" splits " ," that GPT-2's regex keeps whole), so the name matters."""
    path = model_dir / "tokenizer.json"
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") if path.is_file() else None
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex alone
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex", "")
        if "\\p{L}+" in regex and "\\p{N}{1,3}" in regex:
            return "llama-bpe"  # Llama 3's regex: digits in runs of up to three
        if "\\p{L}+" in regex and "\\p{N}|" in regex:
            return "qwen2"  # the same with single digits
    return "default"


def _tokenizer(w: gguf.GGUFWriter, model_dir: Path, n_vocab: int) -> None:
    """Tokens padded to the model's vocabulary (llama.cpp needs one per embedding row), merges, specials."""
    vocab = _vocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text), scores.append(score), types.append(kind)
    if len(tokens) > n_vocab:
        raise ValueError(f"{model_dir}: the tokenizer has {len(tokens)} tokens for {n_vocab} embedding rows")
    for i, kind in _added_types(model_dir).items():  # as llama.cpp's converter marks them
        if i < len(types):
            types[i] = kind
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(vocab.tokenizer_model)
    w.add_tokenizer_pre(_pre_tokenizer(model_dir) if vocab.tokenizer_model == "gpt2" else "default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def _qk_rows(name: str, c: PretrainedConfig) -> int | None:
    """Heads whose rows llama.cpp's converter permutes for this weight (q: all heads, k: kv heads)."""
    if name.endswith("self_attn.q_proj"):
        return c.num_attention_heads
    if name.endswith("self_attn.k_proj"):
        return c.num_key_value_heads
    return None


def _permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order of llama.cpp's `permute`: each head's (2, d/2) rotary halves become (d/2, 2) pairs."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _float_type(t: torch.Tensor, matrix_dtype: torch.dtype) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if t.dim() < 2:  # norms and biases: llama.cpp computes them in F32
        return t.float().numpy(), gguf.GGMLQuantizationType.F32
    if matrix_dtype == torch.bfloat16:  # numpy has no bf16: its bits as uint16, typed BF16
        return t.bfloat16().view(torch.uint16).numpy(), gguf.GGMLQuantizationType.BF16
    return t.half().numpy(), gguf.GGMLQuantizationType.F16


def _add_tensors(w: gguf.GGUFWriter, c: PretrainedConfig, arch: str, permute: bool, floats: dict[str, torch.Tensor],
                 blocks: dict[str, tuple[str, torch.Tensor]], matrix_dtype: torch.dtype) -> None:
    """Every tensor under its GGUF name: `blocks` maps a quantized module to (GGUF type, rows of blocks)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    items = [*floats.items(), *((k + ".weight", kb) for k, kb in blocks.items())]
    for key, value in sorted(items, key=lambda kv: kv[0]):
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"pack.format gguf: no llama.cpp name for tensor {key!r} of a {arch} model")
        heads = _qk_rows(key.rsplit(".", 1)[0], c) if permute else None
        if isinstance(value, tuple):  # (type, (out, bytes) uint8): rows permute like the weight's rows
            kind, rows = value
            rows = rows if heads is None else rows[_permutation(rows.shape[0], heads)]
            w.add_tensor(gname, rows.numpy(), raw_dtype=gguf.GGMLQuantizationType[kind])
            continue
        if heads is not None:
            value = value[_permutation(value.shape[0], heads)]
        array, kind = _float_type(value, matrix_dtype)
        w.add_tensor(gname, array, raw_shape=tuple(value.shape) if kind is gguf.GGMLQuantizationType.BF16 else None,
                     raw_dtype=kind)


def write_gguf_file(path: Path, model_dir: Path, blocks: dict[str, tuple[str, torch.Tensor]], dtype: torch.dtype,
                    name: str, trust_remote_code: bool = False) -> None:
    """model_dir's model as one GGUF file: the modules in `blocks` as given (type, rows of blocks),
    every other tensor from the source in float (matrices in `dtype`)."""
    _, arch, permute = _arch(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    floats = drop_quantized(_model_tensors(model_dir), dict.fromkeys(blocks), model_dir, trust_remote_code)
    writer = gguf.GGUFWriter(path, arch)
    _metadata(writer, config, name)
    _tokenizer(writer, model_dir, config.vocab_size)
    _add_tensors(writer, config, arch, permute, floats, blocks, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_release(out_dir: Path, model_dir: Path, qweights: dict[str, QuantizedWeight], info: dict,
                       dtype: torch.dtype, trust_remote_code: bool = False, gguf_type: str = "exact") -> None:
    """Write everything but MANIFEST.json of a GGUF release into out_dir (the pack stage's building folder)."""
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    raw, _, _ = _arch(model_dir)
    blocks, errors = {}, {}
    for n, qw in qweights.items():
        kind, rows, weight = gguf_export(qw, gguf_type)
        blocks[n], errors[n] = (kind, rows), relative_error(weight, qw)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{raw.get('model_type', '')} {info.get('scheme', '')} {info.get('method', '')}".strip()
    write_gguf_file(out_dir / GGUF_FILE, model_dir, blocks, dtype, name, trust_remote_code)
    atomic_write_json(out_dir / "config.json", untied_config(raw, qweights, tied_head(model_dir, trust_remote_code)))
    atomic_write_json(out_dir / "quantization.json", info | {"format": GGUF_FORMAT, "modules": sorted(qweights),
                                                            "gguf_type": gguf_type,
                                                            "gguf_types": {n: k for n, (k, _) in blocks.items()},
                                                            "gguf_error": errors})


def relative_error(weight: torch.Tensor, qw: QuantizedWeight) -> float:
    """||weight - ours|| / ||ours||, to 4 significant digits (a release holds no float noise)."""
    ours = qw.dequantize()
    return float(f"{((weight - ours).norm() / ours.norm().clamp_min(1e-30)).item():.4g}")


def _reader_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config as the architecture written into the file: a family stored under another llama.cpp
    architecture (Mistral without a sliding window is llama) is rebuilt as that one, the same
    function, because transformers' GGUF loader knows only llama.cpp's architectures."""
    arch = GGUF_ARCHITECTURES.get(config.model_type, (config.model_type,))[0]
    if arch == config.model_type:
        return config
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(arch, **fields)


def load_gguf_release(release_dir: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The release's model.gguf read back by transformers' GGUF loader (dequantized to `dtype`). The
    architecture comes from the release's config.json: transformers' GGUF metadata mapping drops
    some keys (Qwen3's head_dim), and the source config is what the model was quantized as."""
    config = _reader_config(AutoConfig.from_pretrained(release_dir, trust_remote_code=trust_remote_code))
    with MODEL_CONSTRUCTION:
        model = AutoModelForCausalLM.from_pretrained(release_dir, gguf_file=GGUF_FILE, config=config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()
