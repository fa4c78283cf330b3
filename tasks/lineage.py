"""Find a release and audit how it was made, re-checking every hash it recorded.

A release reference is a release folder, `models:/NAME/VERSION` or `models:/NAME@ALIAS`. The audit
reads the release MANIFEST.json (layout: tasks.tracking), then verifies
- every release file against MANIFEST.json (missing, changed and unlisted files all fail);
- MANIFEST.json itself against the sha256 its registered model version was tagged with;
- inputs.params against inputs.params_sha256;
- where the project's data/ folders are present: data/model/MANIFEST.json (and the model files it
  lists), data/model/source.json, the calibration and evaluation token ids and dvc.lock against
  what the release recorded.
It also gathers the chain for display: source model, data, params, code commit, DVC stages, metrics
and the MLflow runs and model versions tagged with the release MANIFEST sha256.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.parse
from urllib.request import url2pathname
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .io import MANIFEST_NAME, read_manifest, sha256_file
from .tracking import (
    RELEASE_ARTIFACT,
    TAG_RELEASE_MANIFEST,
    TAG_STAGE,
    TAG_STAGE_STATUS,
    Tracker,
    dvc_lock_stages,
    params_digest,
)

__all__ = ["AuditResult", "Mismatch", "ModelVersionInfo", "RunInfo", "audit", "format_audit", "resolve_release"]

# Workspace artifacts, relative to the project root: the same paths as flows.stages (MODEL,
# TOKENS, RELEASE, METRICS), which tasks may not import; a test checks they agree.
MODEL_DIR = "data/model"
TOKENS_DIR = "data/tokens"
RELEASE_DIR = "data/release"
METRICS_FILE = "data/reports/metrics.json"

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")
_ACCEPTED = "a release folder (with MANIFEST.json), models:/NAME/VERSION or models:/NAME@ALIAS"
_SOURCE_KEYS = ("source", "kind", "source_files", "revision", "package")  # compared with source.json


class Mismatch(NamedTuple):
    """A recorded hash that does not hold: expected None = not recorded, actual None = missing."""

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
    stage_status: str | None
    status: str
    start_time: int  # ms since the epoch
    metrics: dict[str, float]


@dataclass
class AuditResult:
    """What `audit` found. `ok` iff no recorded hash failed; `checks` are (what, outcome) lines."""

    ref: str
    release_dir: Path
    manifest_sha256: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    model_version: ModelVersionInfo | None = None
    versions: list[ModelVersionInfo] = field(default_factory=list)
    runs: list[RunInfo] = field(default_factory=list)
    dvc_stages: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def compare(self, path: str, expected: str | None, actual: str | None, what: str | None = None) -> bool:
        """Record one hash check; False (and a Mismatch) if actual != expected."""
        label = what or path
        if expected == actual:
            self.checks.append((label, "ok"))
            return True
        self.checks.append((label, "MISMATCH"))
        self.mismatches.append(Mismatch(path, expected, actual))
        return False

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


def _release_in_model(model_dir: Path) -> Path:
    """The release folder inside an MLflow model logged by register_release (path from MLmodel)."""
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))
    try:
        rel = mlmodel["flavors"]["python_function"]["artifacts"][RELEASE_ARTIFACT]["path"]
    except (KeyError, TypeError) as e:
        raise FileNotFoundError(f"{model_dir}/MLmodel has no '{RELEASE_ARTIFACT}' artifact: not a ptq release") from e
    return model_dir / rel


def _resolve(
    ref: str, tracking_uri: str | None, dst_dir: str | os.PathLike | None
) -> tuple[Path, ModelVersionInfo | None]:
    match = _MODEL_URI.match(ref)
    if match is None:
        folder = Path(ref)
        if not (folder / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"{ref}: not {_ACCEPTED}")
        return folder, None
    if tracking_uri is None:
        raise ValueError(f"{ref}: a models:/ reference needs a tracking URI")
    if _missing_sqlite(tracking_uri):
        raise FileNotFoundError(f"{ref}: no MLflow database at {tracking_uri}")
    client = Tracker(tracking_uri).client
    import mlflow  # after Tracker: it quiets MLflow before the first import

    name, version, alias = match["name"], match["version"], match["alias"]
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    uri = client.get_model_version_download_uri(mv.name, mv.version)
    model_dir = _local_path(uri)
    if model_dir is None or not model_dir.is_dir():
        target = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="ptq-release-"))
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri)
        model_dir = Path(local)
    return _release_in_model(model_dir), _version_info(mv)


def resolve_release(ref: str, tracking_uri: str | None = None, dst_dir: str | os.PathLike | None = None) -> Path:
    """The local release folder for `ref`: a folder as given; for a registered version its stored
    artifacts when they are on this filesystem, else a download into `dst_dir` (default: a new
    temp dir the caller owns). Nothing is verified here: that is `audit`'s job."""
    return _resolve(ref, tracking_uri, dst_dir)[0]


