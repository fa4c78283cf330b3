"""Which code made an artifact: a fingerprint of the sources, library versions, the git state.

- `code_fingerprint()`: sha256 over every .py file of the installed quantlib, tasks and flows
  packages (relative path + bytes). It is part of every cache key and of every release's lineage:
  two checkouts with the same sources share cache hits, and a release names the exact code.
- `library_versions()`: the versions of the libraries whose behaviour a result depends on, read
  from package metadata (nothing is imported). Also part of every cache key.
- `git_state(root)`: the commit and whether the *code* differs from it. Only CODE_PATHS count:
  dvc.lock, metrics/ and params.yaml change on every run and are recorded by hash elsewhere.
- `code_identity()`: the three together, as the release MANIFEST and the registry record them. The
  git state is the one of the checkout the code runs from (not of the project folder, which may be
  anywhere): the fingerprint proves the code either way.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["CODE_PACKAGES", "CODE_PATHS", "LIBRARIES", "code_fingerprint", "code_identity", "code_root", "git_state",
           "library_versions"]

CODE_PACKAGES = ("quantlib", "tasks", "flows")
# What makes a checkout "dirty": changes to these (relative to the project root) only.
CODE_PATHS = (*CODE_PACKAGES, "pyproject.toml", "dvc.yaml")
LIBRARIES = ("torch", "transformers", "triton", "safetensors", "prefect", "dvc", "mlflow", "lm_eval",
             "compressed-tensors", "gguf")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates without importing (tasks may not import flows)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} not found; install the project with `pip install -e .`")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of every .py file of quantlib, tasks and flows ("pkg/relpath" + bytes, sorted)."""
    h = hashlib.sha256()
    for name in CODE_PACKAGES:
        folder = _package_dir(name)
        for f in sorted(folder.rglob("*.py")):
            h.update(f"{name}/{f.relative_to(folder).as_posix()}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """{"python": "3.11.7", "torch": "2.13.0", ...}; a library that is not installed is "absent"."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _git(root: Path, *args: str) -> str | None:
    """stdout of `git -C root ARGS`, or None where git or the repository is missing."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # `git status` must not take index.lock
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, env=env,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: str | os.PathLike) -> dict[str, Any]:
    """{"git_commit": sha | None, "git_dirty": bool}: dirty iff a CODE_PATHS file under `root`
    differs from the commit or is untracked (outside git: commit None, dirty False)."""
    root = Path(root)
    head = _git(root, "rev-parse", "--verify", "HEAD")
    if not head:
        return {"git_commit": None, "git_dirty": False}
    # Every code path, present or not: a deleted tracked package is a change (git accepts a
    # pathspec that matches nothing).
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS)
    dirty = any(line.strip() and "__pycache__" not in line and not line.rstrip().endswith(".pyc")
                for line in (status or "").splitlines())
    return {"git_commit": head.strip(), "git_dirty": dirty}


def code_root() -> Path:
    """The folder holding the running quantlib/tasks/flows packages (a checkout, or site-packages)."""
    return _package_dir("flows").parent


def code_identity(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"fingerprint", "versions", "git_commit", "git_dirty"} of the code running now; the git state
    is that of `root` (default: the checkout the code runs from, wherever the project lives)."""
    return {"fingerprint": code_fingerprint(), "versions": library_versions(),
            **git_state(code_root() if root is None else root)}
