"""The release folder (pack stage) and loading it back as a dense model for evaluation.

Layout (format `ptq-codes-v1`; the packed GPTQ / compressed-tensors formats build on the same codes):
  model.safetensors   every tensor of the source model except the quantized Linears' weights, plus
                      for each quantized Linear NAME: NAME.qweight (uint8 codes, (out, in)),
                      NAME.scale / NAME.zero ((out, G) fp32), NAME.g_idx ((in,) int32), NAME.spec
  config.json, generation_config.json, tokenizer files   copied from the source model folder
  quantization.json   method, scheme, quantized module names, format
  MANIFEST.json       sha256 of every file + the inputs and lineage it was made from
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from quantlib.actquant import attach, parse_activations, scales_from_json, scales_to_json
from quantlib.adapters import get_adapter
from quantlib.qweight import QuantizedWeight

from .io import atomic_save_safetensors, atomic_write_json, load_safetensors_verified, verify_manifest
from .sources import MODEL_CONSTRUCTION

__all__ = ["RELEASE_FORMAT", "write_release_files", "static_input_scales", "load_release", "release_weights", "drop_quantized", "tied_head",
           "untied_config"]

RELEASE_FORMAT = "ptq-codes-v1"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def _model_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def drop_quantized(tensors: dict[str, torch.Tensor], qweights: dict[str, QuantizedWeight], model_dir: Path,
                   trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """`tensors` without the FP weight of each quantized module. A quantized LM head tied to the input
    embeddings has no weight of its own in the source files: the embeddings stay, as they are."""
    tied = tied_head(model_dir, trust_remote_code)
    for name in qweights:
        if f"{name}.weight" in tensors:
            del tensors[f"{name}.weight"]
        elif name != tied:
            raise ValueError(f"quantized module {name} has no weight in {model_dir}; wrong source model?")
    return tensors


def checkpoint_keyed(qweights: dict[str, QuantizedWeight], model_dir: Path,
                     trust_remote_code: bool = False) -> dict[str, QuantizedWeight]:
    """`qweights` keyed by the module names of the source's checkpoint files, which a release keeps:
    a mixture-of-experts family may name its expert Linears differently (quantlib.moe)."""
    from quantlib.adapters import FAMILIES
    from quantlib.moe import checkpoint_name

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    moe = getattr(FAMILIES.get(getattr(config, "model_type", None)), "moe", None)
    return {checkpoint_name(moe.renames if moe else (), n): qw for n, qw in qweights.items()}


def module_keyed(adapter, tensors: dict[str, torch.Tensor], modules: list[str]) -> tuple[dict, list[str]]:
    """A release's checkpoint-named tensors and module list in the names of the model's modules."""
    return {adapter.module_name(k): v for k, v in tensors.items()}, [adapter.module_name(n) for n in modules]


def tied_head(model_dir: Path, trust_remote_code: bool = False) -> str | None:
    """The LM head's module name if the model ties it to the input embeddings, else None."""
    from quantlib.adapters import FAMILIES

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    family = FAMILIES.get(getattr(config, "model_type", None))
    return (family.head if family else "lm_head") if getattr(text, "tie_word_embeddings", False) else None


def untied_config(raw: dict, qweights: dict[str, QuantizedWeight], head: str | None) -> dict:
    """config.json of a release: a quantized tied head is stored on its own, so the release unties it."""
    if head is None or head not in qweights:
        return raw
    raw = dict(raw, tie_word_embeddings=False)
    if isinstance(raw.get("text_config"), dict):
        raw["text_config"] = dict(raw["text_config"], tie_word_embeddings=False)
    return raw


