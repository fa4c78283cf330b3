"""Packed release folders (GPTQ or compressed-tensors) and loading them back through QuantLinear.

Layout of a packed release (see quantlib.packing.PackFormat for each format's tensors):
  model.safetensors   every quantized Linear NAME as its packed tensors (NAME.qweight ... or
                      NAME.weight_packed ...), every other source tensor (embeddings, norms, head,
                      biases) in `dtype` (fp16 by default)
  config.json         the source config plus `quantization_config` (what GPTQ / compressed-tensors
                      readers dispatch on) and `torch_dtype`
  quantize_config.json   (GPTQ v1 and v2) the same config, where GPTQModel / AutoGPTQ look for it
  quantization.json   format, scheme, method, job, quantized module names (our loaders read it)
  tokenizer and generation files copied from the source; MANIFEST.json is added by the pack stage.

Scales are stored in fp16, so a released model differs from the fp32-scale fake-quant model by one
fp16 rounding of each scale (and of the unquantized tensors).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from quantlib.packing import (PackFormat, pack_gptq, pack_weight, to_gptq_v1, trivial_g_idx, unpack_codes,
                              unpack_compressed_tensors, unpack_gptq)
from quantlib.actquant import ActSpec, attach, parse_activations
from quantlib.int8linear import INT8_BACKENDS, Int8Linear, symmetric_zeros
from quantlib.moe import is_router_tensor
from quantlib.qlinear import QuantLinear, replace_modules
from quantlib.qweight import QuantizedWeight
from quantlib.spec import QuantSpec

from .io import atomic_save_safetensors, atomic_write_json, verify_manifest
from .sources import MODEL_CONSTRUCTION
from .release import (_model_tensors, _tied, copy_model_files, drop_quantized, module_keyed, raise_integrity, tied_head,
                      untied_config)

__all__ = ["PACKED_FORMATS", "quantization_config", "packed_release_tensors", "write_packed_release", "release_format",
           "load_packed_release", "ct_weights", "ct_inputs", "module_spec"]

PACKED_FORMATS = tuple(f.value for f in PackFormat)
_GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
_CT_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_GPTQ_FORMATS = (PackFormat.GPTQ, PackFormat.GPTQ_V2)


def _spec_groups(qweights: dict[str, QuantizedWeight]) -> list[tuple[QuantSpec, list[str]]]:
    """(scheme, its module names) with the most modules first (ties by name): the first is the
    release's base scheme; a mixed-precision release (quantlib.mixed) has more."""
    groups: dict[QuantSpec, list[str]] = {}
    for name in sorted(qweights):
        groups.setdefault(qweights[name].spec, []).append(name)
    return sorted(groups.items(), key=lambda g: (-len(g[1]), g[0].name))


# runtimes that fuse Linears sharing an input look their scheme up under the fused name (vLLM)
_FUSED = {frozenset({"q_proj", "k_proj", "v_proj"}): "qkv_proj", frozenset({"gate_proj", "up_proj"}): "gate_up_proj"}


def _gptq_dynamic(groups: list[tuple[QuantSpec, list[str]]]) -> dict:
    """GPTQModel's per-module overrides of the base scheme: {"+:regex": {"bits", "group_size", "sym"}},
    the first regex that re.match-es a module name applies. One pattern per parent module and scheme,
    also matching the fused name (qkv_proj) when it covers all of the fused Linears."""
    dynamic = {}
    for spec, names in groups[1:]:
        by_parent: dict[str, list[str]] = {}
        for n in names:
            parent, _, leaf = n.rpartition(".")
            by_parent.setdefault(parent, []).append(leaf)
        for parent, leaves in by_parent.items():
            fused = [f for members, f in _FUSED.items() if members <= set(leaves)]
            alt = "|".join(re.escape(x) for x in leaves + fused)
            prefix = f"{re.escape(parent)}\\." if parent else ""  # lm_head has no parent
            dynamic[f"+:^{prefix}(?:{alt})$"] = {"bits": spec.bits, "group_size": spec.group_size or -1, "sym": spec.sym}
    return dynamic


