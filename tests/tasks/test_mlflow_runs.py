"""tasks.mlflow_runs: the Tracker, and pipeline / stage runs that survive processes and kills.

Every test gets its own SQLite database, a copy of one migrated once per session (creating
MLflow's tables takes seconds). MLFLOW_TRACKING_URI points at a sentinel database that must never
be created: code falling back on MLflow's global tracking URI would show there. The registry and
lineage tests import these fixtures.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.mlflow_runs import (
    MAX_PARAM_CHARS,
    TAG_HOST,
    TAG_KILLED,
    TAG_PID,
    TAG_PIPELINE_KEY,
    TAG_RESUMES,
    TAG_STAGE,
    TAG_STAGE_STATUS,
    Tracker,
    close_run,
    open_pipeline_run,
    open_stage_run,
)

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "ptq-test"
_TEMPLATE: list[Path] = []  # the migrated empty database, made once per session


@pytest.fixture(scope="module")
def no_global_mlflow(tmp_path_factory):
    """Point MLflow's global tracking URI at a database that must stay absent."""
    sentinel = tmp_path_factory.mktemp("sentinel") / "global.db"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{sentinel}"
    yield
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
    assert not sentinel.exists(), "something used MLflow's global tracking URI"


@pytest.fixture
def tracker(tmp_path_factory, tmp_path, no_global_mlflow) -> Tracker:
    """A Tracker on a fresh SQLite database in tmp_path (artifacts under tmp_path/mlartifacts)."""
    if not _TEMPLATE:
        db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
        Tracker(f"sqlite:///{db}").client.search_experiments()  # creates the tables
        _TEMPLATE.append(db)
    shutil.copy(_TEMPLATE[0], tmp_path / "mlflow.db")
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", EXPERIMENT)


def _status(tracker: Tracker, run_id: str) -> str:
    return tracker.client.get_run(run_id).info.status


# ---------------------------------------------------------------------------------- Tracker


def test_runs_params_metrics_and_tags_read_back(tracker, tmp_path):
    from mlflow import MlflowClient

    with tracker.run("pipeline", tags={"ptq.note": True, "skipped": None}) as parent:
        with tracker.run("quantize", parent) as child:
            tracker.log_params(child, {"quantize.bits": 4, "quantize.method": "gptq"})
            tracker.log_step_metric(child, "block_error", [0.5, 0.25, 0.125])
            tracker.log_metrics(child, {"seconds": 2.0})
    client = MlflowClient(tracking_uri=tracker.tracking_uri)  # a fresh client: what was stored
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params == {"quantize.bits": "4", "quantize.method": "gptq"}
    history = sorted(client.get_metric_history(child, "block_error"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.25), (2, 0.125)]
    tags = client.get_run(parent).data.tags
    assert tags["ptq.note"] == "true" and "skipped" not in tags
    artifact_uri = client.get_run(parent).info.artifact_uri
    assert artifact_uri.startswith((tmp_path / "mlartifacts" / EXPERIMENT).as_uri())  # beside the database


def test_failed_and_interrupted_runs_are_marked(tracker):
    with pytest.raises(RuntimeError), tracker.run("boom") as failed:
        raise RuntimeError("stage failed")
    with pytest.raises(KeyboardInterrupt), tracker.run("ctrl-c") as killed:
        raise KeyboardInterrupt
    assert (_status(tracker, failed), _status(tracker, killed)) == ("FAILED", "KILLED")


