"""Run tracking and the release registry: code lineage, the release MANIFEST, MLflow runs and versions.

Three parts, usable apart:
- `collect_code_lineage`: which code made an artifact (git commit and dirty flag, dvc.lock hash and
  its per-stage md5s, quantlib version). No MLflow.
- `build_release_manifest` (called by the pack stage): the release folder's MANIFEST.json, which
  pins every release file and records what the release was made from. No MLflow.
- `Tracker` and `register_release`: MLflow runs (one parent per pipeline run, one nested run per
  stage), params, metrics, artifacts and lineage tags; the release as a registered model version
  with an alias. Every call names its run id through an `MlflowClient` bound to one tracking URI,
  never the fluent active run or the global tracking URI: Prefect runs tasks in worker threads,
  where the flow's active run is not visible, and MLflow 3's global default would create a stray
  `mlflow.db` in the working directory.

Release MANIFEST.json (format RELEASE_MANIFEST_FORMAT)::

    {"format": "ptq-release-manifest/1",
     "files":   {relpath: sha256}                   every file in the folder but MANIFEST.json
     "inputs":  {"source": {...},                   data/model/source.json: spec, kind, source_files
                                                    (sha256 of the files read), revision/package
                 "model_manifest_sha256": ...,      sha256 of data/model/MANIFEST.json
                 "calib_sha256": ...,               sha256 of data/tokens/calib.safetensors
                 "eval_sha256": {name: sha256},     data/tokens/eval_<name>.safetensors
                 "params": {"quantize.bits": "4", ...},   flattened params.yaml (YAML text values)
                 "params_sha256": ...},             params_digest(params)
     "lineage": {"git_commit": str | null, "git_dirty": bool, "dvc_lock_sha256": str | null,
                 "dvc_stages": {stage: {"deps": {path: md5}, "outs": {path: md5}}},
                 "quantlib_version": str,
                 "stages": {stage: {"status": "run" | "cached", "seconds": float}}}}

`dvc_lock_sha256` is the whole dvc.lock when pack ran; DVC rewrites dvc.lock after every stage, so
the later stages (pack, evaluate, register) change it. `dvc_stages` holds the entries of the stages
that had run by then, which stay valid until one of them re-runs: audits compare those.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import quantlib

from .io import MANIFEST_NAME, IntegrityError, atomic_write_json, sha256_bytes, sha256_file, verify_manifest

if TYPE_CHECKING:  # mlflow is imported where used: `import mlflow` costs about 1.2 s
    from mlflow import MlflowClient
    from mlflow.entities import Run

__all__ = [
    "CODE_LINEAGE_KEYS",
    "INPUT_KEYS",
    "LINEAGE_KEYS",
    "MAX_PARAM_CHARS",
    "RELEASE_ARTIFACT",
    "RELEASE_MANIFEST_FORMAT",
    "STAGE_STATUSES",
    "TAG_CALIB",
    "TAG_DVC_LOCK",
    "TAG_GIT_COMMIT",
    "TAG_GIT_DIRTY",
    "TAG_PARAMS",
    "TAG_PIPELINE_KEY",
    "TAG_QUANTLIB",
    "TAG_RELEASE_MANIFEST",
    "TAG_SOURCE_MODEL",
    "TAG_STAGE",
    "TAG_STAGE_STATUS",
    "Tracker",
    "build_release_manifest",
    "collect_code_lineage",
    "collect_release_inputs",
    "dvc_lock_stages",
    "lineage_tags",
    "params_digest",
    "quiet_mlflow",
    "register_release",
    "release_lineage_tags",
    "release_model_name",
]

RELEASE_MANIFEST_FORMAT = "ptq-release-manifest/1"
INPUT_KEYS = ("source", "model_manifest_sha256", "calib_sha256", "eval_sha256", "params", "params_sha256")
CODE_LINEAGE_KEYS = ("git_commit", "git_dirty", "dvc_lock_sha256", "dvc_stages", "quantlib_version")
LINEAGE_KEYS = (*CODE_LINEAGE_KEYS, "stages")
STAGE_STATUSES = ("run", "cached")

# Tags on runs and model versions. A run and the version it registered share TAG_RELEASE_MANIFEST,
# which is how `audit` finds the runs behind a release.
TAG_GIT_COMMIT = "ptq.git_commit"
TAG_GIT_DIRTY = "ptq.git_dirty"
TAG_DVC_LOCK = "ptq.dvc_lock_sha256"
TAG_SOURCE_MODEL = "ptq.source_model_sha256"  # sha256 of data/model/MANIFEST.json: pins every model file
TAG_CALIB = "ptq.calib_sha256"
TAG_PARAMS = "ptq.params_sha256"
TAG_QUANTLIB = "ptq.quantlib_version"
TAG_RELEASE_MANIFEST = "ptq.release_manifest_sha256"
TAG_STAGE = "ptq.stage"
TAG_STAGE_STATUS = "ptq.stage_status"
TAG_PIPELINE_KEY = "ptq.pipeline_key"
_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"  # shown by the MLflow UI
_MLFLOW_PARENT = "mlflow.parentRunId"  # what makes a run nested

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
RELEASE_ARTIFACT = "release"  # pyfunc artifact name of the release folder inside the logged model
_BATCH_PARAMS, _BATCH_METRICS = 100, 1000  # MLflow log_batch limits
_TRUNCATED = "...[truncated; full value in artifact params/params.json]"

# Paths whose untracked files do not make the tree dirty: pipeline outputs and caches.
_UNTRACKED_OK = ("data/", ".dvc/tmp/", ".dvc/cache/", ".cache/", ".prefect/", "mlruns/", "mlartifacts/", "out/")
_UNTRACKED_OK_NAMES = ("__pycache__", ".pytest_cache", ".ipynb_checkpoints", "mlflow.db")
# Files that may differ from the commit (or be untracked) without making the code dirty: DVC
# rewrites dvc.lock during `dvc repro`, and its content is recorded by hash instead.
_RECORDED_BY_HASH = ("dvc.lock",)


# ------------------------------------------------------------------------------- code lineage


def _git(root: Path, *args: str) -> str | None:
    """stdout of `git -C root ARGS`, or None where git or the repository is missing."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # `git status` must not take index.lock
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _counts_as_dirty(line: str, prefix: str = "") -> bool:
    # porcelain v1: "XY PATH" (or "XY OLD -> NEW"); "??" = untracked. PATH minus the project's prefix.
    code, path = line[:2], line[3:].split(" -> ")[-1].strip('"').removeprefix(prefix)
    if path in _RECORDED_BY_HASH:
        return False
    if code == "??":
        parts = path.rstrip("/").split("/")
        return not (path.startswith(_UNTRACKED_OK) or any(p in _UNTRACKED_OK_NAMES for p in parts))
    return True


