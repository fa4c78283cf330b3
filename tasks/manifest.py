"""The release MANIFEST.json: what a release folder holds and what made it (no MLflow, no git calls).

Format RELEASE_MANIFEST_FORMAT, written by the pack stage with `build_release_manifest`::

    {"format": "ptq-release-manifest/2",
     "files":  {relpath: sha256},                every file of the folder but MANIFEST.json
     "params": {section: {key: value}},          the params of every stage that made the release
     "params_sha256": params_digest(params),
     "chain":  {"source": {...},                 identity of the model source (spec, kind, ...)
                "model": sha256 of data/model/MANIFEST.json,
                "calib": sha256 of the calibration token ids,
                "eval": {name: sha256 of the evaluation token ids},
                "quantized": sha256 of the block-wise quantized state,
                "qat": sha256 of the (optionally QAT-refined) quantized state},
     "code":   {"fingerprint": str, "versions": {lib: version},      tasks.codeid.code_identity
                "git_commit": str | null, "git_dirty": bool}}

Nothing in it depends on when, where or how fast the release was made (no timings, dates, hosts,
cached flags): equal inputs give a byte-identical file, so its sha256 names the release.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io import MANIFEST_NAME, IntegrityError, atomic_write_json, escaping_paths_problem, sha256_bytes, sha256_file

__all__ = [
    "CHAIN_KEYS",
    "CODE_KEYS",
    "MANIFEST_KEYS",
    "RELEASE_MANIFEST_FORMAT",
    "build_release_manifest",
    "params_digest",
    "read_release_manifest",
    "release_files",
    "validate_release_manifest",
]

RELEASE_MANIFEST_FORMAT = "ptq-release-manifest/2"
MANIFEST_KEYS = ("format", "files", "params", "params_sha256", "chain", "code")
CHAIN_KEYS = ("source", "model", "calib", "eval", "quantized", "qat")
CODE_KEYS = ("fingerprint", "versions", "git_commit", "git_dirty")
_CHAIN_HASHES = ("model", "calib", "quantized", "qat")  # chain keys whose value is one sha256
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of `params` as canonical JSON (sorted keys, no spaces, UTF-8): equal params, equal digest."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256_bytes(text.encode("utf-8"))


def release_files(release_dir: str | os.PathLike) -> dict[str, str]:
    """{relpath (posix): sha256} of every file under `release_dir` except its top MANIFEST.json."""
    folder = Path(release_dir)
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {rel: sha256_file(folder / rel) for rel in rels if rel != MANIFEST_NAME}


# ----------------------------------------------------------------------------------- validation


def _keys_problem(what: str, got: Any, expected: tuple[str, ...]) -> str | None:
    if not isinstance(got, Mapping):
        return f"{what}: expected an object with keys {list(expected)}, got {type(got).__name__}"
    missing = [k for k in expected if k not in got]
    unknown = sorted(str(k) for k in got if k not in expected)
    if missing or unknown:
        return f"{what}: missing keys {missing}, unknown keys {unknown} (expected {list(expected)})"
    return None


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.match(value) is not None


def _hash_map_problem(what: str, value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return f"{what}: expected {{name: sha256}}, got {type(value).__name__}"
    bad = sorted(str(k) for k, v in value.items() if not isinstance(k, str) or not _is_sha(v))
    return f"{what}: not a sha256 for {bad}" if bad else None


def _chain_problems(chain: Any) -> list[str]:
    problem = _keys_problem("chain", chain, CHAIN_KEYS)
    if problem:
        return [problem]
    problems = [f"chain.{k}: expected a sha256, got {chain[k]!r}" for k in _CHAIN_HASHES if not _is_sha(chain[k])]
    if not isinstance(chain["source"], Mapping):
        problems.append(f"chain.source: expected an object, got {type(chain['source']).__name__}")
    problems.append(_hash_map_problem("chain.eval", chain["eval"]))
    return [p for p in problems if p]


def _code_problems(code: Any) -> list[str]:
    problem = _keys_problem("code", code, CODE_KEYS)
    if problem:
        return [problem]
    problems = []
    if not isinstance(code["fingerprint"], str) or not code["fingerprint"]:
        problems.append(f"code.fingerprint: expected a non-empty string, got {code['fingerprint']!r}")
    versions = code["versions"]
    if not isinstance(versions, Mapping) or not all(isinstance(v, str) for v in versions.values()):
        problems.append(f"code.versions: expected {{library: version text}}, got {versions!r}")
    if code["git_commit"] is not None and not isinstance(code["git_commit"], str):
        problems.append(f"code.git_commit: expected a string or null, got {code['git_commit']!r}")
    if not isinstance(code["git_dirty"], bool):
        problems.append(f"code.git_dirty: expected true or false, got {code['git_dirty']!r}")
    return problems


def _params_problems(params: Any) -> list[str]:
    if not isinstance(params, Mapping):
        return [f"params: expected {{section: {{key: value}}}}, got {type(params).__name__}"]
    bad = sorted(str(k) for k, v in params.items() if not isinstance(k, str) or not isinstance(v, Mapping))
    return [f"params: sections {bad} are not {{key: value}} objects"] if bad else []


def _manifest_problems(manifest: Any) -> list[str]:
    if isinstance(manifest, Mapping) and manifest.get("format") != RELEASE_MANIFEST_FORMAT:
        return [f"format {manifest.get('format')!r} is not {RELEASE_MANIFEST_FORMAT!r} (re-run the pack stage)"]
    problem = _keys_problem("MANIFEST", manifest, MANIFEST_KEYS)
    if problem:
        return [problem]
    problems = [_hash_map_problem("files", manifest["files"]), escaping_paths_problem(manifest["files"])]
    if not _is_sha(manifest["params_sha256"]):
        problems.append(f"params_sha256: expected a sha256, got {manifest['params_sha256']!r}")
    problems += _params_problems(manifest["params"]) + _chain_problems(manifest["chain"])
    problems += _code_problems(manifest["code"])
    return [p for p in problems if p]


def validate_release_manifest(manifest: Any, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """Return `manifest` if it has the v2 layout (keys and value types), else raise IntegrityError
    naming `where` and every problem. Whether the hashes hold is the audit's business."""
    problems = _manifest_problems(manifest)
    if problems:
        raise IntegrityError(f"{where}: not a valid {RELEASE_MANIFEST_FORMAT}: {'; '.join(problems)}")
    return dict(manifest)


