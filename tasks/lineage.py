"""Audit a release against its own record: its MANIFEST, its registry entry and, on request, a workspace.

A release reference is a release folder, `models:/NAME/VERSION` or `models:/NAME@ALIAS`. `audit`
checks, each named in `AuditResult.checks`, every failure a `Mismatch`:
- MANIFEST.json is readable and a valid ptq-release-manifest/2 (tasks.manifest);
- every release file against MANIFEST "files" (changed, missing and unlisted files all fail);
- MANIFEST params against params_sha256;
- for a registered version: the sha256 of MANIFEST.json against the version's
  TAG_RELEASE_MANIFEST, and the version's lineage tags against what the MANIFEST records;
- only with `workspace` (a project root): data/model/MANIFEST.json, the calibration and evaluation
  token ids, the block-wise and QAT quantized states against the MANIFEST chain, and the code
  running now against the release's code fingerprint.
Without `workspace` nothing outside the release and the registry is read: an older registered
version still passes after the workspace has moved on.

A registered version in a local store (SQLite with a local artifact root) is read in place; from
a remote store it is downloaded into a temporary directory removed before `audit` returns. The
MLflow runs tagged with the MANIFEST sha256 (the pipeline run and its stage runs) and the versions
are collected for display.
"""
from __future__ import annotations

import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.request import url2pathname

from .codeid import code_fingerprint
from .io import MANIFEST_NAME, IntegrityError, sha256_file
from .manifest import RELEASE_MANIFEST_FORMAT, params_digest, read_release_manifest, release_files
from .mlflow_runs import TAG_KILLED, TAG_PARENT, TAG_RESUMES, TAG_STAGE, TAG_STAGE_STATUS, Tracker
from .registry import LINEAGE_TAGS, TAG_RELEASE_MANIFEST, manifest_tags

__all__ = [
    "AuditResult",
    "Mismatch",
    "ModelVersionInfo",
    "RunInfo",
    "WORKSPACE_FILES",
    "audit",
    "format_audit",
    "resolve_release",
]

# Workspace artifacts, relative to the project root: the paths of flows.stages (MODEL, TOKENS,
# QUANTIZED, QAT), which tasks may not import; a test checks they agree.
MODEL_DIR = "data/model"
TOKENS_DIR = "data/tokens"
QUANTIZED_DIR = "data/quantized"
QAT_DIR = "data/qat"
# chain key -> the workspace file whose sha256 it records ("eval" is one file per name)
WORKSPACE_FILES = {
    "model": f"{MODEL_DIR}/{MANIFEST_NAME}",
    "calib": f"{TOKENS_DIR}/calib.safetensors",
    "quantized": f"{QUANTIZED_DIR}/quantized.safetensors",
    "qat": f"{QAT_DIR}/quantized.safetensors",
}
CODE_MISMATCH = "code differs from the release's"

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")
_ACCEPTED = "a release folder (with MANIFEST.json), models:/NAME/VERSION or models:/NAME@ALIAS"
_VALID = f"MANIFEST.json is a valid {RELEASE_MANIFEST_FORMAT}"


class Mismatch(NamedTuple):
    """A record that does not hold: expected None = not recorded, actual None = missing."""

    path: str
    expected: str | None
    actual: str | None


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    aliases: tuple[str, ...]
    run_id: str | None
    source: str
    tags: dict[str, str]


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    name: str
    parent_run_id: str | None
    stage: str | None
    stage_status: str | None  # "run" | "cached"
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    start_time: int  # ms since the epoch
    killed: bool  # ended FAILED by a later run of its stage because its process was gone
    resumes: str | None  # the failed run of the same stage this one resumed
    metrics: dict[str, float]


@dataclass
class AuditResult:
    """What `audit` found; `ok` iff nothing failed. `location` is where the release was read (the
    folder, or the registered version's artifact URI); `release_dir` is that folder when it is on
    this filesystem, None when the release was downloaded (and removed again)."""

    ref: str
    location: str
    release_dir: Path | None
    model_version: ModelVersionInfo | None = None
    manifest_sha256: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    versions: list[ModelVersionInfo] = field(default_factory=list)
    runs: list[RunInfo] = field(default_factory=list)
    checks: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def compare(self, path: str, expected: str | None, actual: str | None, what: str | None = None) -> bool:
        """Record one check; False (and a Mismatch) if actual != expected."""
        if expected == actual:
            self.checks.append((what or path, "ok"))
            return True
        self.fail(what or path, Mismatch(path, expected, actual))
        return False

    def fail(self, what: str, *mismatches: Mismatch) -> None:
        self.checks.append((what, "MISMATCH" if len(mismatches) < 2 else f"MISMATCH ({len(mismatches)})"))
        self.mismatches.extend(mismatches)

    def skip(self, what: str, why: str) -> None:
        self.checks.append((what, f"not checked: {why}"))


