"""MLflow runs of the pipeline: one parent run per pipeline execution, one nested run per stage.

`Tracker` wraps an `MlflowClient` bound to one tracking URI; every call names its run id, never
the fluent active run or the global tracking URI: Prefect runs tasks in worker threads, where the
flow's active run is not visible, and MLflow 3's global default would create a stray `mlflow.db`
in the working directory.

`open_pipeline_run` / `open_stage_run` / `close_run` make runs survive separate processes and
kills: `dvc repro` runs each stage in its own process, so the parent is found again by a key; a
stage run whose process died (kill -9, OOM, power loss) is ended FAILED and tagged TAG_KILLED when
the stage is opened again, and the new run names the one it resumes in TAG_RESUMES. The host name
and process id live in MLflow tags only, never in pipeline files.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # mlflow is imported where used: `import mlflow` costs about 1.2 s
    from mlflow import MlflowClient
    from mlflow.entities import Run

__all__ = [
    "MAX_PARAM_CHARS",
    "RUN_END_STATUSES",
    "STAGE_STATUSES",
    "TAG_HOST",
    "TAG_KILLED",
    "TAG_PARENT",
    "TAG_PID",
    "TAG_PIPELINE_KEY",
    "TAG_RESUMES",
    "TAG_STAGE",
    "TAG_STAGE_STATUS",
    "Tracker",
    "close_run",
    "open_pipeline_run",
    "open_stage_run",
    "quiet_mlflow",
    "slug",
    "tag_value",
]

TAG_PIPELINE_KEY = "ptq.pipeline_key"  # on the parent run: the key its stage processes share
TAG_STAGE = "ptq.stage"
TAG_STAGE_STATUS = "ptq.stage_status"  # "run" | "cached"
TAG_PID = "ptq.pid"  # the process that opened a stage run
TAG_HOST = "ptq.host"
TAG_KILLED = "ptq.killed"  # "true": ended FAILED because its process was found gone
TAG_RESUMES = "ptq.resumes"  # run id of the failed or killed run of the same stage this one resumes
TAG_PARENT = "mlflow.parentRunId"  # what makes a run nested

STAGE_STATUSES = ("run", "cached")
RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH_PARAMS, _BATCH_METRICS = 100, 1000  # MLflow log_batch limits
_TRUNCATED = "...[truncated; full value in artifact params/params.json]"


def quiet_mlflow(environ: dict[str, str] | None = None) -> None:
    """Defaults for an offline, non-interactive pipeline (values already set win): no telemetry,
    no artifact progress bars, no INFO lines from database migrations. Called by `Tracker`."""
    env = os.environ if environ is None else environ
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow.store.db.utils"):  # "Creating initial MLflow database tables..."
        logging.getLogger(name).setLevel(logging.WARNING)


def tag_value(value: Any) -> str:
    """A tag's text: bools as true/false, mappings and lists as compact sorted JSON, else str()."""
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def slug(text: str) -> str:
    """Lowercase, anything but letters, digits, '.', '_' and '-' turned into '-' (MLflow-safe names)."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9._-]+", "-", text.lower())).strip("-.")


def _sqlite_artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """<db folder>/mlartifacts/<experiment> for sqlite URIs (the project's git-ignored folder).

    MLflow would otherwise use ./mlruns under the current directory. Other backends (a server
    with --artifacts-destination, a database) decide for themselves: None.
    """
    if not tracking_uri.startswith("sqlite:///") or tracking_uri.endswith(":memory:"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()
    return (db.parent / "mlartifacts" / (slug(experiment) or "default")).as_uri()


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
        all_tags = {k: tag_value(v) for k, v in (tags or {}).items() if v is not None}
        if parent_run_id is not None:
            all_tags[TAG_PARENT] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id

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
            texts[key] = value if isinstance(value, str) else tag_value(value)
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

        entries = [RunTag(k, tag_value(v)) for k, v in tags.items() if v is not None]
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


# ------------------------------------------------------------------- runs across processes


def _quoted(value: str, what: str) -> str:
    if not re.fullmatch(r"[\w.:-]+", value):
        raise ValueError(f"{what} must be letters, digits, '_', '.', ':' or '-', got {value!r}")
    return value


def open_pipeline_run(tracker: Tracker, key: str, run_name: str, tags: Mapping[str, Any] | None = None) -> str:
    """The parent run of one pipeline execution, shared by separate processes through `key`.

    `dvc repro` runs each stage in its own process; a key they all derive (e.g. from params and
    code) lets them share one parent. Returns the latest run of the experiment tagged
    TAG_PIPELINE_KEY=key whose status is not FINISHED (RUNNING, or FAILED / KILLED: an interrupted
    execution being resumed), set back to RUNNING; else a new RUNNING run named `run_name` with
    `tags`. The last stage ends it with `close_run`.
    """
    _quoted(key, "pipeline key")
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE_KEY}` = '{key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return tracker.start_run(run_name, tags={**(tags or {}), TAG_PIPELINE_KEY: key})
    run = runs[0]
    if run.info.status != "RUNNING":
        tracker.client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def _process_gone(pid: int) -> bool:
    """True if no process `pid` runs on this host (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    try:  # Linux: state is the field after "(comm)"
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _died(run: Run, host: str) -> bool:
    """A RUNNING run opened on this host by a process that is gone."""
    tags = run.data.tags
    pid = tags.get(TAG_PID, "")
    return run.info.status == "RUNNING" and tags.get(TAG_HOST) == host and pid.isdigit() and _process_gone(int(pid))


def _stage_runs(tracker: Tracker, parent_run_id: str, stage: str) -> list[Run]:
    """Runs of `stage` under `parent_run_id`, latest first."""
    from mlflow.entities import ViewType

    experiment_id = tracker.client.get_run(parent_run_id).info.experiment_id
    return list(
        tracker.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_STAGE}` = '{stage}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time DESC"],
        )
    )


def open_stage_run(
    tracker: Tracker, parent_run_id: str, stage: str, status: str = "run", tags: Mapping[str, Any] | None = None
) -> str:
    """A new RUNNING run for one stage, nested under `parent_run_id`; return its id.

    Tagged TAG_STAGE, TAG_STAGE_STATUS (`status`: "run", or "cached" when the stage's outputs
    were reused), TAG_PID and TAG_HOST of this process. First, every RUNNING run of the same
    stage under this parent whose process is gone (same host, pid no longer alive) is ended
    FAILED with TAG_KILLED="true". If the latest earlier run of the stage ended FAILED or KILLED,
    the new run resumes it: TAG_RESUMES=<its id> (a FINISHED run in between resumed it already).
    """
    if status not in STAGE_STATUSES:
        raise ValueError(f"stage status must be one of {STAGE_STATUSES}, got {status!r}")
    _quoted(stage, "stage name")
    host = socket.gethostname()
    earlier = _stage_runs(tracker, parent_run_id, stage)
    for run in earlier:
        if _died(run, host):
            tracker.set_tags(run.info.run_id, {TAG_KILLED: True})
            tracker.end_run(run.info.run_id, "FAILED")
    latest = tracker.client.get_run(earlier[0].info.run_id) if earlier else None
    resumes = latest.info.run_id if latest is not None and latest.info.status in ("FAILED", "KILLED") else None
    own = {TAG_STAGE: stage, TAG_STAGE_STATUS: status, TAG_PID: os.getpid(), TAG_HOST: host, TAG_RESUMES: resumes}
    return tracker.start_run(stage, parent_run_id, {**(tags or {}), **own})


def close_run(tracker: Tracker, run_id: str, status: str = "FINISHED") -> None:
    """End a run opened by `open_pipeline_run` or `open_stage_run`: FINISHED, FAILED or KILLED."""
    if status not in RUN_END_STATUSES:
        raise ValueError(f"run status must be one of {RUN_END_STATUSES}, got {status!r}")
    tracker.end_run(run_id, status)