def dvc_lock_stages(dvc_lock: str | os.PathLike) -> dict[str, dict[str, dict[str, str]]]:
    """{stage: {"deps": {path: md5}, "outs": {path: md5}}} read from a dvc.lock file."""
    lock = yaml.safe_load(Path(dvc_lock).read_text(encoding="utf-8")) or {}
    stages = lock.get("stages") or {}

    def md5s(entries: Any) -> dict[str, str]:
        return {e["path"]: str(e.get("md5")) for e in entries or () if isinstance(e, Mapping) and "path" in e}

    return {name: {"deps": md5s(s.get("deps")), "outs": md5s(s.get("outs"))} for name, s in stages.items()}


def collect_code_lineage(project_root: str | os.PathLike) -> dict[str, Any]:
    """The code behind a run: {git_commit, git_dirty, dvc_lock_sha256, dvc_stages, quantlib_version}.

    git_commit is None outside a git repository (git_dirty is then False). git_dirty ignores
    untracked files under data/ and caches, and dvc.lock (recorded by hash). dvc_lock_sha256 and
    dvc_stages are None and {} where there is no dvc.lock.
    """
    root = Path(project_root)
    head = _git(root, "rev-parse", "--verify", "HEAD")
    commit = head.strip() if head else None
    dirty = False
    if commit:
        # porcelain paths are relative to the repository root; the project may be a subfolder
        prefix = (_git(root, "rev-parse", "--show-prefix") or "").strip()
        status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", ".") or ""
        dirty = any(_counts_as_dirty(line, prefix) for line in status.splitlines() if line.strip())
    lock = root / "dvc.lock"
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "dvc_lock_sha256": sha256_file(lock) if lock.is_file() else None,
        "dvc_stages": dvc_lock_stages(lock) if lock.is_file() else {},
        "quantlib_version": quantlib.__version__,
    }


# --------------------------------------------------------------------------- release manifest


