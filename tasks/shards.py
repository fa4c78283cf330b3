"""Activation shards: a folder of batch_NNNNN.safetensors files (quantlib.ActivationStore layout)
plus SHARD.json with each file's sha256. A shard's identity is the sha256 of its SHARD.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from quantlib.activations import ActivationStore

from .io import IntegrityError, atomic_write_json, sha256_bytes, sha256_file

__all__ = ["seal_shard", "open_shard", "shard_ok"]

_INDEX = "SHARD.json"


def seal_shard(tmp_dir: Path, final_dir: Path, store: ActivationStore | None = None) -> str:
    """Index the batch files written into tmp_dir, then move it to final_dir; an intact final_dir
    with the same content is kept (a shared storage root), any other one replaced. Returns the shard hash. `store`: the ActivationStore that wrote them, whose digests of
    the bytes it wrote spare reading the files back (they are hashed here otherwise)."""
    files = ActivationStore.open(tmp_dir).files()
    digests = None if store is None else store.file_digests()
    if digests is None or store.files() != files:  # not the writer of exactly these files
        digests = [sha256_file(f) for f in files]
    atomic_write_json(tmp_dir / _INDEX, {"batches": digests})
    sha = sha256_bytes((tmp_dir / _INDEX).read_bytes())
    if final_dir.exists():
        if shard_ok(final_dir, sha):  # the same content sealed by another writer sharing the storage root:
            shutil.rmtree(tmp_dir)  # keep theirs (a reader may have it open), drop ours
            return sha
        shutil.rmtree(final_dir)  # a corrupted or different leftover
    try:
        tmp_dir.rename(final_dir)
    except OSError:  # another writer renamed its copy in between
        if not shard_ok(final_dir, sha):
            raise
        shutil.rmtree(tmp_dir)
    return sha


def shard_ok(folder: Path, sha: str) -> bool:
    """True if the shard exists and every file matches its recorded hash."""
    try:
        _verify(folder, sha)
        return True
    except (IntegrityError, FileNotFoundError):
        return False


def _verify(folder: Path, sha: str) -> ActivationStore:
    index = folder / _INDEX
    if not index.is_file():
        raise FileNotFoundError(f"activation shard {folder} is missing")
    if sha256_bytes(index.read_bytes()) != sha:
        raise IntegrityError(f"activation shard {folder}: index hash differs from the recorded {sha[:12]}")
    store = ActivationStore.open(folder)
    expected = json.loads(index.read_text())["batches"]
    files = store.files()
    if len(files) != len(expected):
        raise IntegrityError(f"activation shard {folder}: {len(files)} batch files, index lists {len(expected)}")
    for f, digest in zip(files, expected):
        if sha256_file(f) != digest:
            raise IntegrityError(f"activation shard file {f} is corrupted (sha256 mismatch)")
    return store


def open_shard(folder: Path, sha: str, in_memory: bool) -> ActivationStore:
    """Verified store over the shard: streamed from disk, or loaded into CPU memory."""
    store = _verify(folder, sha)
    return store.in_memory() if in_memory else store