# -------------------------------------------------------------------------------------- audit


def _check_release_files(result: AuditResult) -> None:
    folder, listed = result.release_dir, result.manifest.get("files", {})
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    bad = 0
    for rel, digest in sorted(listed.items()):
        path = folder / rel
        actual = sha256_file(path) if path.is_file() else None
        if actual != digest:
            bad += 1
            result.mismatches.append(Mismatch(str(path), digest, actual))
    for rel in present:
        if rel != MANIFEST_NAME and rel not in listed:  # a file slipped in after packing
            bad += 1
            result.mismatches.append(Mismatch(str(folder / rel), None, sha256_file(folder / rel)))
    outcome = "ok" if not bad else f"MISMATCH ({bad} of {len(listed)})"
    result.checks.append((f"release files ({len(listed)}) vs MANIFEST.json", outcome))


def _check_params(result: AuditResult) -> None:
    inputs = result.manifest.get("inputs", {})
    if "params" not in inputs:
        result.skip("params", "the release recorded none")
        return
    path = f"{result.release_dir / MANIFEST_NAME}#inputs.params"
    result.compare(path, inputs.get("params_sha256"), params_digest(inputs["params"]), "params vs params_sha256")


def _sha_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _check_model(result: AuditResult, root: Path, deep: bool) -> None:
    inputs, model_dir = result.manifest.get("inputs", {}), root / MODEL_DIR
    manifest = model_dir / MANIFEST_NAME
    same = result.compare(str(manifest), inputs.get("model_manifest_sha256"), _sha_or_none(manifest))
    if same and deep:
        files = read_manifest(model_dir)["files"]
        bad = [rel for rel, digest in sorted(files.items()) if _sha_or_none(model_dir / rel) != digest]
        for rel in bad:
            result.mismatches.append(Mismatch(str(model_dir / rel), files[rel], _sha_or_none(model_dir / rel)))
        outcome = "ok" if not bad else "MISMATCH"
        result.checks.append((f"{model_dir} files ({len(files)}) vs its MANIFEST.json", outcome))
    source_json, recorded = model_dir / "source.json", inputs.get("source") or {}
    if recorded and source_json.is_file():
        current = json.loads(source_json.read_text(encoding="utf-8"))
        what = f"{source_json} ({', '.join(k for k in _SOURCE_KEYS if k in recorded)})"
        result.compare(str(source_json), _source_digest(recorded), _source_digest(current), what)


def _source_digest(source: dict[str, Any]) -> str:
    """sha256 over the source.json keys that identify the source (not where it was written)."""
    return params_digest({k: json.dumps(source[k], sort_keys=True) for k in _SOURCE_KEYS if k in source})


def _check_tokens(result: AuditResult, root: Path) -> None:
    inputs, tokens = result.manifest.get("inputs", {}), root / TOKENS_DIR
    calib = tokens / "calib.safetensors"
    result.compare(str(calib), inputs.get("calib_sha256"), _sha_or_none(calib))
    for name, digest in sorted((inputs.get("eval_sha256") or {}).items()):
        path = tokens / f"eval_{name}.safetensors"
        result.compare(str(path), digest, _sha_or_none(path))


def _check_dvc_lock(result: AuditResult, root: Path) -> None:
    lineage, lock = result.manifest.get("lineage", {}), root / "dvc.lock"
    recorded_sha, recorded = lineage.get("dvc_lock_sha256"), lineage.get("dvc_stages") or {}
    if not lock.is_file():
        result.compare(str(lock), recorded_sha, None)
        return
    if sha256_file(lock) == recorded_sha:
        result.checks.append((str(lock), "ok (unchanged since pack)"))
        return
    if recorded_sha is None and not recorded:
        result.skip(str(lock), "the release recorded no dvc.lock")
        return
    current, n_bad = dvc_lock_stages(lock), len(result.mismatches)
    for stage, entry in sorted(recorded.items()):
        for kind in ("deps", "outs"):
            for path, md5 in sorted(entry.get(kind, {}).items()):
                actual = current.get(stage, {}).get(kind, {}).get(path)
                if actual != md5:
                    result.mismatches.append(Mismatch(f"{lock}:{stage}.{kind}.{path}", md5, actual))
    if len(result.mismatches) == n_bad:
        result.checks.append((f"{lock} entries of {', '.join(sorted(recorded))}", "ok (later stages changed the file)"))
    else:
        result.checks.append((f"{lock} entries of {', '.join(sorted(recorded))}", "MISMATCH"))