def params_digest(params: Mapping[str, str]) -> str:
    """sha256 of flattened params as canonical JSON (sorted keys): equal params, equal digest."""
    text = json.dumps(dict(params), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256_bytes(text.encode("utf-8"))


def _eval_name(path: Path) -> str:
    return path.name.removeprefix("eval_").removesuffix(".safetensors")


def collect_release_inputs(
    model_dir: str | os.PathLike, tokens_dir: str | os.PathLike, params: Mapping[str, str]
) -> dict[str, Any]:
    """The `inputs` section of a release MANIFEST, hashed from the model and tokens folders.

    `params` are the flattened pipeline params (`flows.params.flatten(params_to_dict(p))`).
    """
    model_dir, tokens_dir = Path(model_dir), Path(tokens_dir)
    source_json = model_dir / "source.json"
    source = json.loads(source_json.read_text(encoding="utf-8")) if source_json.is_file() else {}
    calib = tokens_dir / "calib.safetensors"
    if not calib.is_file():
        raise FileNotFoundError(f"{calib} not found; run the prepare_data stage first")
    return {
        # The model folder's location and manifest are recorded by hash below, not copied.
        "source": {k: v for k, v in source.items() if k not in ("out_dir", "manifest")},
        "model_manifest_sha256": sha256_file(model_dir / MANIFEST_NAME),
        "calib_sha256": sha256_file(calib),
        "eval_sha256": {_eval_name(p): sha256_file(p) for p in sorted(tokens_dir.glob("eval_*.safetensors"))},
        "params": dict(params),
        "params_sha256": params_digest(params),
    }


def _check_keys(what: str, got: Mapping[str, Any], required: Sequence[str]) -> None:
    missing = [k for k in required if k not in got]
    unknown = [k for k in got if k not in required]
    if missing or unknown:
        raise ValueError(
            f"release manifest {what}: missing keys {missing}, unknown keys {unknown} (expected {list(required)})"
        )


def _check_stages(stages: Any) -> None:
    if not isinstance(stages, Mapping):
        raise ValueError(f"release manifest lineage.stages: expected a mapping, got {stages!r}")
    for name, info in stages.items():
        ok = (
            isinstance(info, Mapping)
            and info.get("status") in STAGE_STATUSES
            and isinstance(info.get("seconds"), (int, float))
            and not isinstance(info.get("seconds"), bool)
        )
        if not ok:
            expected = "{'status': 'run'|'cached', 'seconds': float}"
            raise ValueError(f"release manifest lineage.stages.{name}: expected {expected}, got {info!r}")


def _files_hashes(folder: Path) -> dict[str, str]:
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {rel: sha256_file(folder / rel) for rel in rels if rel != MANIFEST_NAME}


def build_release_manifest(
    release_dir: str | os.PathLike, inputs: Mapping[str, Any], lineage: Mapping[str, Any]
) -> dict[str, Any]:
    """Hash every file of `release_dir` and write its MANIFEST.json (atomically); return the manifest.

    `inputs` has exactly INPUT_KEYS (see `collect_release_inputs`); `lineage` has exactly
    LINEAGE_KEYS: `collect_code_lineage(root)` plus "stages". Layout: the module docstring.
    """
    folder = Path(release_dir)
    if not folder.is_dir():
        raise NotADirectoryError(f"build_release_manifest: {folder} is not a directory")
    _check_keys("inputs", inputs, INPUT_KEYS)
    _check_keys("lineage", lineage, LINEAGE_KEYS)
    _check_stages(lineage["stages"])
    if params_digest(inputs["params"]) != inputs["params_sha256"]:
        raise ValueError("release manifest inputs.params_sha256 is not params_digest(inputs.params)")
    manifest = {
        "format": RELEASE_MANIFEST_FORMAT,
        "files": _files_hashes(folder),
        "inputs": dict(inputs),
        "lineage": {**lineage, "stages": {k: dict(v) for k, v in lineage["stages"].items()}},
    }
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return manifest


# ------------------------------------------------------------------------------------ tags, names


def _tag_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def lineage_tags(
    code: Mapping[str, Any],
    *,
    source_model_sha256: str | None = None,
    calib_sha256: str | None = None,
    params_sha256: str | None = None,
    release_manifest_sha256: str | None = None,
) -> dict[str, str]:
    """Run tags from `collect_code_lineage` output plus the hashes known so far (None: not set).

    The git commit is also set as `mlflow.source.git.commit`, which the MLflow UI shows.
    """
    tags = {
        TAG_GIT_COMMIT: code.get("git_commit"),
        _MLFLOW_GIT_COMMIT: code.get("git_commit"),
        TAG_GIT_DIRTY: code.get("git_dirty"),
        TAG_DVC_LOCK: code.get("dvc_lock_sha256"),
        TAG_QUANTLIB: code.get("quantlib_version"),
        TAG_SOURCE_MODEL: source_model_sha256,
        TAG_CALIB: calib_sha256,
        TAG_PARAMS: params_sha256,
        TAG_RELEASE_MANIFEST: release_manifest_sha256,
    }
    return {k: _tag_value(v) for k, v in tags.items() if v is not None}


def release_lineage_tags(release_dir: str | os.PathLike) -> dict[str, str]:
    """Lineage tags read from a release folder's MANIFEST.json, including its own sha256."""
    path = Path(release_dir) / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    inputs, lineage = manifest.get("inputs", {}), manifest.get("lineage", {})
    return lineage_tags(
        lineage,
        source_model_sha256=inputs.get("model_manifest_sha256"),
        calib_sha256=inputs.get("calib_sha256"),
        params_sha256=inputs.get("params_sha256"),
        release_manifest_sha256=sha256_file(path),
    )


def _slug(text: str) -> str:
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9._-]+", "-", text.lower())).strip("-.")