# ------------------------------------------------------------------------------------ resolve


def _version_info(mv: Any) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=mv.name,
        version=int(mv.version),
        aliases=tuple(mv.aliases or ()),
        run_id=mv.run_id,
        source=mv.source,
        tags=dict(mv.tags or {}),
    )


def _local_path(uri: str) -> Path | None:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a plain path (or a Windows drive)
        return Path(uri)
    return None


def _missing_sqlite(tracking_uri: str) -> bool:
    """A sqlite URI whose file does not exist (opening it would create an empty database)."""
    if not tracking_uri.startswith("sqlite:///"):
        return False
    return not Path(tracking_uri.removeprefix("sqlite:///").split("?")[0]).is_file()


def _registered(match: re.Match[str], tracking_uri: str | None) -> tuple[ModelVersionInfo, str]:
    """The version a models:/ reference names and the URI of its artifacts."""
    ref = match.group(0)
    if tracking_uri is None:
        raise ValueError(f"{ref}: a models:/ reference needs a tracking URI")
    if _missing_sqlite(tracking_uri):
        raise FileNotFoundError(f"{ref}: no MLflow database at {tracking_uri}")
    client = Tracker(tracking_uri).client
    name, version, alias = match["name"], match["version"], match["alias"]
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return _version_info(mv), client.get_model_version_download_uri(mv.name, mv.version)


def _download(uri: str, tracking_uri: str | None, dst: Path) -> Path:
    from mlflow.artifacts import download_artifacts  # after Tracker: it quiets MLflow first

    return Path(download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri))


def _folder(ref: str) -> Path:
    folder = Path(ref)
    if not folder.is_dir():
        raise FileNotFoundError(f"{ref}: not {_ACCEPTED}")
    return folder


def resolve_release(ref: str, tracking_uri: str | None = None, dst_dir: str | os.PathLike | None = None) -> Path:
    """The local release folder for `ref`: a folder as given; for a registered version its stored
    artifacts when they are on this filesystem, else a download into `dst_dir` (default: a new
    temp dir the caller owns). Nothing is verified here: that is `audit`'s job."""
    match = _MODEL_URI.match(ref)
    if match is None:
        if not (_folder(ref) / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"{ref}: not {_ACCEPTED}")
        return Path(ref)
    _, uri = _registered(match, tracking_uri)
    local = _local_path(uri)
    if local is not None and local.is_dir():
        return local
    target = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="ptq-release-"))
    return _download(uri, tracking_uri, target)


@contextmanager
def _readable(uri: str, tracking_uri: str | None) -> Iterator[Path]:
    """The stored release in place when it is local, else a download removed on exit."""
    local = _local_path(uri)
    if local is not None and local.is_dir():
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="ptq-audit-") as tmp:
        yield _download(uri, tracking_uri, Path(tmp))


# -------------------------------------------------------------------------------- the release


def _check_manifest(result: AuditResult, folder: Path) -> bool:
    """Read and validate MANIFEST.json into `result` (its sha256 even when invalid); True if valid."""
    path, shown = folder / MANIFEST_NAME, f"{result.location}/{MANIFEST_NAME}"
    result.manifest_sha256 = sha256_file(path) if path.is_file() else None
    try:
        result.manifest = read_release_manifest(folder)
    except (FileNotFoundError, IntegrityError) as e:
        problem = str(e).replace(str(path), shown)
        result.fail(_VALID, Mismatch(shown, f"a valid {RELEASE_MANIFEST_FORMAT}", problem))
        return False
    result.checks.append((_VALID, "ok"))
    return True


def _check_files(result: AuditResult, folder: Path) -> None:
    listed, actual = result.manifest["files"], release_files(folder)
    bad = [
        Mismatch(f"{result.location}/{rel}", listed.get(rel), actual.get(rel))
        for rel in sorted({*listed, *actual})
        if listed.get(rel) != actual.get(rel)
    ]
    what = f"release files ({len(listed)}) vs MANIFEST.json"
    if bad:
        result.fail(what, *bad)
    else:
        result.checks.append((what, "ok"))


def _check_params(result: AuditResult) -> None:
    manifest = result.manifest
    path = f"{result.location}/{MANIFEST_NAME}#params"
    result.compare(path, manifest["params_sha256"], params_digest(manifest["params"]), "params vs params_sha256")