def module_spec(qconfig: dict, fmt: PackFormat, name: str, *aliases: str) -> tuple[int, int | None]:
    """(bits, group size) a release's config gives module `name` (or its checkpoint spelling in
    `aliases`: a Mixtral expert's w1), as a GPTQ or compressed-tensors reader resolves it: GPTQ's
    first matching `dynamic` pattern, else its base; compressed-tensors' only config group, else the
    group that names the module, else the one targeting every Linear."""
    names = (name, *aliases)
    if fmt in _GPTQ_FORMATS:
        for pattern, over in (qconfig.get("dynamic") or {}).items():
            if not pattern.startswith("-:") and any(re.match(pattern.removeprefix("+:"), n) for n in names):
                g = over.get("group_size", qconfig["group_size"])
                return over.get("bits", qconfig["bits"]), None if g == -1 else g
        return qconfig["bits"], None if qconfig["group_size"] == -1 else qconfig["group_size"]
    groups = list(qconfig["config_groups"].values())
    group = groups[0] if len(groups) == 1 else next((g for g in groups if set(names) & set(g["targets"])), None) or \
        next((g for g in groups if "Linear" in g["targets"]), None)
    if group is None:
        raise ValueError(f"no config group of the release names {name} or targets every Linear: the release is "
                         "incomplete or not from this loader's formats")
    return group["weights"]["num_bits"], group["weights"]["group_size"]


def _scale_dtype(fmt: PackFormat, dtype: torch.dtype) -> torch.dtype:
    """GPTQ scales are fp16 by convention (its kernels read fp16); compressed-tensors follows `dtype`."""
    return torch.float16 if PackFormat(fmt) in _GPTQ_FORMATS else dtype


def _gptq_config(spec: QuantSpec, desc_act: bool, fmt: PackFormat, lm_head: bool) -> dict:
    return {
        "quant_method": "gptq",
        # gptq (v1): qzeros hold zero - 1; gptq_v2: the zero itself. `format` is the current key
        # (transformers' GPTQConfig, GPTQModel), `checkpoint_format` its older alias (vLLM reads it)
        "format": fmt.value,
        "checkpoint_format": fmt.value,
        "bits": spec.bits,
        "group_size": spec.group_size or -1,
        "desc_act": desc_act,  # False: g_idx[j] == j // group_size (static groups)
        "sym": spec.sym,
        "pack_dtype": "int32",
        "lm_head": lm_head,  # GPTQModel's flag: the LM head is quantized too
        "meta": {"quantizer": ["ptq-pipeline"]},
    }


def ct_inputs(activations: str | None) -> dict | None:
    """compressed-tensors' input_activations for quantlib.actquant's scheme: symmetric int, dynamic
    per token, or static per tensor with an `input_scale` per module (vLLM's int8 W8A8 paths read
    exactly these), or None for weight-only."""
    act = parse_activations(activations)
    if act is None:
        return None
    return {"num_bits": act.bits, "type": "int", "symmetric": True, "dynamic": not act.static,
            "strategy": "tensor" if act.static else "token", "group_size": None}


