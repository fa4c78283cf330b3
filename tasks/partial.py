"""Load only what one task needs from a materialized model folder.

A task addressed by (model folder, block index) must not load the whole model: on a 70B model that
is 140 GB per task. `open_skeleton` builds the model with every block's parameters on the meta
device (no memory) and reads the rest (embeddings, final norm, head) from the safetensors files by
tensor name; `blocks_loaded` reads the parameters of the blocks a task works on and drops them again
afterwards. Buffers (rotary tables, masks) are computed at construction, as in from_pretrained.

Integrity: the folder's MANIFEST.json must hash to the `model_sha` the task was given (its identity
in every cache key), and each weight file is checked against the MANIFEST once per process (by
size and mtime), so a worker never computes on a model other than the one its key names.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .io import MANIFEST_NAME, IntegrityError, read_manifest, sha256_file

__all__ = ["Skeleton", "meta_model", "open_skeleton", "blocks_loaded"]

_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 checked this process
_lock = threading.Lock()


class Skeleton:
    """A causal LM whose blocks are on the meta device until loaded, plus where its tensors live."""

    def __init__(self, model: nn.Module, folder: Path, files: dict[str, str], prefix: str, dtype: torch.dtype) -> None:
        self.model, self.folder, self.files, self.prefix, self.dtype = model, folder, files, prefix, dtype

    def block_keys(self, index: int) -> list[str]:
        head = f"{self.prefix}.{index}."
        return [k for k in self.files if k.startswith(head)]


def _weight_files(folder: Path) -> dict[str, str]:
    """tensor name -> safetensors file name (relative), from the index or from the files' headers."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names:
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files; materialize the model again")
    files = {}
    for name in names:
        with safe_open(str(folder / name), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), name))
    return files


def _check_identity(folder: Path, model_sha: str, rels: set[str]) -> None:
    """The MANIFEST is the one the cache key names, and every weight file to be read matches it."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file() or sha256_file(manifest_path) != model_sha:
        raise IntegrityError(f"{folder}: {MANIFEST_NAME} does not hash to the model_sha {model_sha[:12]} the task "
                             "was given; the model folder changed: run the fetch_model stage again")
    listed = read_manifest(folder)["files"]
    for rel in sorted(rels):
        path = folder / rel
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with _lock:
            known = _verified.get(key)
        if known == listed.get(rel):
            continue
        digest = sha256_file(path)
        if digest != listed.get(rel):
            raise IntegrityError(f"{path}: sha256 differs from {MANIFEST_NAME}; the weights were modified or "
                                 "partially copied: materialize the model again")
        with _lock:
            _verified[key] = digest


def _read(sk: Skeleton, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(sk.files[k], []).append(k)
    out = {}
    for rel, names in by_file.items():
        with safe_open(str(sk.folder / rel), framework="pt") as f:
            for k in names:
                t = f.get_tensor(k)
                out[k] = t.to(sk.dtype) if t.is_floating_point() else t
    return out


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put each tensor in place of the (meta or loaded) parameter or buffer of that checkpoint name
    (a mixture-of-experts model's experts are per-expert Linears: quantlib.moe)."""
    from quantlib.adapters import get_adapter

    adapter = get_adapter(model)
    for ckpt_name, t in tensors.items():
        name = adapter.module_name(ckpt_name)
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(t, requires_grad=module._parameters[attr].requires_grad)
        elif attr in module._buffers:
            module._buffers[attr] = t
        else:
            raise IntegrityError(f"checkpoint tensor {ckpt_name!r} has no place in {type(model).__name__}; the folder "
                                 "was not written by save_pretrained of this architecture")


def _blocks_prefix(model: nn.Module) -> str:
    from quantlib.adapters import get_adapter

    return get_adapter(model).family.layers


def meta_model(folder: str | os.PathLike, trust_remote_code: bool = False) -> nn.Module:
    """The model of `folder` entirely on the meta device: shapes and structure, no memory, no reads."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .sources import MODEL_CONSTRUCTION, _check_causal_lm

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    _check_causal_lm(config, str(folder))
    with MODEL_CONSTRUCTION, init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).eval()


def open_skeleton(folder: str | os.PathLike, model_sha: str, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False) -> Skeleton:
    """The model of `folder` with every non-block tensor loaded and every block on the meta device."""
    folder = Path(folder)
    model = meta_model(folder, trust_remote_code)
    files = _weight_files(folder)
    prefix = _blocks_prefix(model)
    sk = Skeleton(model.eval(), folder, files, prefix, dtype)
    rest = [k for k in files if not k.startswith(prefix + ".")]
    _check_identity(folder, model_sha, {files[k] for k in rest})
    _assign(model, _read(sk, rest))
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.is_meta and not name.startswith(prefix + "."):
            raise IntegrityError(f"{folder}: no tensor for {name!r} in the weight files; materialize the model again")
    return sk


def _drop(sk: Skeleton, index: int) -> None:
    """Back to meta: every parameter of the block is replaced by a meta tensor of its shape."""
    block = sk.model.get_submodule(f"{sk.prefix}.{index}")
    for module in block.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and not p.is_meta:
                module._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


@contextmanager
def blocks_loaded(sk: Skeleton, indices: Sequence[int], model_sha: str) -> Iterator[nn.Module]:
    """The skeleton with the parameters of blocks `indices` read from disk; on exit they return to
    the meta device, whatever the task did to them (quantized weights are never seen by a later task)."""
    keys = [k for i in indices for k in sk.block_keys(i)]
    _check_identity(sk.folder, model_sha, {sk.files[k] for k in keys})
    try:
        _assign(sk.model, _read(sk, keys))
        for i in indices:
            for name, p in sk.model.get_submodule(f"{sk.prefix}.{i}").named_parameters():
                if p.is_meta:
                    raise IntegrityError(f"{sk.folder}: no tensor for block {i} parameter {name!r} in the weight "
                                         "files; materialize the model again")
        yield sk.model
    finally:
        for i in indices:
            _drop(sk, i)
