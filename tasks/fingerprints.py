"""Content identities of the pipeline's external inputs (the model source, the text sources),
computed without loading a model: what data/inputs.json records and the cache keys use."""
from __future__ import annotations

from pathlib import Path

from .cache import stable_hash
from .io import sha256_bytes, sha256_file
from .specs import ModelSource, builtin_gguf_path
from .textdata import calibration_parts, load_text, parse_text_source, resolve_mirror

__all__ = ["source_fingerprint", "text_fingerprint"]


def source_fingerprint(source: ModelSource) -> str:
    """What identifies the source's content before loading it: "<kind>:<hash>", file hashes where
    they exist (a GGUF file, every file of a local folder), the pinned spec for the Hub."""
    if source.kind == "builtin":
        return f"builtin:{sha256_file(builtin_gguf_path(source.name)[0])}"
    if source.kind == "gguf":
        return f"gguf:{sha256_file(source.path)}"
    if source.kind == "local":
        folder = Path(source.path)
        return "local:" + stable_hash({p.relative_to(folder).as_posix(): sha256_file(p)
                                       for p in sorted(folder.rglob("*")) if p.is_file()})
    return source.spec  # hf:ORG/NAME@REV: the pinned revision is the identity


def text_fingerprint(spec: str, mirror: str | None) -> str:
    parts = calibration_parts(spec)
    if len(parts) > 1:  # a joined calibration spec: its sources' fingerprints, in order
        return sha256_bytes(" ".join(text_fingerprint(p, mirror) for p in parts).encode())
    source = parse_text_source(spec)
    if source.path is not None:
        return sha256_file(source.path)
    return sha256_bytes(load_text(source, resolve_mirror(mirror)).encode())