def _check_version(result: AuditResult) -> None:
    """MANIFEST.json against the sha256 its version pinned; the version's lineage tags against the
    MANIFEST (expected: the tag, actual: what the MANIFEST read now records)."""
    version, shown = result.model_version, f"{result.location}/{MANIFEST_NAME}"
    pinned = version.tags.get(TAG_RELEASE_MANIFEST)
    label = f"{version.name} v{version.version}"
    result.compare(shown, pinned, result.manifest_sha256, f"MANIFEST.json vs {label} tag")
    if not result.manifest:
        result.skip(f"{label} lineage tags", "MANIFEST.json invalid")
        return
    recorded = manifest_tags(result.manifest, result.manifest_sha256 or "")
    bad = [
        Mismatch(f"models:/{version.name}/{version.version}#tag {k}", version.tags.get(k), recorded.get(k))
        for k in sorted(LINEAGE_TAGS)
        if version.tags.get(k) != recorded.get(k)
    ]
    what = f"{label} lineage tags ({len(LINEAGE_TAGS)}) vs MANIFEST.json"
    if bad:
        result.fail(what, *bad)
    else:
        result.checks.append((what, "ok"))


# ------------------------------------------------------------------------------- the workspace


def _sha_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _workspace_files(chain: dict[str, Any], root: Path) -> list[tuple[Path, str]]:
    """(workspace file, sha256 the chain records for it), in the chain's order."""
    tokens = root / TOKENS_DIR
    pairs = [(root / WORKSPACE_FILES[key], chain[key]) for key in ("model", "calib")]
    pairs += [(tokens / f"eval_{name}.safetensors", digest) for name, digest in sorted(chain["eval"].items())]
    return pairs + [(root / WORKSPACE_FILES[key], chain[key]) for key in ("quantized", "qat")]


def _check_workspace(result: AuditResult, root: Path) -> None:
    if not result.manifest:
        result.skip(f"workspace {root}", "MANIFEST.json invalid")
        return
    for path, expected in _workspace_files(result.manifest["chain"], root):
        result.compare(str(path), expected, _sha_or_none(path))
    recorded, current = result.manifest["code"]["fingerprint"], code_fingerprint()
    result.compare(CODE_MISMATCH, recorded, current, "code fingerprint (quantlib, tasks, flows) vs the release's")


# ------------------------------------------------------------------------------------- MLflow


def _run_info(run: Any) -> RunInfo:
    tags = run.data.tags
    return RunInfo(
        run_id=run.info.run_id,
        name=run.info.run_name,
        parent_run_id=tags.get(TAG_PARENT),
        stage=tags.get(TAG_STAGE),
        stage_status=tags.get(TAG_STAGE_STATUS),
        status=run.info.status,
        start_time=run.info.start_time or 0,
        killed=tags.get(TAG_KILLED) == "true",
        resumes=tags.get(TAG_RESUMES),
        metrics=dict(run.data.metrics),
    )


def _collect_mlflow(result: AuditResult, tracking_uri: str) -> None:
    """Runs (with their parent pipeline run and its stage runs) and versions tagged with the
    release MANIFEST sha256."""
    if _missing_sqlite(tracking_uri):
        result.notes.append(f"no MLflow database at {tracking_uri}; runs not looked up")
        return
    tracker, sha = Tracker(tracking_uri), result.manifest_sha256
    runs = {r.info.run_id: r for r in tracker.runs_with_tag(TAG_RELEASE_MANIFEST, sha)}
    parents = {r.data.tags.get(TAG_PARENT, rid) for rid, r in runs.items()}
    for parent in parents:
        runs.setdefault(parent, tracker.client.get_run(parent))
        for child in tracker.runs_with_tag(TAG_PARENT, parent):
            runs.setdefault(child.info.run_id, child)
    infos = (_run_info(r) for r in runs.values())
    result.runs = sorted(infos, key=lambda r: (r.parent_run_id is not None, r.start_time))  # parents first
    found = tracker.client.search_model_versions(f"tags.`{TAG_RELEASE_MANIFEST}` = '{sha}'")
    # Search results carry no aliases on every backend: read each version.
    full = (tracker.client.get_model_version(v.name, v.version) for v in found)
    result.versions = sorted((_version_info(v) for v in full), key=lambda v: (v.name, v.version))


# -------------------------------------------------------------------------------------- audit


def _check_release(result: AuditResult, folder: Path) -> None:
    if _check_manifest(result, folder):
        _check_files(result, folder)
        _check_params(result)
    else:
        result.skip("release files and params", "MANIFEST.json invalid")