def release_weights(model_dir: Path, qweights: dict[str, QuantizedWeight],
                    trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """Source tensors minus quantized weights, plus the codes of every quantized Linear."""
    tensors = drop_quantized(_model_tensors(model_dir), qweights, model_dir, trust_remote_code)
    for name, qw in qweights.items():
        tensors.update(qw.state_dict(name))
    return tensors


def write_release_files(out_dir: Path, model_dir: Path, qweights: dict[str, QuantizedWeight], info: dict,
                        fmt: str = RELEASE_FORMAT, trust_remote_code: bool = False, gguf_type: str = "exact",
                        input_scales: dict[str, torch.Tensor] | None = None) -> None:
    """Write everything but MANIFEST.json into out_dir (which must be empty), in format `fmt`:
    RELEASE_FORMAT, a packed format of tasks.release_formats (`gptq`, `compressed-tensors`) or `gguf`
    (with `gguf_type`, quantlib.gguf_k.GGUF_TYPES). `qweights` (and a static activation scheme's
    `input_scales`, static_input_scales) are keyed by module names; quantization.json records the
    scales too ({name: float}, what a RELEASE_FORMAT loader reads)."""
    if input_scales:
        info = info | {"input_scales": scales_to_json(input_scales)}
        input_scales = checkpoint_keyed(input_scales, model_dir, trust_remote_code)
    qweights = checkpoint_keyed(qweights, model_dir, trust_remote_code)
    if info.get("activations") and fmt not in (RELEASE_FORMAT, "compressed-tensors"):
        raise ValueError(f"activation quantization ({info['activations']}) is recorded by compressed-tensors and "
                         f"{RELEASE_FORMAT} releases only, not {fmt}; write pack.format: compressed-tensors")
    if fmt == "gguf":
        from .gguf_release import write_gguf_release
        from .release_formats import source_dtype

        return write_gguf_release(out_dir, model_dir, qweights, info, source_dtype(model_dir), trust_remote_code,
                                  gguf_type)
    if fmt != RELEASE_FORMAT:
        from .release_formats import write_packed_release

        return write_packed_release(out_dir, model_dir, qweights, info, fmt, trust_remote_code=trust_remote_code,
                                    input_scales=input_scales)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out_dir / "model.safetensors", release_weights(model_dir, qweights, trust_remote_code),
                            metadata={"format": RELEASE_FORMAT})
    (out_dir / "model.safetensors.sha256").unlink()  # the MANIFEST holds every hash of a release
    copy_model_files(model_dir, out_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    atomic_write_json(out_dir / "config.json", untied_config(raw, qweights, tied_head(model_dir, trust_remote_code)))
    atomic_write_json(out_dir / "quantization.json",
                      info | {"format": RELEASE_FORMAT, "modules": sorted(qweights)})


@torch.no_grad()
def static_input_scales(model_dir: Path, qweights: dict[str, QuantizedWeight], calib: torch.Tensor, activations: str,
                        dtype: torch.dtype = torch.float32, batch_size: int = 8,
                        trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """{module name: its static input scale}: the source model with the quantized weights in place,
    run on the calibration ids (N, T) in batches (quantlib.actquant.calibrate_static)."""
    from quantlib.actquant import calibrate_static

    from .qat import apply_quantized
    from .sources import load_model

    model = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    apply_quantized(model, qweights)
    return calibrate_static(model, sorted(qweights), calib.split(batch_size), parse_activations(activations))


def copy_model_files(model_dir: Path, out_dir: Path) -> None:
    """Config, tokenizer and a remote-code model's own .py files (what trust_remote_code loads)."""
    for name in [*_COPY, *sorted(p.name for p in model_dir.glob("*.py"))]:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)


def load_release(release_dir: str | Path, verify: bool = True, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False):
    """A causal LM of a release: for RELEASE_FORMAT a dense model whose quantized Linears hold their
    dequantized weights; for a packed format (gptq, compressed-tensors) QuantLinear modules."""
    release_dir = Path(release_dir)
    if verify and (bad := verify_manifest(release_dir)):
        raise_integrity(release_dir, bad)
    info = json.loads((release_dir / "quantization.json").read_text())
    from .release_formats import PACKED_FORMATS, load_packed_release

    if info.get("format") in PACKED_FORMATS:  # QuantLinear modules, dequantizing on the fly
        return load_packed_release(release_dir, verify=False, dtype=dtype, trust_remote_code=trust_remote_code)
    if info.get("format") == "gguf":  # transformers' GGUF reader, dequantized at load
        from .gguf_release import load_gguf_release

        return load_gguf_release(release_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    if info.get("format") != RELEASE_FORMAT:
        raise ValueError(f"{release_dir}: unsupported release format {info.get('format')!r}")
    config = AutoConfig.from_pretrained(release_dir, trust_remote_code=trust_remote_code)
    with MODEL_CONSTRUCTION:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    adapter = get_adapter(model)
    tensors, modules = module_keyed(adapter, load_file(str(release_dir / "model.safetensors")), info["modules"])
    for name in modules:
        qw = QuantizedWeight.from_state_dict(tensors, name)
        adapter.set_weight(model.get_submodule(name), qw.dequantize())
        for suffix in ("qweight", "scale", "zero", "g_idx", "spec"):
            del tensors[f"{name}.{suffix}"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    expected_missing = {f"{n}.weight" for n in modules} | _tied(model)
    if unexpected or set(missing) - expected_missing:
        raise ValueError(f"{release_dir}: release does not match its config "
                         f"(missing {sorted(set(missing) - expected_missing)[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    if info.get("activations"):  # the inputs of the quantized modules too (quantlib.actquant)
        attach(model, modules, parse_activations(info["activations"]), scales_from_json(info.get("input_scales", {})))
    return model


def _tied(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if not isinstance(keys, dict) else keys.keys())


def raise_integrity(folder: Path, bad: list[str]) -> None:
    from .io import IntegrityError

    raise IntegrityError(f"{folder}: files differ from MANIFEST.json: {', '.join(bad)}")