def release_model_name(source_spec: str, scheme_name: str) -> str:
    """Registered model name `ptq-<model>-<scheme>`: the spec's last path part, lowercased, with
    anything but letters, digits, '.', '_' and '-' turned into '-' (MLflow forbids '/' and ':').

    `hf:Org/Name@rev` -> `name`; `/models/llama.gguf` -> `llama`; `smollm2-135m` as is.
    """
    spec = source_spec.strip().removeprefix("hf:").split("@", 1)[0].rstrip("/\\")
    model = _slug(re.split(r"[/\\]", spec)[-1].removesuffix(".gguf"))[:100] or "model"
    scheme = _slug(scheme_name)
    if not scheme:
        raise ValueError(f"release_model_name: empty scheme name {scheme_name!r}")
    return f"ptq-{model}-{scheme}"


# ------------------------------------------------------------------------------------- MLflow


def quiet_mlflow(environ: dict[str, str] | None = None) -> None:
    """Defaults for an offline, non-interactive pipeline (values already set win): no telemetry,
    no artifact progress bars, no INFO lines from database migrations. Called by `Tracker`."""
    env = os.environ if environ is None else environ
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow.store.db.utils"):  # "Creating initial MLflow database tables..."
        logging.getLogger(name).setLevel(logging.WARNING)