# ------------------------------------------------------------------------------------ read, write


def read_release_manifest(release_dir: str | os.PathLike) -> dict[str, Any]:
    """The validated MANIFEST.json of `release_dir`.

    FileNotFoundError if it is absent; IntegrityError naming the file and the problem if it is not
    UTF-8 JSON or not the v2 layout.
    """
    path = Path(release_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {release_dir} is not a packed release")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path}: not valid JSON ({e})") from e
    return validate_release_manifest(manifest, str(path))


def _plain_json(what: str, value: Any) -> Any:
    """`value` as the JSON round trip will read it back (tuples become lists); ValueError if it is
    not JSON (NaN, sets, objects...)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False, ensure_ascii=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"build_release_manifest: {what} is not plain JSON: {e}") from e


def build_release_manifest(
    release_dir: str | os.PathLike,
    *,
    params: Mapping[str, Mapping[str, Any]],
    chain: Mapping[str, Any],
    code: Mapping[str, Any],
) -> dict[str, Any]:
    """Hash every file of `release_dir`, write its MANIFEST.json atomically and return it.

    `params`: {section: {key: value}} of every stage that made the release; `chain`: exactly
    CHAIN_KEYS; `code`: exactly CODE_KEYS (`tasks.codeid.code_identity(root)`). A missing or
    unknown key, or a value of the wrong type, is a ValueError naming it; nothing is written then.
    """
    folder = Path(release_dir)
    if not folder.is_dir():
        raise NotADirectoryError(f"build_release_manifest: {folder} is not a directory")
    params, chain, code = (_plain_json(w, v) for w, v in (("params", params), ("chain", chain), ("code", code)))
    problems = _params_problems(params) + _chain_problems(chain) + _code_problems(code)
    if problems:
        raise ValueError(f"build_release_manifest: {'; '.join(problems)}")
    manifest = {
        "format": RELEASE_MANIFEST_FORMAT,
        "files": release_files(folder),
        "params": params,
        "params_sha256": params_digest(params),
        "chain": chain,
        "code": code,
    }
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return manifest