def _check_workspace(result: AuditResult, root: Path, deep: bool) -> None:
    data = [root / d for d in (MODEL_DIR, TOKENS_DIR)]
    if not any(d.is_dir() for d in data):
        result.skip(f"{root}/data", "no data/model or data/tokens in the project")
        return
    if data[0].is_dir():
        _check_model(result, root, deep)
    else:
        result.skip(str(data[0]), "absent")
    if data[1].is_dir():
        _check_tokens(result, root)
    else:
        result.skip(str(data[1]), "absent")
    _check_dvc_lock(result, root)


def _run_info(run: Any) -> RunInfo:
    tags = run.data.tags
    return RunInfo(
        run_id=run.info.run_id,
        name=run.info.run_name,
        parent_run_id=tags.get("mlflow.parentRunId"),
        stage=tags.get(TAG_STAGE),
        stage_status=tags.get(TAG_STAGE_STATUS),
        status=run.info.status,
        start_time=run.info.start_time or 0,
        metrics=dict(run.data.metrics),
    )


def _collect_mlflow(result: AuditResult, tracking_uri: str) -> None:
    """Runs (with their parent pipeline run and its stage runs) and versions tagged with the
    release MANIFEST sha256; checks the version's tag against the MANIFEST actually read."""
    if _missing_sqlite(tracking_uri):
        result.notes.append(f"no MLflow database at {tracking_uri}; runs not looked up")
        return
    tracker, sha = Tracker(tracking_uri), result.manifest_sha256
    runs = {r.info.run_id: r for r in tracker.runs_with_tag(TAG_RELEASE_MANIFEST, sha)}
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs.values() if "mlflow.parentRunId" in r.data.tags}
    parents |= {rid for rid, r in runs.items() if "mlflow.parentRunId" not in r.data.tags}
    for parent in parents:
        runs.setdefault(parent, tracker.client.get_run(parent))
        for child in tracker.runs_with_tag("mlflow.parentRunId", parent):
            runs.setdefault(child.info.run_id, child)
    infos = (_run_info(r) for r in runs.values())
    result.runs = sorted(infos, key=lambda r: (r.parent_run_id is not None, r.start_time))  # parents first
    found = tracker.client.search_model_versions(f"tags.`{TAG_RELEASE_MANIFEST}` = '{sha}'")
    # Search results carry no aliases on every backend: read each version.
    full = (tracker.client.get_model_version(v.name, v.version) for v in found)
    result.versions = sorted((_version_info(v) for v in full), key=lambda v: (v.name, v.version))


def _collect_chain(result: AuditResult, root: Path | None) -> None:
    lock = root / "dvc.lock" if root is not None else None
    if lock is not None and lock.is_file():
        result.dvc_stages = dvc_lock_stages(lock)
    else:
        result.dvc_stages = result.manifest.get("lineage", {}).get("dvc_stages") or {}
    if root is None:
        return
    workspace_release = root / RELEASE_DIR / MANIFEST_NAME
    metrics = root / METRICS_FILE
    if _sha_or_none(workspace_release) == result.manifest_sha256 and metrics.is_file():
        result.metrics = json.loads(metrics.read_text(encoding="utf-8"))
    elif workspace_release.is_file() and _sha_or_none(workspace_release) != result.manifest_sha256:
        result.notes.append(f"{workspace_release.parent} is a different release; its metrics are not shown")


def audit(
    ref: str,
    tracking_uri: str | None = None,
    project_root: str | os.PathLike | None = None,
    *,
    deep: bool = True,
    dst_dir: str | os.PathLike | None = None,
) -> AuditResult:
    """Resolve `ref`, collect its lineage chain and verify every hash it recorded.

    tracking_uri None: no MLflow lookups (a models:/ ref then fails). project_root None: the
    workspace (data/, dvc.lock) is not checked. deep=False skips re-hashing the source model's
    files (only its MANIFEST.json is compared).
    """
    release_dir, version = _resolve(ref, tracking_uri, dst_dir)
    result = AuditResult(ref=ref, release_dir=release_dir, model_version=version)
    manifest_path = release_dir / MANIFEST_NAME
    result.manifest_sha256 = sha256_file(manifest_path)
    result.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if version is not None:
        pinned = version.tags.get(TAG_RELEASE_MANIFEST)
        what = f"MANIFEST.json vs {version.name} v{version.version} tag"
        result.compare(str(manifest_path), pinned, result.manifest_sha256, what)
    _check_release_files(result)
    _check_params(result)
    root = Path(project_root) if project_root is not None else None
    if root is not None:
        _check_workspace(result, root, deep)
    if tracking_uri is not None:
        _collect_mlflow(result, tracking_uri)
    _collect_chain(result, root)
    return result