def _sqlite_artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """<db folder>/mlartifacts/<experiment> for sqlite URIs (the project's git-ignored folder).

    MLflow would otherwise use ./mlruns under the current directory. Other backends (a server
    with --artifacts-destination, a database) decide for themselves: None.
    """
    if not tracking_uri.startswith("sqlite:///") or tracking_uri.endswith(":memory:"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()
    return (db.parent / "mlartifacts" / (_slug(experiment) or "default")).as_uri()


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {key}: expected a number, got {value!r}")
    return float(value)


class Tracker:
    """MLflow runs of one experiment, through a client bound to `tracking_uri`.

    Safe to build in each Prefect task from (tracking_uri, experiment) and to use from several
    threads: every call names its run id. The experiment is created on first use; for SQLite
    its artifacts go to <db folder>/mlartifacts/<experiment>.
    """

    def __init__(self, tracking_uri: str, experiment: str = "ptq-pipeline") -> None:
        quiet_mlflow()  # before the first `import mlflow`, which starts its telemetry client
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._experiment_id: str | None = None

    # -- runs

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            location = _sqlite_artifact_root(self.tracking_uri, self.experiment)
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # created concurrently by another stage or worker
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def start_run(
        self, run_name: str, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> str:
        """Create a RUNNING run (nested under `parent_run_id` if given); return its id."""
        all_tags = {k: _tag_value(v) for k, v in (tags or {}).items() if v is not None}
        if parent_run_id is not None:
            all_tags[_MLFLOW_PARENT] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id

    def start_stage_run(
        self, parent_run_id: str, stage: str, status: str = "run", tags: Mapping[str, Any] | None = None
    ) -> str:
        """A nested run for one stage, tagged TAG_STAGE and TAG_STAGE_STATUS ("run" or "cached")."""
        if status not in STAGE_STATUSES:
            raise ValueError(f"stage status must be one of {STAGE_STATUSES}, got {status!r}")
        return self.start_run(stage, parent_run_id, {**(tags or {}), TAG_STAGE: stage, TAG_STAGE_STATUS: status})

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def run(
        self, run_name: str, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> Iterator[str]:
        """Yield a new run id; end the run FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
        run_id = self.start_run(run_name, parent_run_id, tags)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id)

    def find_or_start_pipeline_run(self, key: str, run_name: str, tags: Mapping[str, Any] | None = None) -> str:
        """The RUNNING parent run tagged TAG_PIPELINE_KEY=key, or a new one.

        DVC runs each stage in its own process; a key they all derive (e.g. from params and git
        commit) lets them share one parent run. The last stage ends it with `end_run`.
        """
        if not re.fullmatch(r"[\w.:-]+", key):
            raise ValueError(f"pipeline key must be letters, digits, '_', '.', ':' or '-', got {key!r}")
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_PIPELINE_KEY}` = '{key}' and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            return runs[0].info.run_id
        return self.start_run(run_name, tags={**(tags or {}), TAG_PIPELINE_KEY: key})

    # -- logging

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log flattened params (`section.key` -> value; values as text).

        A value over MAX_PARAM_CHARS is cut with a marker, and then the full set is logged as the
        artifact params/params.json.
        """
        from mlflow.entities import Param

        texts = {}
        for key, value in params.items():
            if isinstance(value, Mapping):
                raise TypeError(f"log_params: {key} is a mapping; pass flattened params (flows.params.flatten)")
            texts[key] = value if isinstance(value, str) else _tag_value(value)
        keep = MAX_PARAM_CHARS - len(_TRUNCATED)
        cut = {k: v[:keep] + _TRUNCATED for k, v in texts.items() if len(v) > MAX_PARAM_CHARS}
        entries = [Param(k, cut.get(k, v)) for k, v in texts.items()]
        for chunk in _chunks(entries, _BATCH_PARAMS):
            self.client.log_batch(run_id, params=chunk)
        if cut:
            self.log_dict(run_id, texts, "params/params.json")

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log scalar metrics at one step (NaN and inf are kept: a diverged run should show)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, _number(k, v), now, step) for k, v in metrics.items()]
        for chunk in _chunks(entries, _BATCH_METRICS):
            self.client.log_batch(run_id, metrics=chunk)

    def log_step_metric(self, run_id: str, key: str, values: Sequence[float], first_step: int = 0) -> None:
        """Log a series as one metric, values[i] at step first_step + i (e.g. block_error per block)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, _number(key, v), now, first_step + i) for i, v in enumerate(values)]
        for chunk in _chunks(entries, _BATCH_METRICS):
            self.client.log_batch(run_id, metrics=chunk)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set run tags (None values are skipped, bools become true/false)."""
        from mlflow.entities import RunTag

        entries = [RunTag(k, _tag_value(v)) for k, v in tags.items() if v is not None]
        for chunk in _chunks(entries, _BATCH_PARAMS):
            self.client.log_batch(run_id, tags=chunk)

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's content, under `artifact_path` of the run."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"log_artifact: {path} does not exist")

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        """Log a JSON-serializable object as the artifact `artifact_file` (e.g. "params/params.json")."""
        self.client.log_dict(run_id, obj, artifact_file)

    # -- reading back

    def runs_with_tag(self, key: str, value: str) -> list[Run]:
        """Runs of every experiment on this server whose tag `key` equals `value`."""
        from mlflow.entities import ViewType

        ids = [e.experiment_id for e in self.client.search_experiments(view_type=ViewType.ALL)]
        if not ids:
            return []
        return list(
            self.client.search_runs(ids, filter_string=f"tags.`{key}` = '{value}'", run_view_type=ViewType.ALL)
        )


# --------------------------------------------------------------------------------- registry

# The logged model's code ("models from code"): `mlflow.pyfunc.load_model(uri).predict(relpaths)`
# returns local paths of release files, each checked against the release MANIFEST first. It
# needs only mlflow; loading the quantized weights is left to the consumer.
_RELEASE_PYFUNC_CODE = '''\
"""ptq-pipeline release handle: predict(relpaths) -> verified local paths of release files."""
import hashlib
import json
import os

import mlflow
from mlflow.pyfunc import PythonModel


class ReleaseHandle(PythonModel):
    def load_context(self, context):
        self.root = context.artifacts["release"]
        with open(os.path.join(self.root, "MANIFEST.json"), encoding="utf-8") as f:
            self.files = json.load(f)["files"]

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        paths = []
        for rel in model_input or sorted(self.files):
            if rel not in self.files:
                raise KeyError(f"{rel} is not a file of this release")
            path, h = os.path.join(self.root, rel), hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != self.files[rel]:
                raise ValueError(f"{path}: sha256 does not match the release MANIFEST")
            paths.append(path)
        return paths


mlflow.models.set_model(ReleaseHandle())
'''


def _save_release_pyfunc(release_dir: Path, out_dir: Path, logged_model: Any, run_id: str) -> Path:
    """Write the MLflow model (MLmodel, code, a copy of the release) under out_dir; return its path."""
    import mlflow
    from mlflow.models import Model

    code = out_dir / "release_model.py"
    code.write_text(_RELEASE_PYFUNC_CODE, encoding="utf-8")
    # The artifact keeps its folder's name (artifacts/<name>/ in the model): stage a copy named
    # "release" unless it already is (data/release is), which saves a copy of the weights.
    staged = release_dir
    if release_dir.name != RELEASE_ARTIFACT:
        staged = out_dir / RELEASE_ARTIFACT
        shutil.copytree(release_dir, staged)
    model_dir = out_dir / "model"
    meta = Model(
        artifact_path=logged_model.artifact_location,
        model_uuid=logged_model.model_id,
        model_id=logged_model.model_id,
        run_id=run_id,
    )
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=str(code),
        artifacts={RELEASE_ARTIFACT: str(staged)},
        pip_requirements=[f"mlflow=={mlflow.__version__}"],  # explicit: nothing is inferred
        mlflow_model=meta,
    )
    return model_dir