def audit(
    ref: str, tracking_uri: str | None = None, workspace: str | os.PathLike | None = None
) -> AuditResult:
    """Resolve `ref` and check the release against its own record (see the module docstring).

    tracking_uri None: no MLflow lookups (a models:/ ref then fails with ValueError). workspace
    None: nothing outside the release and the registry is read. A ref that names no folder or
    version raises (FileNotFoundError, ValueError, MlflowException); everything else found wrong
    is a mismatch in the result.
    """
    match = _MODEL_URI.match(ref)
    if match is None:
        folder = _folder(ref)
        result = AuditResult(ref=ref, location=str(folder), release_dir=folder)
        _check_release(result, folder)
    else:
        version, uri = _registered(match, tracking_uri)
        local = _local_path(uri)
        in_place = local if local is not None and local.is_dir() else None
        result = AuditResult(ref=ref, location=str(in_place or uri), release_dir=in_place, model_version=version)
        with _readable(uri, tracking_uri) as folder:
            _check_release(result, folder)
        _check_version(result)
    if workspace is not None:
        _check_workspace(result, Path(workspace))
    if tracking_uri is not None and result.manifest_sha256 is not None:
        _collect_mlflow(result, tracking_uri)
    return result


# ------------------------------------------------------------------------------------- format


def _short(digest: Any) -> str:
    return "-" if digest is None else str(digest)[:12]


def _format_chain(result: AuditResult) -> list[str]:
    manifest = result.manifest
    if not manifest:
        return ["chain      (MANIFEST.json invalid: no chain recorded)"]
    chain = manifest["chain"]
    source = chain["source"]
    spec = source.get("spec") or source.get("source") or "?"
    evals = ", ".join(f"eval {n} sha256 {_short(d)}" for n, d in sorted(chain["eval"].items()))
    lines = [
        f"source     {spec} ({source.get('kind', '?')})",
        f"model      {MODEL_DIR} MANIFEST sha256 {_short(chain['model'])}" + _rotated(source),
        f"tokens     calib sha256 {_short(chain['calib'])}" + (f", {evals}" if evals else ""),
        f"quantized  sha256 {_short(chain['quantized'])}",
        f"qat        sha256 {_short(chain['qat'])}",
        f"release    {len(manifest['files'])} files, params sha256 {_short(manifest['params_sha256'])}",
    ]
    for section in ("quantize", "qat", "pack"):
        values = manifest["params"].get(section) or {}
        if values:
            lines.append(f"  {section:9} {', '.join(f'{k}={v}' for k, v in sorted(values.items()))}")
    return lines


def _format_code(result: AuditResult) -> list[str]:
    if not result.manifest:
        return []
    code = result.manifest["code"]
    dirty = " (dirty)" if code["git_dirty"] else ""
    versions = ", ".join(f"{k} {v}" for k, v in sorted(code["versions"].items()) if v != "absent")
    return [f"code       fingerprint {_short(code['fingerprint'])}, git {code['git_commit'] or 'none'}{dirty}",
            f"           {versions}"]


def _format_mlflow(result: AuditResult) -> list[str]:
    lines = []
    for v in result.versions or ([result.model_version] if result.model_version else []):
        aliases = f" @{', @'.join(v.aliases)}" if v.aliases else ""
        lines.append(f"registry   {v.name} v{v.version}{aliases}  run {v.run_id}")
    for r in result.runs:
        kind = f"stage {r.stage} ({r.stage_status})" if r.stage else ("pipeline" if r.parent_run_id is None else "run")
        extra = (" killed" if r.killed else "") + (f" resumes {r.resumes}" if r.resumes else "")
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items())[:6])
        indent = "  " if r.parent_run_id else ""
        lines.append(f"mlflow     {indent}{r.run_id} {kind} {r.status}{extra} {metrics}".rstrip())
    return lines


def format_audit(result: AuditResult) -> str:
    """The chain model -> tokens -> quantized -> qat -> release, the code identity, the MLflow runs
    and every check, one per line; mismatches after, naming the file; the verdict last."""
    where = f" (registered {result.model_version.name} v{result.model_version.version})" if result.model_version else ""
    target = "" if result.location == result.ref else f" -> {result.location}"
    lines = [f"release    {result.ref}{target}{where}", f"manifest   sha256 {result.manifest_sha256 or '(missing)'}"]
    lines += _format_chain(result) + _format_code(result) + _format_mlflow(result)
    lines += [f"check      {what}: {outcome}" for what, outcome in result.checks]
    lines += [f"note       {n}" for n in result.notes]
    for m in result.mismatches:
        lines.append(f"MISMATCH   {m.path}: expected {m.expected or '(not recorded)'}, actual {m.actual or '(missing)'}")
    lines.append("lineage OK" if result.ok else f"lineage FAILED: {len(result.mismatches)} mismatches")
    return "\n".join(lines)


def _rotated(source: dict) -> str:
    """', rotated (mode, seed) from model <sha>' when fetch_model.rotate made the model folder."""
    rot = source.get("rotation")
    if not rot:
        return ""
    return f", rotated ({rot['mode']}, seed {rot['seed']}) from model MANIFEST sha256 {_short(rot['base_model'])}"
