"""Registered releases: a release folder as an MLflow model version, with its lineage as tags.

The registry holds no executable code: a version's source is the release folder, logged as the
plain run artifact "release" (MANIFEST.json at its top, no MLmodel, no Python). Downloading the
version's artifacts gives back the release folder, which `tasks.lineage.audit` verifies.

Tags (on the version and on the run that registered it), all derived from the release MANIFEST:
TAG_RELEASE_MANIFEST (sha256 of MANIFEST.json, which pins every file), the code identity, the
params digest and the chain hashes; see `manifest_tags`. A version that did not take the alias
carries TAG_GATE with the reason.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .faults import failpoint
from .io import MANIFEST_NAME, IntegrityError, sha256_bytes, sha256_file
from .manifest import params_digest, read_release_manifest, release_files
from .mlflow_runs import Tracker, slug, tag_value

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "LINEAGE_TAGS",
    "RELEASE_ARTIFACT",
    "TAG_CHAIN_PREFIX",
    "TAG_CODE_FINGERPRINT",
    "TAG_GATE",
    "TAG_GIT_COMMIT",
    "TAG_GIT_DIRTY",
    "TAG_PARAMS",
    "TAG_RELEASE_MANIFEST",
    "TAG_VERSIONS",
    "Registration",
    "manifest_tags",
    "register_release",
    "release_discrepancies",
    "release_model_name",
    "release_tags",
]

TAG_RELEASE_MANIFEST = "ptq.release_manifest_sha256"
TAG_CODE_FINGERPRINT = "ptq.code_fingerprint"
TAG_GIT_COMMIT = "ptq.git_commit"
TAG_GIT_DIRTY = "ptq.git_dirty"
TAG_VERSIONS = "ptq.versions"  # JSON text {library: version}
TAG_PARAMS = "ptq.params_sha256"
TAG_CHAIN_PREFIX = "ptq.chain."  # + model, calib, quantized, qat (sha256); eval, source (JSON text)
TAG_GATE = "ptq.gate"  # on a version that did not take the alias: why
# Every tag that records the release's lineage (a null git commit has no tag).
LINEAGE_TAGS = (
    TAG_CODE_FINGERPRINT, TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_VERSIONS, TAG_PARAMS,
    *(TAG_CHAIN_PREFIX + k for k in ("source", "model", "calib", "eval", "quantized", "qat")),
)
_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"  # run-only: shown by the MLflow UI
RELEASE_ARTIFACT = "release"  # run artifact path of the release folder
_MAX_TAG_TEXT = 5000  # longer JSON tags are stored as "sha256:<digest>" (run tags stop at 8000)


@dataclass(frozen=True)
class Registration:
    """What `register_release` did: the version holding the release, whether it was created now
    (False: the same MANIFEST was registered before), whether `alias` now points at it, and the
    reason recorded when it did not move."""

    name: str
    version: int
    new: bool
    alias_moved: bool
    reason: str


def release_model_name(source_spec: str, scheme_name: str) -> str:
    """Registered model name `ptq-<model>-<scheme>`: the spec's last path part, lowercased, with
    anything but letters, digits, '.', '_' and '-' turned into '-' (MLflow forbids '/' and ':').

    `hf:Org/Name@rev` -> `name`; `/models/llama.gguf` -> `llama`; `smollm2-135m` as is.
    """
    spec = source_spec.strip().removeprefix("hf:").split("@", 1)[0].rstrip("/\\")
    model = slug(re.split(r"[/\\]", spec)[-1].removesuffix(".gguf"))[:100] or "model"
    scheme = slug(scheme_name)
    if not scheme:
        raise ValueError(f"release_model_name: empty scheme name {scheme_name!r}")
    return f"ptq-{model}-{scheme}"


# ------------------------------------------------------------------------------------------ tags


def _json_tag(value: Mapping[str, Any]) -> str:
    text = tag_value(value)  # compact sorted JSON
    return text if len(text) <= _MAX_TAG_TEXT else "sha256:" + sha256_bytes(text.encode("utf-8"))


def manifest_tags(manifest: Mapping[str, Any], manifest_sha256: str) -> dict[str, str]:
    """Tags naming a release, from its (validated) MANIFEST and the MANIFEST's sha256.

    git_commit null is left out (no tag); `mlflow.source.git.commit` is for runs only.
    """
    code, chain = manifest["code"], manifest["chain"]
    tags = {
        TAG_RELEASE_MANIFEST: manifest_sha256,
        TAG_CODE_FINGERPRINT: code["fingerprint"],
        TAG_GIT_COMMIT: code["git_commit"],
        _MLFLOW_GIT_COMMIT: code["git_commit"],
        TAG_GIT_DIRTY: code["git_dirty"],
        TAG_VERSIONS: _json_tag(code["versions"]),
        TAG_PARAMS: manifest["params_sha256"],
        **{TAG_CHAIN_PREFIX + k: chain[k] for k in ("model", "calib", "quantized", "qat")},
        TAG_CHAIN_PREFIX + "eval": _json_tag(chain["eval"]),
        TAG_CHAIN_PREFIX + "source": _json_tag(chain["source"]),
    }
    return {k: tag_value(v) for k, v in tags.items() if v is not None}


def release_tags(release_dir: str | os.PathLike) -> dict[str, str]:
    """`manifest_tags` of the release folder's v2 MANIFEST.json (IntegrityError if it is invalid)."""
    manifest = read_release_manifest(release_dir)
    return manifest_tags(manifest, sha256_file(Path(release_dir) / MANIFEST_NAME))


