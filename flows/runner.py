"""Run the DAG of flows/stages.py: all of it in one process (`ptq run`), or one stage per process
(`ptq stage NAME`, what `dvc repro` calls). Both leave the same outputs and the same dvc.lock.

`ptq run` asks DVC which stages changed (flows.dvcstate), runs only those, in order, and commits
each to dvc.lock when it finishes; an up-to-date stage is not even loaded (no Prefect, no model),
which is what makes a no-op run cheap. MLflow is live: one parent run per pipeline execution, found
again by a key (params + code + project) when the stages run as separate processes; each stage opens
its nested run when it starts and ends it FINISHED or FAILED; a skipped stage is a nested run tagged
cached. Timings go to metrics/stages/<name>.json and MLflow, never into an output another stage reads.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stages as S
from .context import ParamsView, StageContext
from .orchestration import EngineHolder
from .params import PipelineParams, flatten, params_to_dict

__all__ = ["StageOutcome", "Tracking", "open_tracking", "pipeline_key", "run_pipeline", "run_one_stage"]

log = logging.getLogger("ptq")
CACHE_DIR = ".cache/ptq"  # = tasks.cache.CACHE_DIR (not imported: importing tasks pulls in torch)


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran" | "up to date"
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tracking:
    """The MLflow client and the parent run of this pipeline execution."""

    tracker: Any  # tasks.mlflow_runs.Tracker
    parent_run_id: str


def pipeline_key(root: Path, params: PipelineParams) -> str:
    """What the stage processes of one execution share: the project, its params and the code."""
    import hashlib
    import json

    from tasks.codeid import code_fingerprint

    text = json.dumps({"root": str(root.resolve()), "params": params_to_dict(params), "code": code_fingerprint()},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def open_tracking(root: Path, params: PipelineParams) -> Tracking:
    """Find (or open) the parent MLflow run of this execution and log the params on it."""
    from tasks.codeid import code_identity
    from tasks.mlflow_runs import Tracker, open_pipeline_run

    r = params.register
    tracker = Tracker(r.resolved_tracking_uri(root), r.experiment)
    code = code_identity()
    tags = {"ptq.code_fingerprint": code["fingerprint"], "ptq.git_commit": code["git_commit"],
            "ptq.git_dirty": code["git_dirty"], "mlflow.source.git.commit": code["git_commit"]}
    q = params.quantize
    from .pipeline import scheme_label

    name = f"ptq {q.resolved_method} {scheme_label(q)}"
    parent = open_pipeline_run(tracker, pipeline_key(root, params), name, tags)
    tracker.log_params(parent, flatten(params_to_dict(params)))
    return Tracking(tracker, parent)


def _context(root: Path, params: PipelineParams, stage: S.Stage, tracking: Tracking | None, run_id: str | None,
             engine: EngineHolder) -> StageContext:
    def log_metrics(metrics: dict[str, float], step: int = 0) -> None:
        if tracking is not None and run_id is not None:
            tracking.tracker.log_metrics(run_id, metrics, step=step)

    return StageContext(stage=stage, root=root, params=ParamsView(params, stage),
                        cache=params.orchestration.storage_root(root), log_metrics=log_metrics, tracking=tracking,
                        engine=engine)


def _write_timings(root: Path, stage: S.Stage, seconds: float, metrics: dict[str, Any]) -> None:
    from tasks.io import atomic_write_json

    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    atomic_write_json(root / stage.timings, {"seconds": round(seconds, 3), **numbers})


def run_one_stage(root: Path, params: PipelineParams, name: str, tracking: Tracking | None,
                  engine: EngineHolder | None = None) -> StageOutcome:
    """Run stage `name` now (whatever DVC thinks), inside its own nested MLflow run, its tasks on
    `engine` (None: the one params.orchestration names, started for this stage only)."""
    if engine is None:
        holder = EngineHolder.from_params(params.orchestration)
        try:
            return run_one_stage(root, params, name, tracking, holder)
        finally:
            holder.close()
    from tasks.faults import failpoint
    from tasks.mlflow_runs import close_run, open_stage_run

    from .pipeline import STAGE_FUNCTIONS

    stage = S.get_stage(name)
    run_id = open_stage_run(tracking.tracker, tracking.parent_run_id, name, "run") if tracking else None
    t0 = time.perf_counter()
    try:
        metrics = STAGE_FUNCTIONS[name](_context(root, params, stage, tracking, run_id, engine))
        failpoint(f"{name}.finished")
    except BaseException as e:
        if tracking is not None:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            close_run(tracking.tracker, run_id, status)
            close_run(tracking.tracker, tracking.parent_run_id, status)
        raise
    seconds = time.perf_counter() - t0
    _write_timings(root, stage, seconds, metrics)
    if tracking is not None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracking.tracker.log_metrics(run_id, {"seconds": seconds, **numbers})
        close_run(tracking.tracker, run_id)
    return StageOutcome(name, "ran", seconds, metrics)


def _skip(tracking: Tracking, name: str) -> StageOutcome:
    from tasks.mlflow_runs import close_run, open_stage_run

    close_run(tracking.tracker, open_stage_run(tracking.tracker, tracking.parent_run_id, name, "cached"))
    log.info("%s: up to date", name)
    return StageOutcome(name, "up to date", 0.0)


def run_pipeline(root: Path, params: PipelineParams, to: str | None = None) -> list[StageOutcome]:
    """Every stage DVC reports changed, in order (up to stage `to`), each committed to dvc.lock
    when it finishes."""
    from tasks.mlflow_runs import close_run

    from .dvcstate import check_project, commit_stage, stage_changes

    names = [s.name for s in S.STAGES]
    stages = S.STAGES[: names.index(S.get_stage(to).name) + 1] if to else S.STAGES
    check_project(root)
    tracking = open_tracking(root, params)
    outcomes = []
    engine = EngineHolder.from_params(params.orchestration)  # one local cluster for the whole run
    try:
        for stage in stages:
            if not stage.refresh and not stage_changes(root, stage.name):
                outcomes.append(_skip(tracking, stage.name))
                continue
            outcomes.append(run_one_stage(root, params, stage.name, tracking, engine))
            commit_stage(root, stage.name)
    finally:
        engine.close()
    close_run(tracking.tracker, tracking.parent_run_id)
    return outcomes
