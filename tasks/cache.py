"""Content-hash cache keys for Prefect tasks, and the project-local cache folders.

A key is sha256 over: the task name, a fingerprint of the code it runs (quantlib + tasks sources, so a
library change invalidates it: Prefect's TASK_SOURCE would only hash the task function), and the
task's *declared* key inputs — file hashes, configs, indices — never pickled tensors or models.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import quantlib

__all__ = ["code_fingerprint", "stable_hash", "plain", "key_fn", "CACHE_DIR"]

CACHE_DIR = ".cache/ptq"  # relative to the project root; gitignored, outside every DVC out


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of every .py file of quantlib and tasks (path + bytes), sorted."""
    h = hashlib.sha256()
    for pkg in (Path(quantlib.__file__).parent, Path(__file__).parent):
        for f in sorted(pkg.rglob("*.py")):
            h.update(f"{pkg.name}/{f.relative_to(pkg)}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


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


def key_fn(*names: str) -> Callable[[Any, dict], str]:
    """A Prefect cache_key_fn hashing only the named parameters (+ task name + code fingerprint)."""

    def fn(context: Any, parameters: dict) -> str:
        task_name = getattr(getattr(context, "task", None), "name", "task")
        return stable_hash({"task": task_name, "code": code_fingerprint(),
                            "inputs": {n: parameters[n] for n in names}})

    return fn
