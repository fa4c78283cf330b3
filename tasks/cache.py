"""Content-hash cache keys for Prefect tasks, and the project-local cache folders.

A key is sha256 over: the task name, the code fingerprint (quantlib + tasks + flows sources, so a
library change invalidates it: Prefect's TASK_SOURCE would only hash the task function), the
versions of the libraries that produce the result (torch, transformers, ...), and the task's
*declared* key inputs — content hashes, configs, indices. Never a path (two checkouts or two hosts
share hits), never pickled tensors or models.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

from .codeid import code_fingerprint, library_versions

__all__ = ["code_fingerprint", "stable_hash", "plain", "key_fn", "CACHE_DIR"]

CACHE_DIR = ".cache/ptq"  # relative to the project root; gitignored, outside every DVC out


def plain(v: Any) -> Any:
    if is_dataclass(v) and not isinstance(v, type):
        return {"__type__": type(v).__name__, **{k: plain(x) for k, x in asdict(v).items()}}
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"cannot hash {type(v).__name__} into a cache key; pass a content hash instead")


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()


def _no_paths(name: str, value: Any) -> None:
    """Cache keys must not depend on where the project lives: refuse Path values and absolute paths."""
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith(("/", "\\")) and len(value) > 1):
        raise ValueError(f"cache key input {name!r} is a path ({value}); key on its content hash instead")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_paths(f"{name}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _no_paths(f"{name}[{i}]", v)


def key_fn(*names: str) -> Callable[[Any, dict], str]:
    """A Prefect cache_key_fn hashing only the named parameters (+ task name, code fingerprint and
    library versions). A named parameter holding an absolute path is an error."""

    def fn(context: Any, parameters: dict) -> str:
        task_name = getattr(getattr(context, "task", None), "name", "task")
        inputs = {n: parameters[n] for n in names}
        for n, v in inputs.items():
            _no_paths(n, plain(v))
        return stable_hash({"task": task_name, "code": code_fingerprint(), "libs": library_versions(),
                            "inputs": inputs})

    return fn