def ct_weights(spec: QuantSpec) -> dict:
    """compressed-tensors' weights entry (QuantizationArgs) for `spec`: int, static, per output
    channel or in groups along the input; what a release declares and what a peer is asked to make."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.sym, "dynamic": False,
            "strategy": "channel" if spec.group_size is None else "group", "group_size": spec.group_size}


def _ct_group(spec: QuantSpec, targets: list[str], scale_dtype: torch.dtype, activations: str | None) -> dict:
    weights = ct_weights(spec) | {"scale_dtype": str(scale_dtype)}
    if not spec.sym:
        weights["zp_dtype"] = "torch.int8"  # signed view z - 2^(b-1) before packing
    return {"targets": targets, "weights": weights, "input_activations": ct_inputs(activations),
            "output_activations": None, "format": "pack-quantized"}


def _ct_config(groups: list[tuple[QuantSpec, list[str]]], ignore: list[str], scale_dtype: torch.dtype,
               activations: str | None = None) -> dict:
    """groups: (scheme, targets) per config group: ["Linear"] or module names."""
    # Asymmetric: compressed-tensors 0.20 writes weight_zero_point packed (ceil(out*b/32), G), as we do,
    # but its load path (compress() on the meta model transformers builds) leaves the parameter at
    # (out, G), so a plain from_pretrained fails on its own releases too. `dequantize` (read by
    # transformers' CompressedTensorsConfig, ignored by compressed-tensors and vLLM) makes the plain call
    # dequantize at load instead, exactly; the compressed mode decompresses at the first forward anyway.
    # Only for one group: transformers 5.23's dequantize path decodes every dense Linear with the first
    # group's scheme, so on a mixed release it would decode wrong weights. A mixed release loads in the
    # plain call when all its groups are symmetric (the compressed mode), and otherwise in vLLM,
    # compressed-tensors' decompressor or our loader.
    load = {"dequantize": True} if len(groups) == 1 and not groups[0][0].sym else {}
    return {
        **load,
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": _ct_group(spec, targets, scale_dtype, activations)
                          for i, (spec, targets) in enumerate(groups)},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def quantization_config(fmt: PackFormat | str, model: torch.nn.Module, qweights: dict[str, QuantizedWeight],
                        scale_dtype: torch.dtype = torch.float16, activations: str | None = None) -> dict:
    """config.json `quantization_config` of a packed release of `model` (a meta-device skeleton is
    enough: compressed-tensors names the Linears it does not quantize) with these weights, and with
    `activations` (quantlib.actquant's a8/a4) the inputs' quantization (compressed-tensors only)."""
    fmt, groups = PackFormat(fmt), _spec_groups(qweights)
    if activations is not None and fmt is not PackFormat.COMPRESSED_TENSORS:
        raise ValueError(f"activation quantization ({activations}) is recorded by compressed-tensors releases only, "
                         f"not {fmt.value}")
    if fmt in _GPTQ_FORMATS:
        head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
        config = _gptq_config(groups[0][0], not all(trivial_g_idx(qw.g_idx, qw.scale.shape[1])
                                                    for qw in qweights.values()), fmt, head in qweights)
        return config | ({"dynamic": _gptq_dynamic(groups)} if len(groups) > 1 else {})
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if len(groups) == 1 and set(qweights) <= linears:  # the usual llm-compressor shape: all Linears but the ignored
        return _ct_config([(groups[0][0], ["Linear"])], sorted(linears - set(qweights)), scale_dtype, activations)
    # by name: mixed precision, or modules that are not nn.Linear (GPT-2 Conv1D, experts)
    return _ct_config(groups, sorted((linears - set(qweights)) if set(qweights) <= linears else []), scale_dtype,
                      activations)


def packed_release_tensors(model_dir: Path, qweights: dict[str, QuantizedWeight], fmt: PackFormat | str,
                           dtype: torch.dtype = torch.float16, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """Source tensors in `dtype` minus quantized weights, plus every quantized weight packed in `fmt`.
    A mixture-of-experts router keeps the source's precision (a rounding there flips routings)."""
    tensors = drop_quantized(_model_tensors(model_dir), qweights, model_dir, trust_remote_code)
    tensors = {k: v.to(dtype) if v.is_floating_point() and not is_router_tensor(k) else v for k, v in tensors.items()}
    for name, qw in qweights.items():
        tensors.update({f"{name}.{k}": v for k, v in pack_weight(qw, fmt, _scale_dtype(fmt, dtype)).items()})
    return tensors


def source_dtype(model_dir: Path) -> torch.dtype:
    """A packed release's float dtype: bfloat16 when the source model is bfloat16 (its range; float16
    would overflow where bf16 models keep large values), else float16, what GPTQ readers expect."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    return torch.bfloat16 if (raw.get("dtype") or raw.get("torch_dtype")) == "bfloat16" else torch.float16


def write_packed_release(out_dir: Path, model_dir: Path, qweights: dict[str, QuantizedWeight], info: dict,
                         fmt: PackFormat | str, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                         input_scales: dict[str, torch.Tensor] | None = None) -> None:
    """Write everything but MANIFEST.json of a packed release into out_dir; dtype None: source_dtype.
    GPTQ v1 shifts groups whose zero is 0 (`to_gptq_v1`); quantization.json counts the codes that moved,
    and the evaluate stage scores the release as written. Static activations (info["activations"]
    a8s / a4s) take every module's calibrated scale from input_scales (quantlib.actquant.input_scales),
    written as `<module>.input_scale` in the scales' dtype."""
    fmt, out_dir, model_dir = PackFormat(fmt), Path(out_dir), Path(model_dir)
    act = parse_activations(info.get("activations"))
    if act is not None and act.static and (missing := sorted(set(qweights) - set(input_scales or {}))):
        raise ValueError(f"static activations ({act.name}) need a calibrated input scale for every quantized module; "
                         f"none for {missing[0]} (quantlib.actquant.calibrate_static)")
    if fmt is PackFormat.GPTQ:
        converted = {name: to_gptq_v1(qw) for name, qw in qweights.items()}
        qweights = {name: qw for name, (qw, _) in converted.items()}
        info = info | {"gptq_v1_clipped_codes": sum(n for _, n in converted.values())}
    dtype = dtype or source_dtype(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with MODEL_CONSTRUCTION, torch.device("meta"):  # module names and types only, no memory
        skeleton = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code), trust_remote_code=trust_remote_code)
    qconfig = quantization_config(fmt, skeleton, qweights, _scale_dtype(fmt, dtype), info.get("activations"))
    tensors = packed_release_tensors(model_dir, qweights, fmt, dtype, trust_remote_code)
    if act is not None and act.static:
        tensors |= {f"{n}.input_scale": input_scales[n].reshape(1).to(_scale_dtype(fmt, dtype)) for n in qweights}
    atomic_save_safetensors(out_dir / "model.safetensors", tensors, metadata={"format": "pt"})
    (out_dir / "model.safetensors.sha256").unlink()  # the MANIFEST holds every hash of a release
    copy_model_files(model_dir, out_dir)
    raw = untied_config(json.loads((model_dir / "config.json").read_text()), qweights,
                        tied_head(model_dir, trust_remote_code))
    # `dtype` for transformers >= 4.56, `torch_dtype` for older readers
    raw.update(quantization_config=qconfig, dtype=_DTYPE_NAMES[dtype], torch_dtype=_DTYPE_NAMES[dtype])
    atomic_write_json(out_dir / "config.json", raw)
    if fmt in _GPTQ_FORMATS:
        atomic_write_json(out_dir / "quantize_config.json", qconfig)
    atomic_write_json(out_dir / "quantization.json", info | {"format": fmt.value, "modules": sorted(qweights)})