def _log_release_model(tracker: Tracker, run_id: str, release_dir: Path, tags: Mapping[str, str]) -> Any:
    """Log the release as an MLflow 3 logged model of the run; return the finalized LoggedModel."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = tracker.client
    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(
        experiment_id, name=RELEASE_ARTIFACT, source_run_id=run_id, tags=dict(tags), model_type="ptq-release"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="ptq-release-model-") as tmp:
            model_dir = _save_release_pyfunc(release_dir, Path(tmp), model, run_id)
            client.log_model_artifacts(model.model_id, str(model_dir))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:  # registered concurrently
            client.get_registered_model(name)


def register_release(
    tracking: Tracker | str,
    run_id: str,
    release_dir: str | os.PathLike,
    model_name: str,
    alias: str = "candidate",
    tags: Mapping[str, Any] | None = None,
) -> tuple[str, int]:
    """Log `release_dir` as a model of run `run_id`, register it under `model_name`, set `alias`.

    The release is verified against its MANIFEST.json first (IntegrityError otherwise). The
    version and the run are tagged with `release_lineage_tags` (release MANIFEST sha256, git
    commit, source model, calibration and params sha256) plus `tags`. Returns (name, version).
    """
    tracker = tracking if isinstance(tracking, Tracker) else Tracker(tracking)
    release_dir = Path(release_dir)
    bad = verify_manifest(release_dir)
    if bad:
        raise IntegrityError(f"{release_dir}: files missing or not matching MANIFEST.json: {bad}; not registering")
    run_tags = {**release_lineage_tags(release_dir), **{k: _tag_value(v) for k, v in (tags or {}).items()}}
    tracker.set_tags(run_id, run_tags)
    version_tags = {k: v for k, v in run_tags.items() if not k.startswith("mlflow.")}  # run-only (UI) tags
    model = _log_release_model(tracker, run_id, release_dir, version_tags)
    client = tracker.client
    _ensure_registered_model(client, model_name)
    # source = the artifact location, not models:/<model_id>: for that URI the SQLite registry
    # looks the model up through the *global* tracking URI, not this client's.
    version = client.create_model_version(
        model_name, source=model.artifact_location, run_id=run_id, tags=version_tags, model_id=model.model_id
    )
    client.set_registered_model_alias(model_name, alias, version.version)
    return model_name, int(version.version)