def _version_tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if not k.startswith("mlflow.")}


# -------------------------------------------------------------------------------------- register


def release_discrepancies(release_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> list[str]:
    """What in `release_dir` does not match its MANIFEST: changed, missing and unlisted files,
    params that are not params_sha256 (empty: intact)."""
    actual, listed = release_files(release_dir), manifest["files"]
    bad = [f"{rel} (changed)" for rel in sorted(listed) if rel in actual and actual[rel] != listed[rel]]
    bad += [f"{rel} (missing)" for rel in sorted(listed) if rel not in actual]
    bad += [f"{rel} (not listed)" for rel in sorted(actual) if rel not in listed]
    if params_digest(manifest["params"]) != manifest["params_sha256"]:
        bad.append(f"{MANIFEST_NAME} params (not params_sha256)")
    return bad


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:  # registered concurrently
            client.get_registered_model(name)


def _version_with_manifest(client: MlflowClient, name: str, manifest_sha256: str) -> int | None:
    """The lowest version of `name` tagged with this MANIFEST sha256, if any."""
    found = client.search_model_versions(f"name = '{name}'")
    same = [int(v.version) for v in found if (v.tags or {}).get(TAG_RELEASE_MANIFEST) == manifest_sha256]
    return min(same) if same else None


def _artifact_path(client: MlflowClient, run_id: str) -> str:
    """"release", or "release-<n>" when the run already holds one (a re-registration from the same
    run must not mix its files into an earlier upload)."""
    taken = {a.path for a in client.list_artifacts(run_id)}
    path, n = RELEASE_ARTIFACT, 1
    while path in taken:
        n += 1
        path = f"{RELEASE_ARTIFACT}-{n}"
    return path


def _register_new(
    tracker: Tracker, run_id: str, release_dir: Path, model_name: str, tags: dict[str, str], gate: str | None,
    description: str | None = None,
) -> int:
    """Upload the release, tag the run, then create the version (last: a kill before it leaves
    an orphan artifact, never a version pointing at a partial upload)."""
    client = tracker.client
    path = _artifact_path(client, run_id)
    client.log_artifacts(run_id, str(release_dir), path)
    tracker.set_tags(run_id, tags)
    failpoint("register.uploaded")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
    version_tags = {**_version_tags(tags), **({TAG_GATE: gate} if gate is not None else {})}
    return int(client.create_model_version(model_name, source=source, run_id=run_id, tags=version_tags,
                                           description=description).version)


def register_release(
    tracker: Tracker,
    run_id: str,
    release_dir: str | os.PathLike,
    model_name: str,
    alias: str,
    *,
    move_alias: bool,
    reason: str = "",
    description: str | None = None,
) -> Registration:
    """Register `release_dir` as a version of `model_name`, logged as an artifact of run `run_id`.

    The release is first verified against its MANIFEST.json (IntegrityError naming the bad files;
    nothing is registered). If a version of `model_name` already carries this MANIFEST's sha256,
    nothing is uploaded or created and that version is returned (new=False). Otherwise the folder
    is uploaded as the run artifact "release", the run is tagged with `release_tags`, and a version
    with those tags (less run-only ones) is created whose source is that artifact. `alias` is set
    to the version when `move_alias`; otherwise it stays where it was and a new version records
    `reason` in TAG_GATE. `description` (markdown: the model card with metrics) goes on a new version.
    """
    release_dir = Path(release_dir)
    manifest = read_release_manifest(release_dir)
    bad = release_discrepancies(release_dir, manifest)
    if bad:
        raise IntegrityError(f"{release_dir}: does not match its {MANIFEST_NAME}: {', '.join(bad)}; not registering")
    tags = manifest_tags(manifest, sha256_file(release_dir / MANIFEST_NAME))
    client = tracker.client
    _ensure_registered_model(client, model_name)
    version = _version_with_manifest(client, model_name, tags[TAG_RELEASE_MANIFEST])
    new = version is None
    if version is None:
        gate = None if move_alias else (reason or f"alias {alias!r} not moved")
        version = _register_new(tracker, run_id, release_dir, model_name, tags, gate, description)
        failpoint("register.versioned")
    if move_alias:
        client.set_registered_model_alias(model_name, alias, str(version))
    return Registration(model_name, version, new, move_alias, reason)