def _module_tensors(tensors: dict[str, torch.Tensor], name: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: tensors.pop(f"{name}.{k}") for k in keys if f"{name}.{k}" in tensors}


def _quantlinear(fmt: PackFormat, t: dict[str, torch.Tensor], bits: int, bias: torch.Tensor | None,
                 backend: str = "auto") -> QuantLinear:
    if fmt is PackFormat.GPTQ_V2:
        return QuantLinear.from_packed(t, bits, bias, backend)
    if fmt is PackFormat.GPTQ:
        qw, dtype = unpack_gptq(t, bits, v1=True), t["scales"].dtype
    else:
        qw, dtype = unpack_compressed_tensors(t, bits), t["weight_scale"].dtype
    return QuantLinear.from_packed(pack_gptq(qw, dtype), bits, bias, backend)  # the gptq_v2 layout it holds


def _served(module: QuantLinear, act: ActSpec | None, backend: str,
            input_scale: torch.Tensor | None) -> torch.nn.Module:
    """W8A8 (8-bit per-channel symmetric codes with a8 or a8s inputs) as an Int8Linear, integer weights
    times integer activations as a server runs them (the int8 Triton kernel on CUDA); anything else,
    or a QuantLinear-only backend (int4, int8: torch's weight-only CPU kernels), as it is."""
    if act is None or act.bits != 8 or backend not in INT8_BACKENDS or module.bits != 8 or module.scales.shape[0] != 1:
        return module
    if not symmetric_zeros(unpack_codes(module.qzeros, 8, module.out_features)):
        return module
    return Int8Linear.from_packed(module.state_dict(), module.bias, backend, input_scale)