def test_long_param_is_cut_and_kept_whole_as_artifact(tracker, tmp_path):
    long_value = "x" * (MAX_PARAM_CHARS + 500)
    with tracker.run("long-params") as run_id:
        tracker.log_params(run_id, {"evaluate.lm_eval_tasks": long_value, "quantize.bits": 4})
    params = tracker.client.get_run(run_id).data.params
    assert len(params["evaluate.lm_eval_tasks"]) <= MAX_PARAM_CHARS
    assert params["evaluate.lm_eval_tasks"].endswith("params/params.json]") and params["quantize.bits"] == "4"
    local = tracker.client.download_artifacts(run_id, "params/params.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["evaluate.lm_eval_tasks"] == long_value
    with pytest.raises(TypeError, match="flattened"):
        tracker.log_params(run_id, {"quantize": {"bits": 4}})


# ------------------------------------------------------------------------------ pipeline run


def test_pipeline_run_is_reused_until_finished(tracker):
    first = open_pipeline_run(tracker, "key-1", "pipeline", tags={"ptq.params_sha256": "p"})
    run = tracker.client.get_run(first)
    assert run.data.tags[TAG_PIPELINE_KEY] == "key-1" and run.data.tags["ptq.params_sha256"] == "p"
    assert open_pipeline_run(tracker, "key-1", "pipeline") == first  # another stage's process
    other = open_pipeline_run(tracker, "key-2", "pipeline")
    assert other != first

    for interrupted in ("FAILED", "KILLED"):
        close_run(tracker, first, interrupted)
        assert open_pipeline_run(tracker, "key-1", "pipeline") == first  # resumed
        assert _status(tracker, first) == "RUNNING"
    close_run(tracker, first)
    again = open_pipeline_run(tracker, "key-1", "pipeline")
    assert again not in (first, other) and _status(tracker, first) == "FINISHED"
    with pytest.raises(ValueError, match="pipeline key"):
        open_pipeline_run(tracker, "key' or 1=1", "pipeline")
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED|one of"):
        close_run(tracker, again, "DONE")


# -------------------------------------------------------------------------------- stage runs


def test_stage_run_tags_and_resumes(tracker):
    parent = open_pipeline_run(tracker, "k", "pipeline")
    first = open_stage_run(tracker, parent, "quantize", "cached", tags={"ptq.extra": 1})
    tags = tracker.client.get_run(first).data.tags
    assert tags[TAG_STAGE] == "quantize" and tags[TAG_STAGE_STATUS] == "cached" and tags["ptq.extra"] == "1"
    assert tags[TAG_PID] == str(os.getpid()) and tags[TAG_HOST] == socket.gethostname()
    assert tags["mlflow.parentRunId"] == parent and TAG_RESUMES not in tags

    # this process is alive: its RUNNING run is left alone, and a RUNNING run is nothing to resume
    second = open_stage_run(tracker, parent, "quantize")
    assert _status(tracker, first) == "RUNNING" and TAG_RESUMES not in tracker.client.get_run(second).data.tags
    close_run(tracker, first, "FAILED")
    close_run(tracker, second, "FAILED")
    third = open_stage_run(tracker, parent, "quantize")
    assert tracker.client.get_run(third).data.tags[TAG_RESUMES] == second  # the latest failed one
    assert TAG_RESUMES not in tracker.client.get_run(open_stage_run(tracker, parent, "pack")).data.tags
    close_run(tracker, third)
    fourth = open_stage_run(tracker, parent, "quantize")  # after a FINISHED run: nothing to resume
    assert TAG_RESUMES not in tracker.client.get_run(fourth).data.tags
    with pytest.raises(ValueError, match="stage status"):
        open_stage_run(tracker, parent, "quantize", "skipped")


_CHILD = """
import sys, time
from tasks.mlflow_runs import Tracker, open_stage_run
print(open_stage_run(Tracker(sys.argv[1], sys.argv[2]), sys.argv[3], "quantize"), flush=True)
time.sleep(600)
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no output from the child in {timeout} s")
    return proc.stdout.readline().strip()


def test_stage_run_of_a_killed_process_is_failed_and_resumed(tracker):
    parent = open_pipeline_run(tracker, "k", "pipeline")
    cmd = [sys.executable, "-c", _CHILD, tracker.tracking_uri, EXPERIMENT, parent]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = _read_line(proc, 120)
        assert _status(tracker, killed) == "RUNNING", proc.stderr.read() if proc.poll() is not None else ""
        assert tracker.client.get_run(killed).data.tags[TAG_PID] == str(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert _status(tracker, killed) == "RUNNING"  # nobody could end it
    resumed = open_stage_run(tracker, parent, "quantize")
    old = tracker.client.get_run(killed)
    assert old.info.status == "FAILED" and old.data.tags[TAG_KILLED] == "true"
    assert tracker.client.get_run(resumed).data.tags[TAG_RESUMES] == killed
    assert _status(tracker, resumed) == "RUNNING"


def test_a_killed_but_unreaped_process_counts_as_gone(tracker):
    parent = open_pipeline_run(tracker, "k", "pipeline")
    proc = subprocess.Popen(["sleep", "60"])
    try:
        stale = tracker.start_run("quantize", parent, {TAG_STAGE: "quantize", TAG_STAGE_STATUS: "run",
                                                       TAG_PID: proc.pid, TAG_HOST: socket.gethostname()})
        elsewhere = tracker.start_run("quantize", parent, {TAG_STAGE: "quantize", TAG_STAGE_STATUS: "run",
                                                           TAG_PID: proc.pid, TAG_HOST: "another-host"})
        open_stage_run(tracker, parent, "quantize")
        assert _status(tracker, stale) == "RUNNING"  # alive
        proc.send_signal(signal.SIGKILL)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, still a zombie (not reaped)
        open_stage_run(tracker, parent, "quantize")
        assert _status(tracker, stale) == "FAILED"
        assert tracker.client.get_run(stale).data.tags[TAG_KILLED] == "true"
        assert _status(tracker, elsewhere) == "RUNNING"  # another host's pid says nothing here
    finally:
        proc.kill()
        proc.wait()