# ------------------------------------------------------------------------------------- format


def _short(digest: str | None) -> str:
    return "-" if digest is None else str(digest)[:12]


def _format_inputs(manifest: dict[str, Any]) -> list[str]:
    inputs = manifest.get("inputs", {})
    source = inputs.get("source") or {}
    lines = [f"source     {source.get('source', '?')} ({source.get('kind', '?')})"]
    files = sorted((source.get("source_files") or {}).items())
    lines += [f"             {rel}  sha256 {_short(d)}" for rel, d in files[:8]]
    lines += [f"             ... {len(files) - 8} more"] if len(files) > 8 else []
    lines.append(f"model      data/model MANIFEST sha256 {_short(inputs.get('model_manifest_sha256'))}")
    lines.append(f"calib      sha256 {_short(inputs.get('calib_sha256'))}")
    lines += [f"eval       {n}  sha256 {_short(d)}" for n, d in sorted((inputs.get("eval_sha256") or {}).items())]
    params = inputs.get("params") or {}
    quant = ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k.startswith(("quantize.", "qat.", "pack.")))
    lines.append(f"params     sha256 {_short(inputs.get('params_sha256'))}  {quant}")
    return lines


def _format_code(result: AuditResult) -> list[str]:
    lineage = result.manifest.get("lineage", {})
    dirty = " (dirty)" if lineage.get("git_dirty") else ""
    git, version = lineage.get("git_commit") or "none", lineage.get("quantlib_version", "?")
    lock = lineage.get("dvc_lock_sha256")
    lines = [f"code       git {git}{dirty}, quantlib {version}, dvc.lock sha256 {_short(lock)}"]
    timings = lineage.get("stages") or {}
    for stage in dict.fromkeys([*result.dvc_stages, *timings]):  # dvc.lock keeps pipeline order
        t = timings.get(stage)
        timing = f"{t['status']:6} {t['seconds']:8.1f}s" if t else f"{'':6} {'':9}"
        outs = sorted(result.dvc_stages.get(stage, {}).get("outs", {}).items())
        outs = ", ".join(f"{p} md5 {_short(m)}" for p, m in outs)
        lines.append(f"  {stage:13} {timing}  {outs}".rstrip())
    return lines


def _format_mlflow(result: AuditResult) -> list[str]:
    lines = []
    for v in result.versions or ([result.model_version] if result.model_version else []):
        aliases = f" @{', @'.join(v.aliases)}" if v.aliases else ""
        lines.append(f"registry   {v.name} v{v.version}{aliases}  run {v.run_id}")
    for r in result.runs:
        kind = f"stage {r.stage} ({r.stage_status})" if r.stage else ("pipeline" if r.parent_run_id is None else "run")
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items())[:6])
        lines.append(f"{'mlflow':10} {'  ' if r.parent_run_id else ''}{r.run_id} {kind} {r.status} {metrics}".rstrip())
    return lines


def _format_metrics(metrics: dict[str, Any]) -> list[str]:
    flat = []
    for key, value in sorted(metrics.items()):
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            text = f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
            flat.append(f"{key}.{sub}={text}" if sub else f"{key}={text}")
    return [f"metrics    {', '.join(flat)}"] if flat else []


def format_audit(result: AuditResult) -> str:
    """The lineage chain and every check, one per line; mismatches last, naming the file."""
    where = f" (registered {result.model_version.name} v{result.model_version.version})" if result.model_version else ""
    target = "" if Path(result.ref) == result.release_dir else f" -> {result.release_dir}"
    lines = [f"release    {result.ref}{target}{where}", f"manifest   sha256 {result.manifest_sha256}"]
    lines += _format_inputs(result.manifest) + _format_code(result) + _format_metrics(result.metrics)
    lines += _format_mlflow(result)
    lines += [f"check      {what}: {outcome}" for what, outcome in result.checks]
    lines += [f"note       {n}" for n in result.notes]
    if result.ok:
        lines.append("result     OK: every recorded hash matches")
    else:
        lines.append(f"result     FAILED: {len(result.mismatches)} mismatch(es)")
        for m in result.mismatches:
            expected, actual = m.expected or "(not recorded)", m.actual or "(missing)"
            lines.append(f"MISMATCH   {m.path}: expected {expected}, actual {actual}")
    return "\n".join(lines)