def _act_spec(inputs: dict, release_dir: Path) -> ActSpec:
    """The ActSpec of a compressed-tensors input_activations entry; a scheme we cannot run is refused."""
    kind = (inputs.get("type"), bool(inputs.get("symmetric")), inputs.get("dynamic"), inputs.get("strategy"))
    if kind not in (("int", True, True, "token"), ("int", True, False, "tensor")):
        raise ValueError(f"{release_dir}: input_activations {inputs} is neither symmetric int dynamic per-token nor "
                         "static per-tensor, the activation schemes this loader runs")
    return ActSpec(inputs["num_bits"], static=inputs["dynamic"] is False)


def release_format(info: dict, qconfig: dict) -> PackFormat:
    """The layout of a release's tensors. For GPTQ the config's checkpoint format decides: releases
    written before v1 existed here say "gptq" in quantization.json and gptq_v2 in their config."""
    fmt = PackFormat(info["format"])
    if fmt in _GPTQ_FORMATS:
        return PackFormat(qconfig.get("format") or qconfig.get("checkpoint_format") or "gptq")
    return fmt


def load_packed_release(release_dir: str | Path, verify: bool = True, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False, backend: str = "auto"):
    """The causal LM of a packed release with QuantLinear modules (packed buffers, scales in their
    stored dtype; `backend` as QuantLinear's: "dense" for CPU decoding) in place of its quantized
    Linears; everything else in `dtype`."""
    release_dir = Path(release_dir)
    if verify and (bad := verify_manifest(release_dir)):
        raise_integrity(release_dir, bad)
    info = json.loads((release_dir / "quantization.json").read_text())
    config = AutoConfig.from_pretrained(release_dir, trust_remote_code=trust_remote_code)
    qconfig = config.quantization_config
    fmt = release_format(info, qconfig)
    gptq = fmt in _GPTQ_FORMATS
    del config.quantization_config  # from_config must build a plain model; we do the surgery
    with MODEL_CONSTRUCTION:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    from quantlib.adapters import get_adapter

    adapter = get_adapter(model)
    tensors, names = module_keyed(adapter, load_file(str(release_dir / "model.safetensors")), info["modules"])
    keys = _GPTQ_KEYS if gptq else _CT_KEYS
    inputs = None if gptq else qconfig["config_groups"]["group_0"].get("input_activations")
    act = None if inputs is None else _act_spec(inputs, release_dir)
    scales = {}
    if act is not None and act.static:
        if missing := [n for n in names if f"{n}.input_scale" not in tensors]:
            raise ValueError(f"{release_dir}: static input_activations, but no input_scale for {missing[0]}: "
                             "the release is incomplete; re-run its pack stage")
        scales = {n: tensors.pop(f"{n}.input_scale").float() for n in names}
    modules = {}
    for name in names:
        bias = tensors.pop(f"{name}.bias", None)
        bits = module_spec(qconfig, fmt, name, adapter.checkpoint_name(name))[0]
        modules[name] = _served(_quantlinear(fmt, _module_tensors(tensors, name, keys), bits,
                                             None if bias is None else bias.to(dtype), backend), act, backend,
                                scales.get(name))
    replace_modules(model, modules)
    if act is not None:  # an Int8Linear quantizes its own inputs
        attach(model, [n for n in names if not isinstance(modules[n], Int8Linear)], act, scales)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    quantized = {f"{n}.{k}" for n in names
                 for k in ("qweight", "qzeros", "scales", "g_idx", "bias", "weight", "weight_scale", "input_scale")}
    if unexpected or set(missing) - quantized - _tied(model):
        raise ValueError(f"{release_dir}: release does not match its config "
                         f"(missing {sorted(set(missing) - quantized - _tied(model))[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    return model
